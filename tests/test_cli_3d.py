"""The command line in 3D: --mode 3d, --return-stacks, nbapp consensus, and bad 3D input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from models import TinyNet

from nbapp.cli import main


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet(seed=1)).save(str(model))
    vol = (np.random.default_rng(0).random((20, 32, 36)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", vol)
    return tmp_path, str(model)


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_3d_with_stacks_then_consensus_from_files_matches(setup, capsys):
    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "out.tif", "--mode", "3d", "--model",
                    model, "--return-stacks", "--min-size", "0", "--min-extent", "0", "--median", "3")
    assert code == 0, err
    full = tifffile.imread(d / "out.tif")
    stacks = [tifffile.imread(d / f"out_{p}.tif") for p in ("xy", "xz", "yz")]
    assert full.shape == (20, 32, 36) and all(s.shape == full.shape for s in stacks)
    assert "xy network" in err  # the progress bars went to the terminal
    assert "and the xy/xz/yz stacks (out_xy.tif, out_xz.tif, out_yz.tif)" in err
    code, err = run(capsys, "consensus", d / "out_xy.tif", d / "out_xz.tif", d / "out_yz.tif",
                    "-o", d / "again.tif", "--min-size", "0", "--min-extent", "0")
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(d / "again.tif"), full)
    # other settings: a stricter vote can only remove foreground
    code, _ = run(capsys, "consensus", d / "out_xy.tif", d / "out_xz.tif", d / "out_yz.tif",
                  "-o", d / "vote3.tif", "--vote", "3", "--min-size", "0", "--min-extent", "0")
    assert code == 0
    assert np.count_nonzero(tifffile.imread(d / "vote3.tif")) <= np.count_nonzero(full)


def test_single_plane_return_stacks_says_what_it_wrote(setup, capsys):
    """Issue 17 item 4: single-plane writes one stack and says so."""
    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "one.tif", "--mode", "3d",
                    "--model", model, "--no-orthoplane", "--return-stacks", "--min-size", "0",
                    "--min-extent", "0")
    assert code == 0, err
    assert "and the xy stack (one_xy.tif)" in err and "xz" not in err.splitlines()[-1]
    assert sorted(p.name for p in d.glob("one*")) == ["one.tif", "one_xy.tif"]


def test_flags_named_like_the_fields(setup, capsys):
    """Issue 17 item 15: --vote-threshold and --median-size are --vote and --median."""
    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "a.tif", "--mode", "3d",
                    "--model", model, "--vote-threshold", "1", "--median-size", "5",
                    "--min-size", "0", "--min-extent", "0")
    assert code == 0, err
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "b.tif", "--mode", "3d",
                    "--model", model, "--vote", "1", "--median", "5", "--min-size", "0",
                    "--min-extent", "0")
    assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(d / "a.tif"), tifffile.imread(d / "b.tif"))
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "c.tif", "--mode", "3d",
                    "--model", model, "--median-size", "4")
    assert code == 2 and "median_size must be an odd number" in err


def test_single_plane_to_zarr(setup, capsys):
    import zarr

    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "out.zarr", "--mode", "3d", "--model",
                    model, "--no-orthoplane", "--plane", "yz", "--min-size", "0", "--min-extent", "0")
    assert code == 0, err
    assert zarr.open(str(d / "out.zarr"), mode="r").shape == (20, 32, 36)


@pytest.mark.parametrize("extra, message", [
    (["--median", "4"], "median_size must be an odd number"),
    (["--median", "13"], "median_size"),
    (["--plane", "zz"], "plane must be one of"),
    (["--vote", "0"], "vote_threshold must be in"),
    (["--vote", "4"], "vote_threshold must be in"),
    (["--min-size", "-5"], "min_size"),
    (["--min-extent", "5000"], "min_extent"),
    (["--devices", "cuda:9"], "CUDA"),
    (["--devices", ","], "device list is empty"),
])
def test_bad_3d_options(setup, capsys, extra, message):
    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "out.tif", "--mode", "3d",
                    "--model", model, *extra)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbapp: error:") and message in lines[0]
    assert not (d / "out.tif").exists()
    assert sorted(p.name for p in d.iterdir()) == ["tiny.pt", "vol.tif"]


def test_2d_input_in_3d_mode(setup, capsys):
    d, model = setup
    tifffile.imwrite(d / "img.tif", np.zeros((32, 32), np.uint8))
    code, err = run(capsys, "segment", d / "img.tif", "-o", d / "out.tif", "--mode", "3d",
                    "--model", model)
    assert code == 2 and "needs a volume (Z, Y, X)" in err and not (d / "out.tif").exists()


def test_consensus_stacks_of_different_shapes(setup, capsys):
    d, _ = setup
    for name, shape in (("a", (4, 8, 8)), ("b", (4, 8, 8)), ("c", (4, 8, 9))):
        tifffile.imwrite(d / f"{name}.tif", np.zeros(shape, np.int32), photometric="minisblack")
    code, err = run(capsys, "consensus", d / "a.tif", d / "b.tif", d / "c.tif", "-o", d / "o.tif")
    assert code == 2 and "different shapes" in err and not (d / "o.tif").exists()


def test_consensus_of_float_or_2d_stacks(setup, capsys):
    d, _ = setup
    tifffile.imwrite(d / "f.tif", np.zeros((4, 8, 8), np.float32), photometric="minisblack")
    tifffile.imwrite(d / "i.tif", np.zeros((4, 8, 8), np.int32), photometric="minisblack")
    tifffile.imwrite(d / "two.tif", np.zeros((8, 8), np.int32))
    code, err = run(capsys, "consensus", d / "f.tif", d / "i.tif", d / "i.tif", "-o", d / "o.tif")
    assert code == 2 and "integer labels" in err
    code, err = run(capsys, "consensus", d / "two.tif", d / "i.tif", d / "i.tif", "-o", d / "o.tif")
    assert code == 2 and "must be a volume" in err


@pytest.mark.slow  # the Dask client waits out its 10 s connection timeout
def test_unreachable_scheduler(setup, capsys):
    pytest.importorskip("distributed")
    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "out.tif", "--mode", "3d",
                    "--model", model, "--scheduler", "tcp://127.0.0.1:9")
    assert code == 2 and "cannot reach the Dask scheduler" in err
    assert not (d / "out.tif").exists()


def test_train_user_errors_are_one_line_and_create_nothing(tmp_path, capsys):
    np.save(tmp_path / "raw.npy", np.zeros((4, 32, 32), np.uint8))
    out = tmp_path / "run"
    code, err = run(capsys, "train", "--raw", tmp_path / "raw.npy", "--labels", tmp_path / "nope.tif",
                    "--out", out)
    assert code == 2 and err.strip().startswith("nbapp: error:") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_demo_segments_the_bundled_volume_with_the_default_model(tmp_path, capsys):
    import re

    code, err = run(capsys, "demo", "--mode", "2d", "-o", tmp_path / "demo.tif")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "demo.tif").shape == (256, 256)
    f1 = float(re.search(r"F1@0.5 ([0-9.]+)", err).group(1))
    assert f1 >= 0.8, err  # the default model finds the demo's mitochondria


def test_progress_bars_redraw_at_most_every_tenth_of_a_second(capsys):
    """One line per slice flooded logs and pipes: updates now go through tqdm's rate limit."""
    from types import SimpleNamespace

    from nbapp.cli import _progress_bars

    progress, close = _progress_bars()
    for done in range(1, 1001):
        progress(SimpleNamespace(plane="xy", stage="network", done=done, total=1000))
    close()
    err = capsys.readouterr().err
    assert "1000/1000" in err
    assert err.count("\r") < 50


def test_table_of_objects_from_the_command_line(setup, capsys):
    """Issue 17 item 13: nbapp segment --table writes the app's object table."""
    import csv

    from nbapp.objects import TABLE_COLUMNS, object_table

    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "t.tif", "--mode", "3d",
                    "--model", model, "--min-size", "0", "--min-extent", "0", "--vote", "1",
                    "--allow-one-view", "--table", d / "objects.csv")
    assert code == 0, err
    labels = tifffile.imread(d / "t.tif")
    with open(d / "objects.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == TABLE_COLUMNS
    expected = object_table(labels)
    assert len(rows) - 1 == len(expected) == labels.max() > 0
    assert [int(r[0]) for r in rows[1:]] == [e["id"] for e in expected]
    assert [r[1] for r in rows[1:]] == ["mito"] * len(expected)  # the model's one class
    assert [int(r[2]) for r in rows[1:]] == [int((labels == e["id"]).sum()) for e in expected]
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "u.tif", "--mode", "3d",
                    "--model", model, "--table", d / "objects.txt")
    assert code == 2 and "--table is written as CSV" in err and not (d / "u.tif").exists()


def test_table_in_batch_mode_keeps_images_apart(setup, capsys):
    import csv

    d, model = setup
    code, err = run(capsys, "segment", d / "vol.tif", "-o", d / "b.tif", "--mode", "batch",
                    "--model", model, "--table", d / "b.csv")
    assert code == 0, err
    labels = tifffile.imread(d / "b.tif")
    with open(d / "b.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(int(np.count_nonzero(np.unique(s))) for s in labels)
    assert all(int(r["z1"]) - int(r["z0"]) == 1 for r in rows)
