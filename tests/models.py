"""Models for tests: a tiny random network and label oracles, both honouring the model contract."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nbapp.training.targets import panoptic_targets


class TinyNet(nn.Module):
    """A small random Panoptic-DeepLab-shaped network (C semantic classes)."""

    def __init__(self, classes: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.sem = nn.Conv2d(8, classes, 1)
        self.ctr = nn.Conv2d(8, 1, 1)
        self.off = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        f = torch.relu(self.down(torch.relu(self.stem(x))))
        sem = F.interpolate(self.sem(f), scale_factor=4.0, mode="bilinear", align_corners=False)
        ctr = self.ctr(f)
        off = self.off(f) * 4.0
        if interpolate_ins:
            ctr = F.interpolate(ctr, scale_factor=4.0, mode="bilinear", align_corners=False)
            off = F.interpolate(off, scale_factor=4.0, mode="bilinear", align_corners=False)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


class OracleNet(nn.Module):
    """Returns the ideal heads of stored label images; input slice i is a constant image of
    grey value i (uint8), so the model knows which heads to return. Coarse outputs are the
    4x4 average of the full-resolution heads (what a network at 1/4 resolution learns)."""

    def __init__(self, labels: np.ndarray, padding_factor: int = 16, sigma: float = 6.0,
                 mean: float = 0.57571, std: float = 0.12765):
        super().__init__()
        labels = np.asarray(labels)
        n, h, w = labels.shape
        hp, wp = -(-h // padding_factor) * padding_factor, -(-w // padding_factor) * padding_factor
        sem = np.full((n, 1, hp, wp), -10.0, np.float32)
        ctr = np.zeros((n, 1, hp, wp), np.float32)
        off = np.zeros((n, 2, hp, wp), np.float32)
        for i, lab in enumerate(labels):
            t = panoptic_targets(lab, sigma)
            sem[i, 0, :h, :w] = np.where(lab > 0, 10.0, -10.0)
            ctr[i, 0, :h, :w] = t.heatmap
            off[i, :, :h, :w] = t.offsets
        self.register_buffer("sem", torch.from_numpy(sem))
        self.register_buffer("ctr", torch.from_numpy(ctr))
        self.register_buffer("off", torch.from_numpy(off))
        self.mean = mean
        self.std = std

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        grey = (x[:, 0, 0, 0] * self.std + self.mean) * 255.0
        idx = torch.round(grey).long().clamp(0, self.sem.shape[0] - 1)  # warm-up input: any slice
        h, w = x.shape[2], x.shape[3]
        sem = self.sem[idx][:, :, :h, :w]
        ctr = self.ctr[idx][:, :, :h, :w]
        off = self.off[idx][:, :, :h, :w]
        if not interpolate_ins:
            ctr = F.avg_pool2d(ctr, 4)
            off = F.avg_pool2d(off, 4)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


def oracle_images(n: int, shape: tuple) -> np.ndarray:
    """The inputs that make OracleNet return the heads of label image i."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, *shape)).copy()


def save_oracle(labels: np.ndarray, folder, name: str = "oracle") -> str:
    """Script OracleNet for ``labels`` and write NAME.pt + NAME.yaml; return the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    module = torch.jit.script(OracleNet(labels))
    module.save(str(folder / f"{name}.pt"))
    (folder / f"{name}.yaml").write_text(
        "class_names: {1: mito}\nlabels: [1]\nthing_list: [1]\n"
        f"model: {name}.pt\npadding_factor: 16\nnorms: {{mean: 0.57571, std: 0.12765}}\n"
        "description: label oracle for tests\n"
    )
    return str(folder / f"{name}.yaml")


def ideal_heads(labels: np.ndarray, coarse: bool = True, sigma: float = 6.0):
    """Heads a perfect network would output for an (H, W) label image (H, W multiples of 4)."""
    from nbapp.heads import Heads

    t = panoptic_targets(labels, sigma)
    sem = np.where(labels > 0, 1.0, 0.0).astype(np.float32)[None]
    if not coarse:
        return Heads(sem, t.heatmap, t.offsets, 1, 1)
    h, w = labels.shape
    ctr = t.heatmap.reshape(h // 4, 4, w // 4, 4).mean(axis=(1, 3))
    off = t.offsets.reshape(2, h // 4, 4, w // 4, 4).mean(axis=(2, 4))
    return Heads(sem, ctr.astype(np.float32), off.astype(np.float32), 1, 4)


def f1_score(pred: np.ndarray, gt: np.ndarray, thresh: float = 0.5) -> float:
    """F1 of one-to-one IoU matching (Hungarian) between two label images (test-local oracle)."""
    from scipy.optimize import linear_sum_assignment

    pid, pinv = np.unique(pred.ravel(), return_inverse=True)
    gid, ginv = np.unique(gt.ravel(), return_inverse=True)
    cont = np.zeros((gid.size, pid.size))
    np.add.at(cont, (ginv, pinv), 1)
    ga, pa = cont.sum(1), cont.sum(0)
    gk, pk = gid != 0, pid != 0
    cont, ga, pa = cont[gk][:, pk], ga[gk], pa[pk]
    if cont.size == 0:
        return float(gk.sum() == pk.sum() == 0)
    iou = cont / (ga[:, None] + pa[None, :] - cont)
    r, c = linear_sum_assignment(-iou)
    tp = int((iou[r, c] >= thresh).sum())
    return 2 * tp / (ga.size + pa.size)


def dense_labels(shape=(256, 256), n: int = 40, seed: int = 0) -> np.ndarray:
    """Touching convex cells (a Voronoi tessellation) with some background: the hard case for
    coarse grouping, where the 4-pixel grid cuts across many shared boundaries."""
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, shape[0], (n, 2)) * np.array([1, shape[1] / shape[0]])
    yy, xx = np.indices(shape)
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    lab = d.argmin(-1).astype(np.int32) + 1
    holes = rng.random((shape[0] // 32, shape[1] // 32)) < 0.25
    lab[np.kron(holes, np.ones((32, 32), bool))] = 0
    from skimage.measure import label as cc

    lab = cc(lab, connectivity=1, background=0)
    sizes = np.bincount(lab.ravel())
    lab[sizes[lab] < 100] = 0  # no specks: real objects are larger than a few grid cells
    return cc(lab, connectivity=1, background=0).astype(np.int32)


class Recorder(nn.Module):
    """Wraps a model; counts forward calls and keeps the last input (not scriptable)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.last_x = None
        self.last_args = None

    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        self.calls += 1
        self.last_x = x.clone()
        self.last_args = (render_steps, interpolate_ins)
        return self.inner(x, render_steps=render_steps, interpolate_ins=interpolate_ins)


class RenderNet(TinyNet):
    """TinyNet whose semantic map honours render_steps (like PointRend): 2**(steps-2) x input."""

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        out = super().forward(x, render_steps, interpolate_ins)
        s = 2 ** (render_steps - 2)
        if s > 1:
            out["sem_logits"] = F.interpolate(out["sem_logits"], scale_factor=float(s), mode="nearest")
        return out


class BadNet(nn.Module):
    """Breaks the contract in a chosen way."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        n, _, h, w = x.shape
        g = (h, w) if interpolate_ins else (h // 4, w // 4)
        good = {"sem_logits": torch.zeros(n, 1, h, w), "ctr_hmp": torch.zeros(n, 1, *g),
                "offsets": torch.zeros(n, 2, *g)}
        if self.how == "keys":
            good.pop("offsets")
            good["offset"] = torch.zeros(n, 2, *g)
        elif self.how == "tensor":
            return torch.zeros(n, 1, h, w)
        elif self.how == "ctr_shape":
            good["ctr_hmp"] = torch.zeros(n, 1, h // 2, w // 2)
        elif self.how == "sem_shape":
            good["sem_logits"] = torch.zeros(n, 1, h + 1, w)
        elif self.how == "offsets_channels":
            good["offsets"] = torch.zeros(n, 3, *g)
        elif self.how == "signature":
            raise TypeError("forward() got an unexpected keyword argument 'render_steps'")
        return good


class LabelEngine:
    """Stands in for the engine in 3D tests: the 'image' is a label volume (as numbers) and the
    network outputs are the ideal heads of each slice's 2D connected components."""

    def __init__(self, batch_size: int = 4, fine: bool = False):
        from types import SimpleNamespace

        self.batch_size = batch_size
        self.device = "label-oracle"
        self.model = SimpleNamespace(config=SimpleNamespace(thing_list=(1,), name="label-oracle"))
        self.calls = 0

    def infer(self, images, downsampling=1, fine_boundaries=False, intensity=None):
        from skimage.measure import label as cc

        self.calls += 1
        out = []
        for img in np.asarray(images):
            lab = cc(np.rint(img).astype(np.int64), connectivity=2, background=0)
            out.append(ideal_heads(lab.astype(np.int32), coarse=not fine_boundaries))
        return out


def ellipsoids(shape=(32, 48, 48), n: int = 5, seed: int = 0) -> np.ndarray:
    """Non-touching random ellipsoids (convex: every slice of each is one 2D component)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    lab = np.zeros(shape, np.int32)
    k = 0
    for _ in range(200):
        if k == n:
            break
        c = [rng.uniform(6, s - 6) for s in shape]
        r = [rng.uniform(4, 9) for _ in shape]
        m = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1
        grown = ((zz - c[0]) / (r[0] + 2)) ** 2 + ((yy - c[1]) / (r[1] + 2)) ** 2 \
            + ((xx - c[2]) / (r[2] + 2)) ** 2 <= 1
        if lab[grown].any():
            continue
        k += 1
        lab[m] = k
    return lab


DATA = Path(os.environ.get("NBAPP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """Path under the shared real-EM data folder; skips the test when it is absent."""
    import pytest

    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real EM data not available ({p}); set NBAPP_DATA to its folder")
    return p


def disks(shape=(96, 128), centres=((30, 30), (30, 52), (70, 90)), radius=12) -> np.ndarray:
    """Instance labels of a few disks (the first two touch), ids 1..K."""
    yy, xx = np.indices(shape)
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return lab


class StandIn(nn.Module):
    """A stand-in for a zoo model: random weights, the registry model's classes and padding
    factor (an input whose sides are not multiples of it is refused, as a real export fails),
    Panoptic-DeepLab output shapes. ``quantized`` makes its convolutions int8 (x86 / fbgemm)."""

    def __init__(self, classes: int = 1, padding_factor: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.padding_factor = padding_factor
        self.quant = torch.ao.quantization.QuantStub()
        self.dequant = torch.ao.quantization.DeQuantStub()
        self.stem = nn.Conv2d(1, 8, 3, stride=4, padding=1)
        self.heads = nn.Conv2d(8, classes + 3, 1)
        self.classes = classes

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        if x.shape[-1] % self.padding_factor != 0 or x.shape[-2] % self.padding_factor != 0:
            raise RuntimeError(f"input sides must be multiples of {self.padding_factor}")
        f = self.dequant(self.heads(self.stem(self.quant(x))))
        sem = F.interpolate(f[:, :self.classes], scale_factor=4.0, mode="bilinear", align_corners=False)
        ctr = torch.sigmoid(f[:, self.classes:self.classes + 1])
        off = f[:, self.classes + 1:]
        if interpolate_ins:
            ctr = F.interpolate(ctr, scale_factor=4.0, mode="bilinear", align_corners=False)
            off = F.interpolate(off, scale_factor=4.0, mode="bilinear", align_corners=False)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


def standin_bytes(classes: int = 1, padding_factor: int = 16, quantized: bool = False,
                  seed: int = 0) -> bytes:
    """The TorchScript file of a :class:`StandIn`, as bytes."""
    import io as _io

    import warnings

    m = StandIn(classes, padding_factor, seed).eval()
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        if quantized:
            m.qconfig = torch.ao.quantization.get_default_qconfig("x86")
            torch.ao.quantization.prepare(m, inplace=True)
            with torch.no_grad():
                m(torch.rand(2, 1, padding_factor, padding_factor))
            torch.ao.quantization.convert(m, inplace=True)
        buf = _io.BytesIO()
        torch.jit.save(torch.jit.script(m), buf)
    return buf.getvalue()
