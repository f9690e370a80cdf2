"""The ``nbapp`` command line, end to end: files in, label files out, one-line errors.

Most tests call :func:`nbapp.cli.main` in-process (fast); one runs the installed console script.
Real outputs are checked with a label oracle: labels -> OracleNet (ideal heads) -> ``nbapp
segment`` -> the same objects back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import disk, ellipse
from skimage.measure import label as cc_label
from torch import Tensor, nn

from models import TinyNet, oracle_images, save_oracle
from nbapp import cli
from nbapp.io import read_image

# torch >= 2.10 deprecates torch.jit; TorchScript is still the MitoNet / empanada model format
# that these tests must produce and load.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

DATA = Path(os.environ.get("NBAPP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# --------------------------------------------------------------------------------------------
# helpers


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run ``nbapp ARGV`` in-process; return (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("nbapp: error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def files_in(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden temporary files included."""
    return sorted(os.listdir(folder))


def assert_same_objects(pred: np.ndarray, gt: np.ndarray, min_iou: float = 0.9) -> None:
    """Each ground-truth object has its own predicted object with IoU > ``min_iou``, and there
    are no other predicted objects (checked per 2D slice)."""
    assert pred.shape == gt.shape
    for z, (p, g) in enumerate(zip(pred.reshape(-1, *pred.shape[-2:]),
                                   gt.reshape(-1, *gt.shape[-2:]))):
        matched = set()
        for i in np.unique(g[g != 0]):
            obj = g == i
            ids, counts = np.unique(p[obj], return_counts=True)
            j = ids[np.argmax(counts)]
            assert j != 0, f"slice {z}: object {i} was not found"
            iou = np.count_nonzero(obj & (p == j)) / np.count_nonzero(obj | (p == j))
            assert iou > min_iou, f"slice {z}: object {i} found with IoU {iou:.3f} only"
            assert j not in matched, f"slice {z}: predicted object {j} covers two objects"
            matched.add(j)
        extra = set(np.unique(p[p != 0]).tolist()) - matched
        assert not extra, f"slice {z}: spurious objects {sorted(extra)}"


def synthetic_labels(shape=(96, 128)) -> np.ndarray:
    """Three label images: touching disks and an ellipse; a row of touching ellipses and a
    small disk; a ring (an object with a hole) and an elongated ellipse."""
    lab = np.zeros((3, *shape), np.int32)
    lab[0][disk((30, 30), 14, shape=shape)] = 1
    lab[0][disk((30, 57), 13, shape=shape)] = 2  # touches object 1
    lab[0][ellipse(70, 92, 12, 25, shape=shape, rotation=0.4)] = 3
    for k, cx in enumerate((25, 55, 85)):
        lab[1][ellipse(45, cx, 25, 15, shape=shape)] = k + 1  # three in a row, touching
    lab[1][disk((82, 115), 8, shape=shape)] = 4
    yy, xx = np.indices(shape)
    r2 = (yy - 48) ** 2 + (xx - 40) ** 2
    lab[2][(r2 <= 26**2) & (r2 >= 12**2)] = 1
    lab[2][ellipse(48, 100, 40, 7, shape=shape)] = 2
    return lab


def oracle_case(folder: Path, labels: np.ndarray) -> tuple[str, Path]:
    """Save OracleNet for ``labels``; return (config path, .npy of its input images)."""
    cfg = save_oracle(labels, folder)
    images = folder / "images.npy"
    np.save(images, oracle_images(len(labels), labels.shape[1:]))
    return cfg, images


class _Contract(nn.Module):
    """Base for broken models: a correct head layout that subclasses spoil."""

    def heads(self, x: Tensor, interpolate_ins: bool):
        n, _, h, w = x.shape
        g = 1 if interpolate_ins else 4
        return x, x.new_zeros(n, 1, h // g, w // g), x.new_zeros(n, 2, h // g, w // g)


class MissingKey(_Contract):
    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        sem, ctr, _ = self.heads(x, interpolate_ins)
        return {"sem_logits": sem, "ctr_hmp": ctr}


class NotADict(nn.Module):
    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Tensor:
        return x


class HalfSizeSemantic(_Contract):
    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        sem, ctr, off = self.heads(x, interpolate_ins)
        return {"sem_logits": sem[:, :, ::2, ::2], "ctr_hmp": ctr, "offsets": off}


class OneChannelOffsets(_Contract):
    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        sem, ctr, off = self.heads(x, interpolate_ins)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off[:, :1]}


class ThreeDimHeatmap(_Contract):
    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        sem, ctr, off = self.heads(x, interpolate_ins)
        return {"sem_logits": sem, "ctr_hmp": ctr[:, 0], "offsets": off}


class CoarseOnly(_Contract):
    """Right for the 1/4 grid, wrong with --fine-boundaries (ignores interpolate_ins)."""

    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        sem, ctr, off = self.heads(x, False)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


class NoOptions(nn.Module):
    """forward(x) without render_steps / interpolate_ins."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {"sem_logits": x}


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with a tiny random TorchScript model and a few small inputs."""
    d = tmp_path_factory.mktemp("cli")
    torch.jit.script(TinyNet()).save(str(d / "tiny.pt"))
    rng = np.random.default_rng(0)
    np.save(d / "img.npy", rng.integers(0, 256, (64, 48), dtype=np.uint8))
    np.save(d / "stack.npy", rng.integers(0, 256, (3, 48, 64), dtype=np.uint8))
    return d


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> tuple[str, Path, np.ndarray]:
    labels = synthetic_labels()
    cfg, images = oracle_case(tmp_path_factory.mktemp("oracle"), labels)
    return cfg, images, labels


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty output folder; tests check that failures leave it empty."""
    d = tmp_path / "out"
    d.mkdir()
    return d


# --------------------------------------------------------------------------------------------
# round trips with the label oracle


@pytest.mark.parametrize("fine,ext", [(False, ".tif"), (True, ".zarr")], ids=["coarse", "fine"])
def test_oracle_round_trip_gives_back_the_objects(capsys, oracle, out, fine, ext):
    cfg, images, labels = oracle
    target = out / f"labels{ext}"
    rc, stdout, err = run(capsys, "segment", images, "-o", target, "--mode", "batch",
                          "--model", cfg, "--device", "cpu", *(["--fine-boundaries"] * fine))
    assert rc == 0, err
    assert stdout == ""
    assert err.startswith(f"nbapp: wrote {target} (3, 96, 128) int32, 9 objects")
    pred, _ = read_image(target)
    assert pred.dtype == np.int32 and pred.shape == labels.shape
    assert_same_objects(pred, labels)
    for p, g in zip(pred, labels):  # batch mode: ids restart at label_divisor + 1 per image
        assert np.unique(p[p != 0]).tolist() == list(range(10001, 10001 + g.max()))
    assert files_in(out) == [target.name]


@pytest.mark.parametrize("fine", [False, True], ids=["coarse", "fine"])
def test_oracle_round_trip_on_real_label_slices(capsys, tmp_path, out, fine):
    path = DATA / "urocell_mito_labels" / "mito_instance_fib1-4-3-0.tif"
    if not path.is_file():
        pytest.skip(f"real label volume not available ({path}); set NBAPP_DATA to its folder")
    volume = tifffile.imread(path)
    slices = []
    for z in (96, 112, 128):
        lab = cc_label(volume[z], connectivity=1)  # 2D pieces of the 3D objects
        area = np.bincount(lab.ravel())
        lab[area[lab] < 64] = 0  # below the 1/4 grid's resolution (4 x 4 cells of 4 x 4 px)
        slices.append(cc_label(lab, connectivity=1).astype(np.int32))
    labels = np.stack(slices)
    assert min(s.max() for s in labels) >= 10, "expected a crowded slice"
    cfg, images = oracle_case(tmp_path / "model", labels)
    rc, _, err = run(capsys, "segment", images, "-o", out / "l.tif", "--mode", "batch",
                     "--model", cfg, "--label-divisor", "0", *(["--fine-boundaries"] * fine))
    assert rc == 0, err
    assert_same_objects(tifffile.imread(out / "l.tif"), labels)


def test_2d_image_defaults_to_2d_mode(capsys, oracle, tmp_path, out):
    cfg, images, labels = oracle
    tifffile.imwrite(tmp_path / "one.tif", np.load(images)[0])
    rc, _, err = run(capsys, "segment", tmp_path / "one.tif", "-o", out / "l.tiff", "--model", cfg)
    assert rc == 0, err
    pred = tifffile.imread(out / "l.tiff")
    assert pred.shape == labels.shape[1:] and pred.dtype == np.int32
    assert_same_objects(pred, labels[0])


def test_a_2d_image_in_tiles_gives_the_untiled_labels(capsys, tmp_path, out):
    """``--tile``: the default model in tiles of 64 px on a real EM crop gives the labels of
    the whole image, says so, and shows the tiles' progress; a negative size is refused."""
    from nbapp.samples import cem_crops

    tifffile.imwrite(tmp_path / "em.tif", cem_crops()[2][1])
    rc, _, err = run(capsys, "segment", tmp_path / "em.tif", "-o", out / "whole.tif", "--tile", 0)
    assert rc == 0, err
    assert "network in" not in err
    rc, _, err = run(capsys, "segment", tmp_path / "em.tif", "-o", out / "tiled.tif", "--tile", 64)
    assert rc == 0, err
    assert "network in 16 tiles (exact)" in err and "network tile 32/32" in err
    whole, tiled = (tifffile.imread(out / f) for f in ("whole.tif", "tiled.tif"))
    assert len(np.unique(whole)) > 5
    np.testing.assert_array_equal(tiled, whole)
    rc, _, err = run(capsys, "segment", tmp_path / "em.tif", "-o", out / "bad.tif", "--tile", -5)
    assert_one_line_error(rc, err, "--tile must be 0")
    assert not (out / "bad.tif").exists()


def test_2d_image_in_batch_mode_gives_2d_labels(capsys, oracle, tmp_path, out):
    cfg, images, labels = oracle
    np.save(tmp_path / "one.npy", np.load(images)[1])
    rc, _, err = run(capsys, "segment", tmp_path / "one.npy", "-o", out / "l.tif", "--model", cfg,
                     "--mode", "batch")
    assert rc == 0, err
    assert_same_objects(tifffile.imread(out / "l.tif"), labels[1])


def test_label_divisor_zero_semantic_only_and_fill_holes(capsys, oracle, out):
    cfg, images, labels = oracle
    common = ("--mode", "batch", "--model", cfg)
    assert run(capsys, "segment", images, "-o", out / "plain.tif", "--label-divisor", "0",
               *common)[0] == 0
    plain = tifffile.imread(out / "plain.tif")
    assert_same_objects(plain, labels)
    for p, g in zip(plain, labels):
        assert np.unique(p[p != 0]).tolist() == list(range(1, g.max() + 1))

    assert run(capsys, "segment", images, "-o", out / "sem.tif", "--semantic-only", *common)[0] == 0
    sem = tifffile.imread(out / "sem.tif")
    assert set(np.unique(sem).tolist()) == {0, 10000}
    np.testing.assert_array_equal(sem != 0, labels != 0)

    # the ring (image 2, object 1) has a hole: kept as it is, filled with --fill-holes
    hole = (slice(44, 53), slice(36, 45))
    assert (plain[2][hole] == 0).all()
    assert run(capsys, "segment", images, "-o", out / "fill.tif", "--fill-holes", *common)[0] == 0
    filled = tifffile.imread(out / "fill.tif")
    ring = np.bincount(filled[2][labels[2] == 1]).argmax()
    assert (filled[2][hole] == ring).all()
    np.testing.assert_array_equal(filled[:2], tifffile.imread(out / "fill.tif")[:2])


def test_label_overflow_names_class_count_and_divisor(capsys, oracle, out):
    cfg, images, _ = oracle
    rc, _, err = run(capsys, "segment", images, "-o", out / "l.tif", "--mode", "batch",
                     "--model", cfg, "--label-divisor", "2")
    assert_one_line_error(rc, err, "class 1", "3 instances", "label_divisor", "is 2")
    assert files_in(out) == []


# --------------------------------------------------------------------------------------------
# the tiny random network on every input format


def write_input(folder: Path, fmt: str, array: np.ndarray) -> str:
    """Save ``array`` as ``fmt``; return the INPUT argument that reads it."""
    import h5py
    import mrcfile
    import zarr
    from PIL import Image

    if fmt == "npy":
        np.save(folder / "in.npy", array)
        return str(folder / "in.npy")
    if fmt == "zarr":
        z = zarr.open(str(folder / "in.zarr"), mode="w", shape=array.shape, dtype=array.dtype)
        z[...] = array
        return str(folder / "in.zarr")
    if fmt == "h5":
        with h5py.File(folder / "in.h5", "w") as f:
            f["raw"] = array
            f["other"] = np.zeros(3)
        return f"{folder / 'in.h5'}:raw"
    if fmt == "mrc":
        with mrcfile.new(folder / "in.mrc") as m:
            m.set_data(array)
        return str(folder / "in.mrc")
    if fmt == "png":
        Image.fromarray(np.stack([array] * 3, axis=-1)).save(folder / "in.png")  # RGB
        return str(folder / "in.png")
    tifffile.imwrite(folder / "in.tif", array, photometric="minisblack")
    return str(folder / "in.tif")


@pytest.mark.parametrize("fmt,array,mode", [
    ("npy", np.random.default_rng(1).random((2, 48, 64), dtype=np.float32), "batch"),
    ("zarr", np.random.default_rng(2).integers(0, 4096, (2, 48, 64), dtype=np.uint16), "batch"),
    ("h5", np.random.default_rng(3).integers(-500, 500, (2, 48, 64)).astype(np.int32), "batch"),
    ("mrc", np.random.default_rng(4).normal(0, 1, (2, 48, 64)).astype(np.float32), "batch"),
    ("png", np.random.default_rng(5).integers(0, 256, (48, 64), dtype=np.uint8), None),
    ("tif", np.random.default_rng(6).integers(0, 256, (48, 64), dtype=np.uint8), "2d"),
])
def test_tiny_model_on_every_input_format(capsys, files, tmp_path, out, fmt, array, mode):
    src = write_input(tmp_path, fmt, array)
    rc, _, err = run(capsys, "segment", src, "-o", out / "l.tif", "--model", files / "tiny.pt",
                     "--device", "cpu", *(["--mode", mode] if mode else []))
    assert rc == 0, err
    labels = tifffile.imread(out / "l.tif")
    assert labels.shape == array.shape and labels.dtype == np.int32
    assert labels.min() >= 0
    assert files_in(out) == ["l.tif"]


@pytest.mark.parametrize("options", [["--downsampling", "2"], ["--fine-boundaries"],
                                     ["--batch-size", "1", "--min-distance", "1"]])
def test_tiny_model_options_keep_the_shape(capsys, files, out, options):
    rc, _, err = run(capsys, "segment", files / "stack.npy", "-o", out / "l.zarr", "--mode",
                     "batch", "--model", files / "tiny.pt", *options)
    assert rc == 0, err
    labels, _ = read_image(out / "l.zarr")
    assert labels.shape == (3, 48, 64) and labels.dtype == np.int32


def test_output_replaces_an_existing_file(capsys, files, out):
    (out / "l.tif").write_bytes(b"old")
    assert run(capsys, "segment", files / "img.npy", "-o", out / "l.tif", "--model",
               files / "tiny.pt")[0] == 0
    assert tifffile.imread(out / "l.tif").shape == (64, 48)
    assert files_in(out) == ["l.tif"]


def test_sibling_yaml_config_is_used(capsys, files, tmp_path, out):
    shutil.copy(files / "tiny.pt", tmp_path / "net.pt")
    (tmp_path / "net.yaml").write_text(
        "class_names: {1: mitochondrion}\nlabels: [1]\nthing_list: [1]\nmodel: net.pt\n"
        "padding_factor: 32\nnorms: {mean: 0.5, std: 0.2}\ndescription: tiny test net\n")
    np.save(tmp_path / "small.npy", np.zeros((24, 24), np.uint8))
    # without the YAML the padding factor is 16 and a 24 x 24 image is large enough ...
    assert run(capsys, "segment", tmp_path / "small.npy", "-o", out / "a.tif", "--model",
               files / "tiny.pt")[0] == 0
    # ... the sibling YAML says 32
    rc, _, err = run(capsys, "segment", tmp_path / "small.npy", "-o", out / "b.tif", "--model",
                     tmp_path / "net.pt")
    assert_one_line_error(rc, err, "too small", "padding factor 32")
    rc, stdout, _ = run(capsys, "info", tmp_path / "net.pt", "--json")
    info = json.loads(stdout)
    assert info["name"] == "net" and info["classes"] == ["mitochondrion"]
    assert info["description"] == "tiny test net" and info["padding_factor"] == 32
    assert files_in(out) == ["a.tif"]


# --------------------------------------------------------------------------------------------
# info, evaluate, help


def test_info_json(capsys, files, oracle):
    cases = ((files / "tiny.pt", "tiny", None), (oracle[0], "oracle", oracle[0]))
    for model, name, config in cases:
        rc, stdout, err = run(capsys, "info", model, "--json")
        assert rc == 0 and err == ""
        info = json.loads(stdout)
        assert {"name", "config", "weights", "parameters", "description", "classes"} <= set(info)
        assert info["name"] == name
        assert info["config"] == (str(Path(config).resolve()) if config else None)
        assert Path(info["weights"]).is_file()
        assert info["classes"] == ["mito"]
    assert json.loads(run(capsys, "info", files / "tiny.pt", "--json")[1])["parameters"] == sum(
        p.numel() for p in TinyNet().parameters())


def test_info_text(capsys, oracle):
    rc, stdout, _ = run(capsys, "info", oracle[0])
    assert rc == 0
    assert stdout.startswith("oracle: ")
    assert "padding factor: 16" in stdout and "classes:        1=mito" in stdout
    assert "label oracle for tests" in stdout


def test_info_default_model(capsys):
    from nbapp.models import default_config_path

    if not default_config_path().is_file():
        pytest.skip(f"the default model is not bundled yet ({default_config_path()})")
    rc, stdout, _ = run(capsys, "info", "--json")
    assert rc == 0
    assert json.loads(stdout)["parameters"] > 0


def test_evaluate(capsys, tmp_path):
    gt = synthetic_labels()[0]
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    tifffile.imwrite(tmp_path / "pred.tif", np.where(gt == 3, 0, gt * 7).astype(np.uint16))
    rc, stdout, _ = run(capsys, "evaluate", tmp_path / "pred.tif", tmp_path / "gt.tif", "--json")
    assert rc == 0
    scores = json.loads(stdout)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 0, 1)
    rc, stdout, _ = run(capsys, "evaluate", tmp_path / "gt.tif", tmp_path / "gt.tif")
    assert rc == 0 and "f1: 1.0000" in stdout


def test_evaluate_uint64_ids_beyond_int64(capsys, tmp_path):
    """uint64 ids of 2**63 and more became negative as int64: a raw traceback. They are
    scored (the objects of tests/test_metrics.py's GT64 / PRED64: F1 4/6)."""
    big = 2**63
    gt = np.array([[big + 1, big + 1, 0, big + 2, big + 2],
                   [big + 1, big + 1, 0, big + 2, big + 2],
                   [0, 0, 0, 0, 0],
                   [big + 3, big + 3, 0, 0, 0]], np.uint64)
    pred = np.array([[2**64 - 1, 2**64 - 1, 0, 0, 0],
                     [2**64 - 1, 2**64 - 1, 0, 7, 7],
                     [0, 0, 0, 0, 0],
                     [0, 0, 0, 0, big + 9]], np.uint64)
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "pred.npy", pred)
    rc, stdout, err = run(capsys, "evaluate", tmp_path / "pred.npy", tmp_path / "gt.npy", "--json")
    assert rc == 0 and err == ""
    scores = json.loads(stdout)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 1, 1)
    assert scores["f1"] == pytest.approx(4 / 6) and scores["pq"] == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    rc, stdout, _ = run(capsys, "evaluate", tmp_path / "gt.tif", tmp_path / "gt.npy")
    assert rc == 0 and "f1: 1.0000" in stdout


@pytest.mark.parametrize("pred,needles", [
    (np.zeros((4, 5), np.int32), ["PRED has shape (4, 5) but GT has shape (4, 4)"]),
    (np.zeros((4, 4), np.float32), ["PRED must hold integer labels", "float32"]),
    (np.full((4, 4), -1, np.int32), ["PRED holds negative labels"]),
])
def test_evaluate_errors(capsys, tmp_path, pred, needles):
    np.save(tmp_path / "pred.npy", pred)
    np.save(tmp_path / "gt.npy", np.ones((4, 4), np.int32))
    rc, _, err = run(capsys, "evaluate", tmp_path / "pred.npy", tmp_path / "gt.npy")
    assert_one_line_error(rc, err, *needles)


def test_evaluate_without_metrics_module(capsys, tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.ones((4, 4), np.int32))
    import nbapp

    monkeypatch.setitem(sys.modules, "nbapp.metrics", None)  # import fails
    monkeypatch.delattr(nbapp, "metrics", raising=False)
    rc, _, err = run(capsys, "evaluate", tmp_path / "a.npy", tmp_path / "a.npy")
    assert_one_line_error(rc, err, "nbapp.metrics")


@pytest.mark.parametrize("argv,text", [
    (["--help"], "segment"),
    (["segment", "--help"], "--seg-threshold"),
    (["consensus", "--help"], "--vote N"),
    (["demo", "--help"], "usage"),
    (["info", "--help"], "usage"),
    (["app", "--help"], "usage"),
    (["evaluate", "--help"], "--json"),
    (["train", "--help"], "--shading-p"),  # argparse expands % in help texts: none may break
    (["--version"], "nbapp 0."),
])
def test_help_and_version_return_0(capsys, argv, text):
    rc, stdout, _ = run(capsys, *argv)
    assert rc == 0 and text in stdout


# --------------------------------------------------------------------------------------------
# user errors: one line, non-zero exit, no output file


def _save(folder: Path, name: str, array: np.ndarray) -> Path:
    np.save(folder / name, array)
    return folder / name


def _h5(folder: Path) -> Path:
    import h5py

    with h5py.File(folder / "two.h5", "w") as f:
        f["a"] = np.zeros((32, 32), np.uint8)
        f["b"] = np.zeros((32, 32), np.uint8)
    return folder / "two.h5"


def _write(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


def _truncated_npy(folder: Path) -> Path:
    np.save(folder / "full.npy", np.zeros((64, 64), np.float32))
    return _write(folder, "trunc.npy", (folder / "full.npy").read_bytes()[:300])


def _not_zarr(folder: Path) -> Path:
    (folder / "nz.zarr").mkdir(exist_ok=True)
    (folder / "nz.zarr" / "notes.txt").write_text("hello")
    return folder / "nz.zarr"


# (id, INPUT maker, extra options, expected pieces of the message)
INPUT_ERRORS = [
    ("junk-tif", lambda d: _write(d, "junk.tif", b"junk" * 100), [], ["junk.tif", "TIF"]),
    ("truncated-npy", _truncated_npy, [], ["trunc.npy", "NPY"]),
    ("empty-file", lambda d: _write(d, "empty.npy", b""), [], ["empty.npy"]),
    ("h5-no-such-dataset", lambda d: f"{_h5(d)}:zz", [], ["has no dataset 'zz'", "['a', 'b']"]),
    ("h5-which-dataset", _h5, [], ["holds datasets ['a', 'b']", "two.h5:a"]),
    ("not-zarr", _not_zarr, [], ["nz.zarr", "zarr"]),
    ("missing", lambda d: d / "nope.tif", [], ["does not exist"]),
    ("unknown-type", lambda d: _write(d, "x.bmp", b"BM"), [], ["unknown file type .bmp"]),
    ("1d", lambda d: _save(d, "1d.npy", np.zeros(64, np.uint8)), [], ["shape (64,)"]),
    ("4d", lambda d: _save(d, "4d.npy", np.zeros((2, 2, 32, 32), np.uint8)), ["--mode", "batch"],
     ["shape (2, 2, 32, 32)"]),
    ("rgb", lambda d: _save(d, "rgb.npy", np.zeros((32, 32, 3), np.uint8)), [],
     ["RGB", "(32, 32, 3)"]),
    ("bool", lambda d: _save(d, "b.npy", np.zeros((32, 32), bool)), [], ["dtype bool"]),
    ("complex", lambda d: _save(d, "c.npy", np.zeros((32, 32), np.complex64)), [], ["complex"]),
    ("nan", lambda d: _save(d, "nan.npy", np.full((32, 32), np.nan, np.float32)), [], ["NaN"]),
    ("inf", lambda d: _save(d, "inf.npy", np.full((2, 32, 32), np.inf)), ["--mode", "batch"],
     ["infinite"]),
    ("strings", lambda d: _save(d, "s.npy", np.full((32, 32), "a")), [], ["dtype <U1"]),
    ("empty-2d", lambda d: _save(d, "e.npy", np.zeros((0, 32), np.uint8)), [],
     ["empty", "(0, 32)"]),
    ("empty-stack", lambda d: _save(d, "e3.npy", np.zeros((0, 32, 32), np.uint8)),
     ["--mode", "batch"], ["empty", "(0, 32, 32)"]),
    ("smaller-than-padding", lambda d: _save(d, "small.npy", np.zeros((8, 40), np.uint8)), [],
     ["too small", "8x40", "padding factor 16"]),
    ("too-small-after-downsampling", lambda d: _save(d, "d.npy", np.zeros((40, 40), np.uint8)),
     ["--downsampling", "4"], ["too small", "10x10"]),
    ("3d-needs-batch", lambda d: _save(d, "v.npy", np.zeros((3, 32, 32), np.uint8)), [],
     ["3D stack", "--mode batch"]),
    ("3d-too-thin", lambda d: _save(d, "v3.npy", np.zeros((3, 32, 32), np.uint8)), ["--mode", "3d"],
     ["this stack has 3 slices: too few for the xz view", "--plane xy --no-orthoplane"]),
    ("2d-mode-on-stack", lambda d: _save(d, "v2.npy", np.zeros((3, 32, 32), np.uint8)),
     ["--mode", "2d"], ["--mode 2d needs a 2D image"]),
]


@pytest.mark.parametrize("make,options,needles", [c[1:] for c in INPUT_ERRORS],
                         ids=[c[0] for c in INPUT_ERRORS])
def test_bad_input(capsys, files, tmp_path, out, make, options, needles):
    src = make(tmp_path)
    rc, stdout, err = run(capsys, "segment", src, "-o", out / "l.tif", "--model", files / "tiny.pt",
                          *options)
    assert_one_line_error(rc, err, *needles)
    assert stdout == ""
    assert files_in(out) == []


PARAMETER_ERRORS = [
    (["--seg-threshold", "-0.5"], ["seg_threshold", "-0.5"]),
    (["--seg-threshold", "0.95"], ["seg_threshold must be in [0.1, 0.9]"]),
    (["--center-threshold", "-0.1"], ["center_threshold", "-0.1"]),
    (["--min-distance", "-1"], ["min_distance", "-1"]),
    (["--min-distance", "36"], ["min_distance must be in [1, 35]"]),
    (["--downsampling", "-2"], ["downsampling must be one of", "-2"]),
    (["--downsampling", "3"], ["downsampling must be one of", "3"]),
    (["--label-divisor", "-1"], ["label_divisor", "-1"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--seg-threshold", "abc"], ["--seg-threshold", "invalid float value: 'abc'"]),
    (["--min-distance", "2.5"], ["--min-distance", "invalid int value"]),
    (["--mode", "4d"], ["--mode", "invalid choice"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    (["--device", "foo"], ["unknown device 'foo'"]),
    (["--device", "cuda:7"], ["cuda:7"]),
    (["--device", "tpu"], ["'tpu'"]),
]


@pytest.mark.parametrize("options,needles", PARAMETER_ERRORS,
                         ids=[" ".join(o) for o, _ in PARAMETER_ERRORS])
def test_bad_parameter(capsys, files, out, options, needles):
    rc, _, err = run(capsys, "segment", files / "img.npy", "-o", out / "l.tif", "--model",
                     files / "tiny.pt", *options)
    assert_one_line_error(rc, err, *needles)
    assert files_in(out) == []


GOOD_CONFIG = {
    "class_names": "{1: mito}", "labels": "[1]", "thing_list": "[1]", "model": "tiny.pt",
    "padding_factor": "16", "norms": "{mean: 0.5, std: 0.1}",
}


def _config(folder: Path, drop=(), **fields) -> Path:
    cfg = {k: v for k, v in {**GOOD_CONFIG, **fields}.items() if k not in drop}
    path = folder / "model.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    return path


def _scripted(folder: Path, module: nn.Module) -> Path:
    path = folder / f"{type(module).__name__}.pth"
    torch.jit.script(module).save(str(path))
    return path


def _zip_not_torchscript(folder: Path) -> Path:
    with zipfile.ZipFile(folder / "z.pth", "w") as z:
        z.writestr("weights.txt", "not a model")
    return folder / "z.pth"


MODEL_ERRORS = [
    ("random-bytes", lambda d: _write(d, "r.pth", np.random.default_rng(0).bytes(2048)), [],
     ["r.pth", "not a TorchScript model file"]),
    ("zip-not-torchscript", _zip_not_torchscript, [], ["z.pth", "not a loadable TorchScript"]),
    ("state-dict", lambda d: (torch.save(TinyNet().state_dict(), d / "sd.pth"), d / "sd.pth")[1],
     [], ["sd.pth", "TorchScript"]),
    ("missing-file", lambda d: d / "nope.pth", [], ["nope.pth", "does not exist"]),
    ("invalid-yaml", lambda d: _write(d, "bad.yaml", b"labels: [1,\n  - {\n"), [],
     ["bad.yaml", "not valid YAML"]),
    ("yaml-not-mapping", lambda d: _write(d, "list.yaml", b"- 1\n- 2\n"), [],
     ["must be a mapping"]),
    ("missing-padding-factor", lambda d: _config(d, drop=["padding_factor"]), [],
     ["missing required field(s): padding_factor"]),
    ("missing-norms", lambda d: _config(d, drop=["norms", "thing_list"]), [],
     ["missing required field(s): thing_list, norms"]),
    ("thing-not-in-labels", lambda d: _config(d, thing_list="[2]"), [],
     ["thing_list has classes [2] that are not in labels [1]"]),
    ("norms-std-zero", lambda d: _config(d, norms="{mean: 0.5, std: 0}"), [],
     ["std finite and > 0"]),
    ("norms-list", lambda d: _config(d, norms="[0.5, 0.1]"), [], ["norms must be a mapping"]),
    ("norms-text", lambda d: _config(d, norms="{mean: grey, std: 0.1}"), [],
     ["norms mean and std must be numbers"]),
    ("padding-factor-0", lambda d: _config(d, padding_factor="0"), [], ["padding_factor"]),
    ("weights-missing", lambda d: _config(d, model="gone.pt"), [], ["gone.pt", "does not exist"]),
    ("missing-key", lambda d: _scripted(d, MissingKey()), [], ["missing key(s) ['offsets']"]),
    ("not-a-dict", lambda d: _scripted(d, NotADict()), [], ["must return a dict", "Tensor"]),
    ("half-size-semantic", lambda d: _scripted(d, HalfSizeSemantic()), [],
     ["'sem_logits' has shape"]),
    ("offsets-1-channel", lambda d: _scripted(d, OneChannelOffsets()), [], ["'offsets' has shape"]),
    ("heatmap-3d", lambda d: _scripted(d, ThreeDimHeatmap()), [],
     ["'ctr_hmp' must be a 4D tensor"]),
    ("wrong-in-fine-mode", lambda d: _scripted(d, CoarseOnly()), ["--fine-boundaries"],
     ["'ctr_hmp' has shape", "interpolate_ins=True"]),
    ("no-options", lambda d: _scripted(d, NoOptions()), [], ["must accept"]),
]


@pytest.mark.parametrize("make,options,needles", [c[1:] for c in MODEL_ERRORS],
                         ids=[c[0] for c in MODEL_ERRORS])
def test_bad_model(capsys, files, tmp_path, out, make, options, needles):
    shutil.copy(files / "tiny.pt", tmp_path / "tiny.pt")
    model = make(tmp_path)
    rc, _, err = run(capsys, "segment", files / "img.npy", "-o", out / "l.tif", "--model", model,
                     *options)
    assert_one_line_error(rc, err, *needles)
    assert files_in(out) == []
    if not options:  # info loads the model the same way
        rc, stdout, err = run(capsys, "info", model, "--json")
        assert_one_line_error(rc, err, *needles)
        assert stdout == ""


def test_bad_output(capsys, files, tmp_path, out):
    for target, needles in [
        (out / "l.png", ["OUTPUT must end with .tif or .tiff or .zarr"]),
        (out / "labels", ["OUTPUT must end with"]),
        (out / "missing" / "l.tif", ["output folder", "does not exist"]),
    ]:
        rc, _, err = run(capsys, "segment", files / "img.npy", "-o", target, "--model",
                         files / "tiny.pt")
        assert_one_line_error(rc, err, *needles)
    (out / "dir.tif").mkdir()
    rc, _, err = run(capsys, "segment", files / "img.npy", "-o", out / "dir.tif", "--model",
                     files / "tiny.pt")
    assert_one_line_error(rc, err, "is an existing folder")
    assert files_in(out) == ["dir.tif"]


def test_output_must_not_overwrite_the_input(capsys, files, tmp_path):
    from nbapp.io import write_labels

    raw = np.random.default_rng(0).integers(0, 255, (2, 32, 32)).astype(np.uint8)
    write_labels(tmp_path / "raw.zarr", raw)
    for target in (tmp_path / "raw.zarr", tmp_path / "raw.zarr" / ".." / "raw.zarr"):
        rc, _, err = run(capsys, "segment", tmp_path / "raw.zarr", "-o", target, "--mode", "batch",
                         "--model", files / "tiny.pt")
        assert_one_line_error(rc, err, "would overwrite the input")
    np.save(tmp_path / "raw.npy", raw[0])
    rc, _, err = run(capsys, "segment", tmp_path / "raw.npy", "-o", tmp_path / "raw.npy",
                     "--model", files / "tiny.pt")
    assert_one_line_error(rc, err, "OUTPUT must end with")
    np.testing.assert_array_equal(read_image(tmp_path / "raw.zarr")[0], raw)


def test_failed_write_is_one_line_and_leaves_nothing(capsys, files, out, monkeypatch):
    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", disk_full)
    rc, _, err = run(capsys, "segment", files / "img.npy", "-o", out / "l.tif", "--model",
                     files / "tiny.pt")
    assert_one_line_error(rc, err, "cannot write", "No space left on device")
    assert files_in(out) == []


@pytest.mark.parametrize("exc,code,needle", [
    (MemoryError(), 1, "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_resource_errors_are_one_line(capsys, files, out, monkeypatch, exc, code, needle):
    from nbapp.inference import SliceSegmenter

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(SliceSegmenter, "segment_batch", fail)
    rc, _, err = run(capsys, "segment", files / "stack.npy", "-o", out / "l.tif", "--mode", "batch",
                     "--model", files / "tiny.pt")
    assert rc == code
    assert_one_line_error(rc, err, needle)
    assert files_in(out) == []


def test_bugs_keep_their_traceback(files, out, monkeypatch):
    """Only user errors are shortened; anything else is a bug and must stay visible."""
    from nbapp.inference import SliceSegmenter

    def bug(*args, **kwargs):
        raise RuntimeError("index out of range in self")

    monkeypatch.setattr(SliceSegmenter, "segment_batch", bug)
    with pytest.raises(RuntimeError, match="index out of range"):
        cli.main(["segment", str(files / "stack.npy"), "-o", str(out / "l.tif"), "--mode", "batch",
                  "--model", str(files / "tiny.pt")])
    assert files_in(out) == []


@pytest.mark.parametrize("argv,needles", [
    ([], ["required: COMMAND"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    (["segment", "x.npy"], ["required: -o/--output"]),
    (["info", "--frob"], ["unrecognized arguments: --frob"]),
])
def test_usage_errors(capsys, argv, needles):
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, *needles)


def test_console_script(tmp_path):
    """The installed ``nbapp`` entry point runs main(): exit status 2 and one stderr line."""
    exe = shutil.which("nbapp")
    if exe is None:
        pytest.fail("the nbapp console script is not on PATH: pip install -e .")
    (tmp_path / "out").mkdir()
    res = subprocess.run([exe, "segment", str(tmp_path / "nope.tif"), "-o",
                          str(tmp_path / "out" / "l.tif")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    missing = tmp_path / "nope.tif"
    assert res.stderr.splitlines() == [f"nbapp: error: input '{missing}' does not exist"]
    assert files_in(tmp_path / "out") == []


# --------------------------------------------------------------------------------------------
# hardening (issue 15): one line for hostile inputs, output checked first, --data-root


def test_segment_png_decompression_bomb_is_one_line(capsys, tmp_path):
    import struct
    import zlib

    from files import png_chunk as chunk

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb30k.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 30001))
        + chunk(b"IEND", b""))
    rc, _, err = run(capsys, "segment", tmp_path / "bomb30k.png", "-o", tmp_path / "o.tif")
    assert_one_line_error(rc, err, "bomb30k.png", "more pixels than Pillow will decode")
    assert files_in(tmp_path) == ["bomb30k.png"]


def test_segment_six_byte_tiff_is_one_line(capsys, tmp_path):
    (tmp_path / "t.tif").write_bytes(b"II*\x00\x08\x00")
    rc, _, err = run(capsys, "segment", tmp_path / "t.tif", "-o", tmp_path / "o.tif")
    assert_one_line_error(rc, err, "t.tif")


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_read_only_output_folder_fails_before_any_work(capsys, tmp_path, readonly_dir,
                                                       monkeypatch, mode):
    from nbapp import inference, io as nio

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(inference, "SliceSegmenter", no_work)
    monkeypatch.setattr(nio, "read_image", no_work)
    img = np.zeros((4, 64, 64) if mode == "3d" else (64, 64), np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", img, photometric="minisblack")
    rc, _, err = run(capsys, "segment", tmp_path / "in.tif", "-o", readonly_dir / "lab.tif",
                     "--mode", mode)
    assert_one_line_error(rc, err, "refuses new files")


def test_segment_data_root_confines_input_and_model(capsys, tmp_path, oracle):
    model, images, _ = oracle  # config and images in one folder: the data root here
    root = Path(images).parent
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    tifffile.imwrite(outside / "x.tif", np.zeros((64, 64), np.uint8))
    rc, _, err = run(capsys, "segment", outside / "x.tif", "-o", tmp_path / "o.tif",
                     "--data-root", root, "--model", model)
    assert_one_line_error(rc, err, "outside the data root")
    rc, _, err = run(capsys, "segment", Path(images).name, "-o", tmp_path / "o.tif",
                     "--mode", "batch", "--data-root", root, "--model", outside / "m.pt")
    assert_one_line_error(rc, err, "outside the data root")
    rc, _, err = run(capsys, "segment", Path(images).name, "-o", tmp_path / "o.tif",
                     "--mode", "batch", "--data-root", root, "--model", Path(model).name)
    assert rc == 0, err


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """Issue 30 item 14: `nbapp models --json | head` ended in a BrokenPipe traceback."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise ValueError("no file")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["models", "--json"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_evaluate_scores_per_slice_labels_slice_by_slice(tmp_path, capsys):
    """Issue 30 item 5: a batch's per-slice labels scored in 3D gave F1 0.014 where its
    slices score 0.6-0.7."""
    import tifffile

    gt = np.zeros((3, 16, 16), np.uint16)
    gt[:, 2:6, 2:6], gt[:, 9:14, 9:14] = 1, 2  # ids restart: 1 and 2 in every slice...
    gt[1] = np.roll(gt[1], 8, axis=1)  # ... at other places slice to slice
    gt[1, :, 14:] = 0
    pred = gt.copy()
    pred[2] = 0  # the model missed slice 2's objects
    tifffile.imwrite(tmp_path / "gt.tif", gt, photometric="minisblack")
    tifffile.imwrite(tmp_path / "pred.tif", pred, photometric="minisblack")
    args = ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.tif"), "--json"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    scores = json.loads(out.out)
    assert scores["slices"] == 3 and scores["tp"] == 4 and scores["fn"] == 2
    assert scores["f1"] == pytest.approx(0.8)
    assert "scored slice by slice (3 slices, 6 objects): GT looks like per-slice labels (ids " \
        "restart" in out.err
    assert cli.main(args + ["--no-per-slice"]) == 0
    assert "slices" not in json.loads(capsys.readouterr().out)
    assert cli.main(["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "pred.tif"),
                     "--json", "--per-slice"]) == 0
    assert json.loads(capsys.readouterr().out)["slices"] == 3
    tifffile.imwrite(tmp_path / "flat.tif", gt[0])
    assert cli.main(["evaluate", str(tmp_path / "flat.tif"), str(tmp_path / "flat.tif"),
                     "--per-slice"]) == 2
    assert "--per-slice needs stacks" in capsys.readouterr().err
