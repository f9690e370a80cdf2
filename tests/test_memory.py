"""Memory: what the process has left (cgroup v1 / v2, RLIMIT_AS), the network's and the 3D job's
needs checked before they start, and the real thing: the CLI under a container-style memory
limit gives a one-line error instead of being killed by the kernel (issue 15, items 4 and 6).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from nbapp import memory
from nbapp.memory import OutOfMemory, available_bytes, check_fits, format_bytes
from nbapp.params import VolumeParams

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning"),
    # ipyvolume's traitlets usage (the app test)
    pytest.mark.filterwarnings(
        "ignore:metadata .* was set from the constructor:DeprecationWarning"),
]


# --------------------------------------------------------------------------------------------
# reading the limits


def fake_cgroup(tmp_path: Path, version: int, limit: int, usage: int, inactive: int = 0) -> str:
    """A cgroup file system under tmp_path; returns the /proc/self/cgroup text that points at
    it."""
    if version == 2:
        (tmp_path / "cgroup.controllers").write_text("memory\n")
        group = tmp_path / "app" / "kernel"
        group.mkdir(parents=True)
        (group / "memory.max").write_text(f"{limit}\n")
        (group / "memory.current").write_text(f"{usage}\n")
        (group / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 0\n")
        (tmp_path / "app" / "memory.max").write_text("max\n")
        return "0::/app/kernel\n"
    group = tmp_path / "memory" / "app" / "kernel"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (group / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (group / "memory.stat").write_text(f"cache 5\ntotal_inactive_file {inactive // 2}\n"
                                       f"total_active_file {inactive - inactive // 2}\n")
    parent = tmp_path / "memory" / "app"
    (parent / "memory.limit_in_bytes").write_text(f"{1 << 62}\n")
    (parent / "memory.usage_in_bytes").write_text(f"{usage}\n")
    return "4:memory:/app/kernel\n2:cpu:/\n"


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_room_is_the_limit_minus_what_is_used(tmp_path, monkeypatch, version):
    text = fake_cgroup(tmp_path, version, limit=700 << 20, usage=400 << 20, inactive=100 << 20)
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    # file pages (evicted before the kernel kills) count as free
    assert memory._cgroup_room(text) == 400 << 20


def test_a_parent_cgroup_limit_binds(tmp_path, monkeypatch):
    text = fake_cgroup(tmp_path, 2, limit=1 << 40, usage=100 << 20)
    (tmp_path / "app" / "memory.max").write_text(f"{300 << 20}\n")
    (tmp_path / "app" / "memory.current").write_text(f"{200 << 20}\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    assert memory._cgroup_room(text) == 100 << 20


def test_no_cgroup_limit_is_unlimited(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    assert memory._cgroup_room("0::/\n") >= 1 << 60
    assert memory._cgroup_room("garbage") >= 1 << 60


def test_rlimit_as_is_seen_by_a_child():
    code = "from nbapp.memory import available_bytes; print(available_bytes())"
    limit = 4 << 30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=cap, check=True).stdout
    assert 0 < int(out) < limit


def test_available_bytes_is_positive_and_below_the_machine():
    assert 0 < available_bytes() <= memory._meminfo_available()


def test_check_fits_message():
    with pytest.raises(OutOfMemory, match=r"out of memory: a job needs 1.0 GiB but this process "
                                          r"has 100 MiB left; do less") as exc:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(memory, "available_bytes", lambda: 100 << 20)
            check_fits(1 << 30, "a job", "do less")
    assert isinstance(exc.value, MemoryError)
    assert format_bytes(0) == "0 B"


# --------------------------------------------------------------------------------------------
# the network (2D) and the 3D job check before they start


@pytest.fixture
def engine():
    from nbapp.engine import Engine

    return Engine("default", device="cpu")


def test_2d_inference_refuses_an_image_that_would_not_fit(engine, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 60 << 20)
    img = np.zeros((1024, 1024), np.uint8)
    with pytest.raises(OutOfMemory, match=r"image of 1024x1024 at downsampling 1 needs .* "
                                          r"use Image Downsampling (\d+)") as exc:
        engine.infer(img)
    ds = int(re.search(r"Downsampling (\d+)", str(exc.value)).group(1))
    assert ds > 1
    assert engine.infer(img, downsampling=ds)[0].downsampling == ds  # the hint fits


def test_3d_job_too_large_is_refused_before_it_starts(engine, monkeypatch):
    from nbapp.volume import job_memory, volume_steps

    vol = np.zeros((32, 256, 256), np.uint8)
    ortho = job_memory(vol.shape, VolumeParams(), engine)
    single = job_memory(vol.shape, VolumeParams(orthoplane=False), engine)
    assert single < ortho
    monkeypatch.setattr(memory, "available_bytes", lambda: int(ortho * 0.8))
    steps = volume_steps(engine, vol, VolumeParams())
    with pytest.raises(OutOfMemory, match=r"ortho-plane 3D job on a 32x256x256 volume needs .* "
                                          r"run single-plane \(needs"):
        next(steps)


def test_app_says_out_of_memory_when_the_3d_job_would_not_fit(monkeypatch):
    pytest.importorskip("ipyvolume")
    from nbapp.ui import App

    vol = np.random.default_rng(0).integers(0, 255, (16, 64, 64), dtype=np.uint8)
    a = App(volume=vol, device="cpu", synchronous=True)
    try:
        monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
        assert a.session.run_3d() is False
        assert a.state.status_level == "error"
        assert a.state.status.startswith("cannot start the 3D job: out of memory: the ortho-plane")
    finally:
        a.close()


def test_memory_error_inside_a_job_reads_out_of_memory():
    from nbapp.jobs import JobRunner, JobState

    def job():
        yield from ()
        raise MemoryError()

    runner = JobRunner(synchronous=True)
    runner.submit(job)
    snap = runner.wait()
    assert snap.state == JobState.FAILED and snap.error.startswith("out of memory")


# --------------------------------------------------------------------------------------------
# the real thing: a container-style memory limit (cgroup), where going over is a silent kill


def _cgroup_runner(limit: int):
    """A preexec function that moves the child into a new memory cgroup capped at ``limit``,
    or None when this machine does not let us make one (not root, no cgroup file system)."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
            base, limit_file = Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            base, limit_file = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), \
                "memory.limit_in_bytes"
        else:
            continue
        group = base / f"nbapp-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit))
            if limit_file == "memory.limit_in_bytes":  # v1: no swap either
                try:
                    (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
                except OSError:
                    pass
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
            continue
        procs = group / "cgroup.procs"

        def enter():
            procs.write_text(str(os.getpid()))

        return enter, group
    return None, None


def run_capped(args: list, limit: int, cwd, python_args: tuple = ("-m", "nbapp.cli")
               ) -> subprocess.CompletedProcess:
    enter, group = _cgroup_runner(limit)
    if enter is None:
        pytest.skip("cannot create a memory cgroup here (needs root and a cgroup file system)")
    try:
        return subprocess.run([sys.executable, *python_args, *args], capture_output=True,
                              text=True, preexec_fn=enter, cwd=cwd, timeout=300)
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


@pytest.mark.slow
def test_cli_under_a_700_mb_limit_refuses_a_tiff_bomb(tmp_path):
    import tifffile

    page = np.zeros((8192, 8192), np.uint8)
    tifffile.imwrite(tmp_path / "bomb.tif", (page for _ in range(16)), shape=(16, 8192, 8192),
                     dtype=np.uint8, compression="zlib", photometric="minisblack")
    proc = run_capped(["segment", "bomb.tif", "-o", "out.tif", "--mode", "batch"],
                      700 << 20, tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("nbapp: error: out of memory: bomb.tif decodes to "
                                  "16x8192x8192 uint8 (1.0 GiB)")
    assert proc.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["bomb.tif"]


@pytest.mark.slow
def test_cli_under_a_700_mb_limit_refuses_a_3d_job_too_large(tmp_path):
    import tifffile

    vol = np.random.default_rng(0).integers(0, 255, (96, 512, 512), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", vol)
    proc = run_capped(["segment", "vol.tif", "-o", "out.tif", "--mode", "3d"], 700 << 20,
                      tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "nbapp: error: out of memory: the ortho-plane 3D job on a 96x512x512 volume" \
        in proc.stderr
    assert "write to a .zarr output" in proc.stderr  # which would run it block by block
    assert sorted(os.listdir(tmp_path)) == ["vol.tif"]


@pytest.mark.slow
@pytest.mark.parametrize("name, shown", [
    ("big.png", "big.png decodes to 12000x12000 uint8 (137 MiB)"),
    ("bomb.tif", "bomb.tif decodes to 16x8192x8192 uint8 (1.0 GiB)"),
])
def test_app_under_a_700_mb_limit_refuses_small_uploads_that_decode_big(tmp_path, name, shown):
    """140 KB of PNG that decodes to 137 MiB, 1.2 MB of zlib TIFF that decodes to 1 GiB: the
    kernel (torch, widgets, the model) must say so in the status line, not be killed."""
    pytest.importorskip("ipyvolume")
    import tifffile

    from files import png_of_zeros

    if name == "big.png":
        png_of_zeros(tmp_path / name, 12000, 12000)
    else:
        page = np.zeros((8192, 8192), np.uint8)
        tifffile.imwrite(tmp_path / name, (page for _ in range(16)), shape=(16, 8192, 8192),
                         dtype=np.uint8, compression="zlib", photometric="minisblack")
    code = ("import glob, os\n"
            "from nbapp.ui import App\n"
            "a = App(device='cpu', synchronous=True)\n"
            f"a.session.load_upload({name!r}, open({name!r}, 'rb').read())\n"
            "print(a.state.status_level, a.state.status)\n"
            "print('left behind:', os.listdir(a.session._upload_dir))\n"
            "a.close()\n")
    proc = run_capped([], 700 << 20, tmp_path, python_args=("-W", "ignore", "-c", code))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"error upload failed: out of memory: {shown}"), proc.stdout
    assert lines[1] == "left behind: []"


def test_cli_under_a_small_ulimit_v_says_so_instead_of_aborting(tmp_path):
    """Below the address space torch needs, glibc aborts while torch starts its threads
    ("cannot allocate memory for thread-local data"): the CLI checks first."""
    import tifffile

    tifffile.imwrite(tmp_path / "small.tif", np.zeros((64, 64), np.uint8))
    limit = 700 << 20

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "nbapp.cli", "segment", "small.tif", "-o",
                           "o.tif"], capture_output=True, text=True, cwd=tmp_path,
                          preexec_fn=cap, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("nbapp: error: out of memory: the address-space limit "
                                  "(ulimit -v) is 700 MiB")
    assert sorted(os.listdir(tmp_path)) == ["small.tif"]


@pytest.mark.slow
def test_cli_under_a_1_gb_limit_segments_a_slice_too_large_for_one_pass_in_tiles(tmp_path):
    """Issue 29 item 2: one forward pass over this 2600 x 2600 slice needs 950 MB, more than
    this 1 GB container has left beside Python, torch and the model; the engine runs it in
    tiles instead, within the limit, and the labels are the untiled ones (computed here,
    without a limit)."""
    import tifffile

    from nbapp.inference import SliceSegmenter
    from nbapp.samples import cem_crops

    crops = [c[1] for c in cem_crops() if c[1].shape == (224, 224)]
    rows = [np.concatenate([crops[(i + j) % 4] for j in range(12)], axis=1) for i in range(12)]
    image = np.ascontiguousarray(np.concatenate(rows, axis=0)[:2600, :2600])
    tifffile.imwrite(tmp_path / "big.tif", image)
    proc = run_capped(["segment", "big.tif", "-o", "untiled.tif", "--tile", "0"], 1 << 30,
                      tmp_path)  # the limit binds: one forward pass would not fit
    assert proc.returncode == 1 and "nbapp: error: out of memory: image of 2600x2600" \
        in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    proc = run_capped(["segment", "big.tif", "-o", "labels.tif"], 1 << 30, tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert re.search(r"network in \d+ tiles \(exact\)", proc.stderr), proc.stderr[-2000:]
    whole = SliceSegmenter("default", device="cpu", tile=0)(image)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels.tif"), whole)
