"""Train nbapp's default mitochondria model (:mod:`nbapp.models.arch`) on an EM volume.

The recipe (:func:`run`) reads a volume and its 3D instance labels, holds out the last
``--val-slices`` Z slices, and trains on 2D patches sampled from the xy, xz and yz planes of the
rest (``--planes xy`` for anisotropic volumes or stacks of 2D images). Each patch is cut by a
random similarity transform (rotation, flip, scale, slight aspect change; bilinear for the
image, nearest for the labels), the labels of the patch are split into 2D connected components
and turned into Panoptic-DeepLab targets with :func:`nbapp.targets.panoptic_targets` AFTER the
geometric transform (so rotated offsets are right by construction), then the image gets
photometric noise (brightness, contrast, gamma, noise, blur, loss of resolution).

Loss: binary cross-entropy on the hardest pixels plus a soft Dice term (semantic), MSE on the
centre heat-map (weight 200), L1 on the offsets of foreground pixels (weight 0.01), the two 1/4
heads being upsampled x4 to the targets' resolution. AdamW with a warm-up then cosine schedule.

Outputs in ``--out``: ``last.pth`` (resumable), ``best.pth`` (best validation score; state
dict + architecture hyper-parameters + normalisation, loadable with
``torch.load(..., weights_only=True)``), ``nbapp_mito.pt`` (TorchScript, batch norm folded),
``nbapp_mito.yaml`` (empanada-format config) and ``metrics.json``.

Example::

    python -m nbapp.train --raw train_raw.tif --labels train_mito_instances_3d_cc.tif \\
        --out runs/mito --steps 6000 --time-limit 60

Fine-tuning starts from a checkpoint or from a model nbapp exported, the shipped one included
(``--init default``): the export's folded batch norms are rebuilt and recalibrated on the new
data (:func:`nbapp.models.arch.from_export`), so training starts from the exported function::

    nbapp train --init default --raw my_em.tif --labels my_labels.tif --planes xy \\
        --out runs/mine --time-limit 20 --lr 3e-4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbapp.errors import InputError, ParameterError
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.measure import label as cc_label

from nbapp.metrics import slice_metrics
from nbapp.models.arch import (ARCH_DEFAULTS, PADDING_FACTOR, build_model, count_parameters,
                               from_export, recalibrate_batchnorm, save_torchscript)
from nbapp.synth import synthetic_patch
from nbapp.targets import panoptic_targets

__all__ = ["add_arguments", "run", "main", "PatchSampler", "compute_norms", "panoptic_loss",
           "export_model", "config_dict"]

PLANES = ("xy", "xz", "yz")


# ----------------------------------------------------------------------------------------- data


def read_volume(path: str | Path) -> np.ndarray:
    """Read a 3D (Z, Y, X) array with :func:`nbapp.io.read_image` (TIFF, zarr, HDF5, MRC, ...)."""
    from nbapp.io import read_image

    arr = np.asarray(read_image(str(path))[0])
    if arr.ndim != 3:
        raise InputError(f"{path}: expected a 3D (Z, Y, X) volume, got shape {arr.shape}")
    return arr


def to_unit_range(raw: np.ndarray) -> tuple[np.ndarray, float]:
    """Return ``(raw as float32 in [0, 1], range R)`` using the engine's rule (255 for uint8).

    Other dtypes are rescaled from their 0.1 and 99.9 percentiles (SPEC.md section 2, step 2).
    """
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / 255.0, 255.0
    if raw.dtype.kind == "f" and raw.min() >= 0 and raw.max() <= 1:
        return raw.astype(np.float32), 1.0
    lo, hi = np.percentile(raw, [0.1, 99.9])
    scale = float(hi - lo) if hi > lo else 1.0
    return np.clip((raw.astype(np.float32) - lo) / scale, 0, 1), scale


def compute_norms(unit: np.ndarray) -> dict:
    """Mean and standard deviation of an intensity array already in [0, 1]."""
    return {"mean": round(float(unit.mean()), 4), "std": round(float(unit.std()), 4)}


def _plane(vol: np.ndarray, plane: str, index: int) -> np.ndarray:
    if plane == "xy":
        return vol[index]
    if plane == "xz":
        return vol[:, index]
    return vol[:, :, index]


@dataclass
class AugmentConfig:
    """Ranges of the random augmentations."""

    scale_lo: float = 0.75
    scale_hi: float = 1.35
    zoom_out_p: float = 0.2
    zoom_out_hi: float = 3.0
    contrast: tuple = (0.7, 1.4)
    brightness: float = 0.12
    gamma: tuple = (0.7, 1.5)
    noise_p: float = 0.3
    noise_hi: float = 0.06
    blur_p: float = 0.2
    lowres_p: float = 0.2
    pad_p: float = 0.25
    pad_max: float = 0.6
    shading_p: float = 0.0
    shading_max: float = 0.4
    fit: bool = True
    object_p: float = 0.0
    object_shift: tuple = (-0.3, 0.1)
    object_gain: tuple = (0.5, 1.5)
    synthetic_p: float = 0.0
    hard_negatives_p: float = 0.0


class PatchSampler:
    """Random augmented 2D training patches and their Panoptic-DeepLab targets.

    Parameters
    ----------
    unit : (Z, Y, X) float32
        Image in [0, 1].
    labels : (Z, Y, X) int
        3D instance labels.
    patch : int
        Side of the square patches.
    rng : numpy.random.Generator
        Source of all randomness.
    sigma : float
        Heat-map Gaussian sigma (pixels).
    aug : AugmentConfig
        Augmentation ranges.
    planes : tuple of str
        Planes the real patches are cut from: all three for isotropic volumes, ``("xy",)`` for
        anisotropic ones (serial sections) or a stack of unrelated 2D images.
    weights : (Z, Y, X) float32, optional
        Per-pixel weights of the semantic loss, cut and transformed with the patch (sample key
        ``weight``).
    """

    def __init__(self, unit: np.ndarray, labels: np.ndarray, patch: int,
                 rng: np.random.Generator, sigma: float = 6.0,
                 aug: AugmentConfig | None = None, planes: tuple = PLANES,
                 weights: np.ndarray | None = None) -> None:
        self.unit, self.labels, self.patch, self.rng = unit, labels, patch, rng
        self.sigma = sigma
        self.aug = aug or AugmentConfig()
        self.planes = tuple(planes)
        self.weights = weights  # (Z, Y, X) per-pixel loss weights (e.g. corrected pixels), or None

    def sample(self) -> dict:
        """One patch: ``image`` (P, P) float32 in [0, 1], ``semantic`` (P, P) float32,
        ``heatmap`` (P, P) float32, ``offsets`` (2, P, P) float32, ``fg`` (P, P) bool."""
        rng, p, a = self.rng, self.patch, self.aug
        if a.synthetic_p and rng.random() < a.synthetic_p:
            return self._synthetic()
        zoom_out = rng.random() < a.zoom_out_p
        # with fit, zoom-out patches come from the largest plane (xy of a (Z, Y, X) volume)
        if zoom_out and a.fit:
            plane = "xy" if "xy" in self.planes else self.planes[0]
        else:
            plane = self.planes[int(rng.integers(len(self.planes)))]
        axis = PLANES.index(plane)
        index = int(rng.integers(self.unit.shape[axis]))
        img = _plane(self.unit, plane, index)
        lab = _plane(self.labels, plane, index)
        lo_s, hi_s = (a.scale_hi, a.zoom_out_hi) if zoom_out else (a.scale_lo, a.scale_hi)
        scale = float(np.exp(rng.uniform(np.log(lo_s), np.log(hi_s))))
        aspect = float(np.exp(rng.uniform(-0.1, 0.1)))
        theta = rng.uniform(0, 2 * np.pi)
        flip = -1.0 if rng.random() < 0.5 else 1.0
        c, s = np.cos(theta), np.sin(theta)
        if a.fit and scale > 1.0:  # zoom out no further than the rotated patch fits the plane
            cover = (p - 1) * (abs(c) + abs(s)) * max(aspect, 1 / aspect)
            scale = max(1.0, min(scale, (min(img.shape) - 1) / cover))
        mat = np.array([[c, -s], [s, c]]) @ np.diag([scale * aspect, flip * scale / aspect])
        if a.fit:  # the patch inside the plane along each axis where it fits (else centred)
            half = 0.5 * (p - 1) * np.abs(mat).sum(1)
            room = np.array(img.shape) - 1 - 2 * half
            centre = np.where(room > 0, half + rng.uniform(0, 1, 2) * room,
                              (np.array(img.shape) - 1) / 2)
        else:
            centre = np.array([rng.uniform(0, img.shape[0]), rng.uniform(0, img.shape[1])])
        grid = np.stack(np.meshgrid(np.arange(p), np.arange(p), indexing="ij"), 0)
        grid = grid.reshape(2, -1) - (p - 1) / 2.0
        coords = mat @ grid + centre[:, None]
        lo = np.clip(np.floor(coords.min(1)).astype(int) - 2, 0, None)
        hi = np.minimum(np.ceil(coords.max(1)).astype(int) + 3, img.shape)
        crop = np.ascontiguousarray(img[lo[0]:hi[0], lo[1]:hi[1]])
        lcrop = np.ascontiguousarray(lab[lo[0]:hi[0], lo[1]:hi[1]])
        coords -= lo[:, None]
        if scale > 1.3:
            crop = ndi.gaussian_filter(crop, 0.4 * scale, mode="mirror")
        image = ndi.map_coordinates(crop, coords, order=1, mode="mirror").reshape(p, p)
        labs = ndi.map_coordinates(lcrop, coords, order=0, mode="mirror").reshape(p, p)
        weight = None
        if self.weights is not None:
            wcrop = np.ascontiguousarray(_plane(self.weights, plane, index)[lo[0]:hi[0], lo[1]:hi[1]])
            weight = ndi.map_coordinates(wcrop, coords, order=0, mode="mirror").reshape(p, p)
        return self._finish(image.astype(np.float32), labs, object_contrast=True, weight=weight)

    def _synthetic(self) -> dict:
        """A patch from :func:`nbapp.synth.synthetic_patch` (other EM appearances), with the
        padding band and photometric augmentations of the real patches."""
        image, labs = synthetic_patch(self.rng, self.patch, self.aug.hard_negatives_p)
        weight = None if self.weights is None else np.ones(labs.shape, np.float32)
        return self._finish(image, labs, object_contrast=False, weight=weight)

    def _finish(self, image: np.ndarray, labs: np.ndarray, object_contrast: bool,
                weight: np.ndarray | None = None) -> dict:
        """Padding band, instances (2D 8-connected components), targets and intensity
        augmentations of one patch; the sample dict of :meth:`sample`."""
        pad = self._pad_band(self.patch)
        labs[pad] = 0
        inst = cc_label(labs, connectivity=2)
        t = panoptic_targets(inst, sigma=self.sigma)
        if object_contrast:
            image = self._object_contrast(image, inst)
        out = {"image": self._photometric(image), "semantic": t.semantic.astype(np.float32),
               "heatmap": t.heatmap, "offsets": t.offsets, "fg": inst != 0, "pad": pad}
        if weight is not None:
            out["weight"] = np.where(pad, 1.0, weight).astype(np.float32)
        return out

    def with_rng(self, rng: np.random.Generator) -> "PatchSampler":
        """The same sampler (data, patch size, sigma, augmentations) drawing from ``rng``."""
        return PatchSampler(self.unit, self.labels, self.patch, rng, self.sigma, self.aug,
                            self.planes, self.weights)

    def _pad_band(self, p: int) -> np.ndarray:
        """Mask of a random band at the bottom and/or right edge that :meth:`batch` fills with
        the engine's padding value (normalised 0), with no objects in it: the engine zero-pads
        slices to a multiple of the padding factor, e.g. a 35-slice volume's xz slices to 64
        rows, and a model that never saw padding fails next to it."""
        rng, a = self.rng, self.aug
        pad = np.zeros((p, p), bool)
        if rng.random() >= a.pad_p:
            return pad
        side = int(rng.integers(3))  # 0 bottom, 1 right, 2 both
        if side in (0, 2):
            pad[p - int(rng.integers(1, int(a.pad_max * p) + 1)):] = True
        if side in (1, 2):
            pad[:, p - int(rng.integers(1, int(a.pad_max * p) + 1)):] = True
        return pad

    def _object_contrast(self, img: np.ndarray, inst: np.ndarray) -> np.ndarray:
        """Other stainings: with probability ``object_p`` the objects get darker or brighter
        against their surroundings (``object_shift``, in [0, 1] grey units) and their inner
        texture (cristae) stronger or weaker (``object_gain``), through a feathered mask so
        that no new edge appears. In Lucchi++ mitochondria are a little darker than the
        cytoplasm and lighter than membranes; osmium-heavy TEM shows them as the darkest
        structures, other preparations barely darker than their surroundings."""
        rng, a = self.rng, self.aug
        if not a.object_p or rng.random() >= a.object_p:
            return img
        fg = inst > 0
        if not fg.any():
            return img
        mask = ndi.gaussian_filter(fg.astype(np.float32), rng.uniform(0.5, 1.5))
        inner = float(img[fg].mean())
        change = rng.uniform(*a.object_shift) + (rng.uniform(*a.object_gain) - 1) * (img - inner)
        return np.clip(img + mask * change, 0, 1).astype(np.float32)

    def _photometric(self, img: np.ndarray) -> np.ndarray:
        rng, a = self.rng, self.aug
        if rng.random() < a.lowres_p:
            f = rng.uniform(2.0, 4.0)
            p = img.shape[0]
            small = F.interpolate(torch.from_numpy(img)[None, None], size=int(round(p / f)),
                                  mode="area")
            img = F.interpolate(small, size=p, mode="bilinear", align_corners=False)[0, 0].numpy()
        if rng.random() < a.blur_p:
            img = ndi.gaussian_filter(img, rng.uniform(0.5, 1.5))
        if a.shading_p and rng.random() < a.shading_p:  # uneven illumination: a linear ramp
            t = rng.uniform(0, 2 * np.pi)
            yy, xx = np.linspace(-0.5, 0.5, img.shape[0]), np.linspace(-0.5, 0.5, img.shape[1])
            ramp = np.cos(t) * yy[:, None] + np.sin(t) * xx[None, :]
            img = img * (1.0 + rng.uniform(0, a.shading_max) * ramp).astype(np.float32)
        m = float(img.mean())
        img = (img - m) * rng.uniform(*a.contrast) + m + rng.uniform(-a.brightness, a.brightness)
        img = np.clip(img, 0, 1) ** rng.uniform(*a.gamma)
        if rng.random() < a.noise_p:
            img = img + rng.normal(0, rng.uniform(0.01, a.noise_hi), img.shape)
        return np.clip(img, 0, 1).astype(np.float32)

    def batch(self, n: int, norms: dict) -> dict:
        """Stack ``n`` samples into tensors; the image is normalised with ``norms``."""
        return collate([self.sample() for _ in range(n)], norms)


def collate(items: list[dict], norms: dict) -> dict:
    """Stack :meth:`PatchSampler.sample` dicts into (N, 1, P, P) tensors (offsets (N, 2, P, P));
    the image normalised with ``norms`` and set to 0 (the engine's padding) in its pad band."""
    out = {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}
    out["image"] = ((out["image"] - norms["mean"]) / norms["std"])[:, None]
    out["image"][out.pop("pad")[:, None]] = 0.0
    for k in ("semantic", "heatmap", "fg", "weight"):
        if k in out:
            out[k] = out[k][:, None]
    return out


class _PatchStream(torch.utils.data.IterableDataset):
    """Endless stream of training batches, each DataLoader worker with its own seeded sampler.

    Worker ``i`` draws from ``numpy.random.default_rng([seed, start_step, i])``, so a run with
    the same ``--seed``, ``--workers`` and resume points is reproducible, batch order across
    workers aside (the loader takes them round-robin).
    """

    def __init__(self, template: PatchSampler, batch_size: int, norms: dict, seed: int,
                 start_step: int) -> None:
        super().__init__()
        self.template, self.batch_size, self.norms = template, batch_size, norms
        self.seed, self.start_step = seed, start_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        torch.set_num_threads(1)
        sampler = self.template.with_rng(np.random.default_rng([self.seed, self.start_step, wid]))
        while True:
            yield sampler.batch(self.batch_size, self.norms)


def batch_stream(sampler: PatchSampler, args: argparse.Namespace, norms: dict, step: int):
    """Iterator of training batches: from ``sampler`` in this process when ``args.workers`` is
    0 (bit-for-bit reproducible, also across ``--resume``), else from ``args.workers`` worker
    processes (for GPUs, where one CPU core cannot keep up)."""
    if not args.workers:
        while True:
            yield sampler.batch(args.batch_size, norms)
    stream = _PatchStream(sampler, args.batch_size, norms, args.seed, step)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                         pin_memory=torch.cuda.is_available(),
                                         prefetch_factor=4, persistent_workers=False)
    yield from loader


# ----------------------------------------------------------------------------------------- loss


def panoptic_loss(out: dict, batch: dict, hard_frac: float = 0.2, w_dice: float = 0.5,
                  w_ctr: float = 200.0, w_off: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Panoptic-DeepLab loss of network outputs (``interpolate_ins=False``) against targets.

    Parameters
    ----------
    out : dict
        ``sem_logits`` (N, 1, H, W), ``ctr_hmp`` (N, 1, H/4, W/4), ``offsets`` (N, 2, H/4, W/4).
    batch : dict
        ``semantic`` (N, 1, H, W), ``heatmap`` (N, 1, H, W), ``offsets`` (N, 2, H, W),
        ``fg`` (N, 1, H, W) bool, optionally ``weight`` (N, 1, H, W) per-pixel weights of the
        semantic term.

    Returns
    -------
    total : scalar tensor
    parts : dict of str to float
        ``sem``, ``ctr`` and ``off`` terms (weighted).
    """
    size = batch["semantic"].shape[-2:]
    logits = out["sem_logits"]
    bce = F.binary_cross_entropy_with_logits(logits, batch["semantic"], reduction="none")
    if "weight" in batch:  # e.g. pixels the user corrected count more
        bce = bce * batch["weight"]
    k = max(1, int(hard_frac * bce.numel()))
    sem = bce.flatten().topk(k).values.mean()
    prob = torch.sigmoid(logits)
    inter = (prob * batch["semantic"]).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + batch["semantic"].sum() + 1)
    sem = sem + w_dice * dice
    ctr = F.interpolate(out["ctr_hmp"], size=size, mode="bilinear", align_corners=False)
    ctr_loss = w_ctr * F.mse_loss(ctr, batch["heatmap"])
    off = F.interpolate(out["offsets"], size=size, mode="bilinear", align_corners=False)
    fg = batch["fg"].to(off.dtype)
    off_loss = w_off * ((off - batch["offsets"]).abs() * fg).sum() / (2 * fg.sum() + 1)
    total = sem + ctr_loss + off_loss
    return total, {"sem": sem.item(), "ctr": ctr_loss.item(), "off": off_loss.item()}


# ----------------------------------------------------------------------------------- validation


def _segment(sem: np.ndarray, ctr: np.ndarray, off: np.ndarray) -> np.ndarray:
    from nbapp.heads import Heads
    from nbapp.postprocess import segment_heads

    return segment_heads(Heads(sem[None], ctr, off, 1, 4))


@torch.no_grad()
def evaluate(model: torch.nn.Module, unit: np.ndarray, labels: np.ndarray, norms: dict,
             device: torch.device, every: int = 1) -> dict:
    """Validation metrics on the xy slices of a held-out block, default post-processing.

    Parameters
    ----------
    unit : (Z, Y, X) float32 in [0, 1]
    labels : (Z, Y, X) int, 3D instances (split into 2D connected components per slice)
    every : int
        Use every ``every``-th slice.

    Returns
    -------
    dict
        ``fg_iou`` over the whole block; ``f1``, ``f1@0.75``, ``pq``, ``precision``, ``recall``
        from instance counts pooled over slices.
    """
    was_training = model.training
    model.eval()
    z, h, w = unit.shape
    ph = math.ceil(h / PADDING_FACTOR) * PADDING_FACTOR
    pw = math.ceil(w / PADDING_FACTOR) * PADDING_FACTOR
    preds, gts = [], []
    for i in range(0, z, every):
        x = torch.from_numpy((unit[i] - norms["mean"]) / norms["std"])[None, None]
        x = F.pad(x, (0, pw - w, 0, ph - h)).to(device)
        o = model(x, 2, False)
        sem = torch.sigmoid(o["sem_logits"])[0, 0, :h, :w].cpu().numpy()
        ctr = o["ctr_hmp"][0, 0, : math.ceil(h / 4), : math.ceil(w / 4)].cpu().numpy()
        off = o["offsets"][0, :, : math.ceil(h / 4), : math.ceil(w / 4)].cpu().numpy()
        preds.append(_segment(sem, ctr, off))
        gts.append(cc_label(labels[i], connectivity=2))
    model.train(was_training)
    m = slice_metrics(np.stack(preds), np.stack(gts))
    keys = ("fg_iou", "f1@0.5", "pq@0.5", "f1@0.75", "pq@0.75", "precision", "recall")
    return {k: float(m[k]) for k in keys}


# --------------------------------------------------------------------------------------- export


def config_dict(norms: dict, description: str, model_file: str = "nbapp_mito.pt") -> dict:
    """The empanada-format YAML config of a model trained here."""
    return {
        "class_names": {1: "mito"},
        "labels": [1],
        "thing_list": [1],
        "model": model_file,
        # empanada-napari's "Register new model" reads this key unguarded (no quantized model)
        "model_quantized": None,
        "padding_factor": PADDING_FACTOR,
        "norms": {"mean": float(norms["mean"]), "std": float(norms["std"])},
        "description": description,
    }


#: Export-only options of ``nbapp train``'s TorchScript (the shipped model's): heat-map smoothing
#: and gating, semantic smoothing; the CLI's ``--export-*`` defaults.
EXPORT_OPTIONS = {"ctr_smooth": 1.0, "ctr_gate": True, "sem_smooth": 1.0}


def export_model(model: torch.nn.Module, path: str | Path, ctr_smooth: float = 0.0,
                 ctr_gate: bool = False, arch: dict | None = None,
                 sem_smooth: float = 0.0) -> None:
    """Save ``model`` as TorchScript (eval mode, batch norm folded into the convolutions).

    ``ctr_smooth``, ``ctr_gate`` and ``sem_smooth`` set the export-only heat-map smoothing,
    foreground gating and semantic smoothing of :class:`nbapp.models.arch.NBMitoNet` (they have
    no weights).
    """
    if ctr_smooth or ctr_gate or sem_smooth:
        shipped = build_model(**{**(arch or {}), "ctr_smooth": ctr_smooth, "ctr_gate": ctr_gate,
                                 "sem_smooth": sem_smooth})
        shipped.load_state_dict(model.state_dict())
        model = shipped
    save_torchscript(model, path)


def export_checkpoint(checkpoint: str | Path, path: str | Path, **options) -> dict:
    """Export a training checkpoint (``last.pth``, ``best.pth``) as TorchScript at ``path``, with
    :data:`EXPORT_OPTIONS` updated by ``options``; return the checkpoint."""
    unknown = set(options) - set(EXPORT_OPTIONS)
    if unknown:
        raise ParameterError(f"unknown export options {sorted(unknown)}; known: "
                             f"{sorted(EXPORT_OPTIONS)}")
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build_model(**ck["arch"])
    model.load_state_dict(ck["state_dict"])
    opts = {**EXPORT_OPTIONS, **options}
    export_model(model.eval(), path, opts["ctr_smooth"], opts["ctr_gate"], ck["arch"],
                 opts["sem_smooth"])
    return ck


def _write_yaml(cfg: dict, path: Path) -> None:
    import yaml

    class _Block(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
        style = "|" if "\n" in s else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    _Block.add_representer(str, _str)
    path.write_text(yaml.dump(cfg, Dumper=_Block, sort_keys=False, allow_unicode=True))


# --------------------------------------------------------------------------------------- recipe


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (used by ``python -m nbapp.train`` and the CLI)."""
    parser.add_argument("--raw", required=True, help="image volume (TIFF or .zarr), (Z, Y, X)")
    parser.add_argument("--labels", required=True, help="3D instance labels, same shape")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--val-slices", type=int, default=35,
                        help="last Z slices held out for validation (never trained on)")
    parser.add_argument("--steps", type=int, default=6000, help="optimiser steps (LR schedule)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256, help="patch side (multiple of 32)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of steps")
    parser.add_argument("--sigma", type=float, default=6.0, help="heat-map Gaussian sigma (px)")
    parser.add_argument("--w-ctr", type=float, default=200.0)
    parser.add_argument("--w-off", type=float, default=0.01)
    parser.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    parser.add_argument("--val-stride", type=int, default=1, help="use every Nth val slice")
    parser.add_argument("--save-minutes", type=float, default=3.0,
                        help="write last.pth at least this often")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop gracefully after this many minutes of training in total "
                             "(including minutes before --resume) and still save; the learning "
                             "rate schedule then follows max(step / steps, minutes / limit), so "
                             "it anneals in time even on a slow or busy machine")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="end this run gracefully after this many minutes (saving "
                             "last.pth) without changing the schedule; resume later")
    parser.add_argument("--resume", default=None, help="checkpoint (last.pth) to resume from")
    parser.add_argument("--init", default=None,
                        help="fine-tune: start from the weights, architecture and normalisation "
                             "of this checkpoint (.pth), or of a model nbapp exported: 'default' "
                             "(the shipped model), its .yaml config or its TorchScript file; a "
                             "fresh optimiser and schedule")
    parser.add_argument("--planes", default="xy,xz,yz",
                        help="comma-separated planes to cut training patches from: xy,xz,yz "
                             "for isotropic volumes, xy for anisotropic ones (serial sections) "
                             "or a stack of unrelated 2D images")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loading worker processes (0: sample in the training process)")
    parser.add_argument("--arch", default=None,
                        help="JSON architecture hyper-parameters overriding the defaults of "
                             "nbapp.models.arch.ARCH_DEFAULTS (ignored with --resume, which keeps "
                             "its checkpoint's; with --init only weight-free options such as "
                             "input_norm may change)")
    parser.add_argument("--export-ctr-smooth", type=float, default=EXPORT_OPTIONS["ctr_smooth"],
                        help="heat-map Gaussian smoothing (1/4-grid cells) of the exported model")
    parser.add_argument("--no-export-ctr-gate", dest="export_ctr_gate", action="store_false",
                        help="do not gate the exported heat-map by the foreground probability")
    parser.add_argument("--export-sem-smooth", type=float, default=EXPORT_OPTIONS["sem_smooth"],
                        help="Gaussian smoothing of the exported model's semantic logits "
                             "(pixels of the 1/2-resolution map; 0 = none): removes specks that "
                             "become tiny false objects")
    parser.add_argument("--zoom-out-max", type=float, default=AugmentConfig.zoom_out_hi,
                        help="largest zoom-out factor (objects shrink up to this much)")
    parser.add_argument("--zoom-in-max", type=float, default=1 / AugmentConfig.scale_lo,
                        help="largest zoom-in factor (objects grow up to this much)")
    parser.add_argument("--shading-p", type=float, default=AugmentConfig.shading_p,
                        help="probability of uneven illumination (a linear intensity ramp of "
                             f"up to +-{AugmentConfig.shading_max * 50:.0f} per cent)")
    parser.add_argument("--no-fit-patches", dest="fit_patches", action="store_false",
                        help="let patches reach beyond the plane (mirrored) anywhere and draw "
                             "zoomed-out patches from every plane (how v0.1 and v0.2 were "
                             "trained); by default patches stay inside the plane where they fit")
    parser.add_argument("--object-contrast-p", type=float, default=AugmentConfig.object_p,
                        help="probability that the objects of a patch get another contrast to "
                             "their surroundings and another inner texture (other stainings)")
    parser.add_argument("--synthetic-p", type=float, default=AugmentConfig.synthetic_p,
                        help="probability that a patch is synthetic EM with random appearance, "
                             "object sizes and distractors (nbapp.synth) instead of a real one")
    parser.add_argument("--hard-negatives-p", type=float, default=AugmentConfig.hard_negatives_p,
                        help="probability that a synthetic patch also gets unlabelled "
                             "look-alikes: vesicle clusters, multilamellar bodies, dense bodies, "
                             "dark smudges")
    parser.add_argument("--zoom-out-p", type=float, default=AugmentConfig.zoom_out_p,
                        help="probability of a zoom-out patch")
    parser.add_argument("--gamma", type=float, nargs=2, default=AugmentConfig.gamma,
                        metavar=("LO", "HI"), help="range of the random gamma of the intensities")
    parser.add_argument("--pad-p", type=float, default=AugmentConfig.pad_p,
                        help="probability of a padding band in a patch (0 disables)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 1 %."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def _parse_arch(text: str) -> dict:
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParameterError(f"--arch must be a JSON object, e.g. '{{\"depths\": [0, 1, 2, 3, "
                             f"2]}}': {exc}") from None
    if not isinstance(arch, dict):
        raise ParameterError(f"--arch must be a JSON object, got {text!r}")
    unknown = set(arch) - set(ARCH_DEFAULTS)
    if unknown:
        raise ParameterError(f"--arch: unknown hyper-parameters {sorted(unknown)}; known: "
                             f"{sorted(ARCH_DEFAULTS)}")
    return arch


def _parse_planes(text: str) -> tuple:
    planes = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in planes if p not in PLANES]
    if not planes or bad or len(set(planes)) != len(planes):
        raise ParameterError(f"--planes must list distinct planes out of xy, xz, yz separated by "
                             f"commas (e.g. xy or xy,xz,yz), got {text!r}")
    return tuple(p for p in PLANES if p in planes)


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (it holds code) rather than a torch.save file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_init(spec: str) -> dict:
    """What ``--init`` starts from: ``arch``, ``state_dict``, ``norms``, whether batch norm
    needs ``recalibrate`` (exports have it folded away; checkpoints keep it) and the
    ``pixel_size_nm`` its config records (None for checkpoints)."""
    path = Path(spec)
    export = spec == "default" or path.suffix.lower() in (".yaml", ".yml")
    if not export:
        if not path.is_file():
            raise ParameterError(f"--init {spec}: no such file; give a checkpoint (.pth), "
                                 "'default' or an nbapp model (.yaml config or TorchScript .pt)")
        export = _is_torchscript(path)
    if not export:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        return {"arch": ck["arch"], "state_dict": ck["state_dict"], "norms": ck["norms"],
                "recalibrate": False, "pixel_size_nm": None}
    from nbapp.models import load_model

    loaded = load_model(spec, device="cpu", warm_up=False)
    try:
        model, arch = from_export(loaded.module)
    except ValueError as exc:
        raise ParameterError(f"--init {spec}: {exc}") from None
    mean, std = loaded.config.norms
    # trained without the export-only smoothing and gating (re-added at export)
    return {"arch": {**arch, "ctr_smooth": 0.0, "ctr_gate": False, "sem_smooth": 0.0},
            "state_dict": model.state_dict(), "norms": {"mean": float(mean), "std": float(std)},
            "recalibrate": True, "pixel_size_nm": loaded.config.pixel_size_nm}


def _score(m: dict) -> float:
    return 0.5 * (m["fg_iou"] + m["f1@0.5"])


def run(args: argparse.Namespace) -> int:
    """Train with the options of :func:`add_arguments`; return a process exit code."""
    t_start = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.patch % PADDING_FACTOR:
        raise ParameterError(f"--patch must be a multiple of {PADDING_FACTOR}, got {args.patch}")
    from nbapp.models import resolve_device

    device = resolve_device(args.device)
    raw, labels = read_volume(args.raw), read_volume(args.labels)
    if raw.shape != labels.shape:
        raise InputError(f"raw {raw.shape} and labels {labels.shape} differ in shape")
    if args.zoom_in_max < 1.0:
        raise ParameterError(f"--zoom-in-max must be >= 1, got {args.zoom_in_max}")
    for name in ("pad_p", "zoom_out_p", "shading_p", "object_contrast_p", "synthetic_p",
                 "hard_negatives_p"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ParameterError(f"--{name.replace('_', '-')} must be a probability in [0, 1], "
                                 f"got {getattr(args, name)}")
    if not 0 < args.gamma[0] <= args.gamma[1]:
        raise ParameterError(f"--gamma needs 0 < LO <= HI, got {args.gamma[0]} {args.gamma[1]}")
    if args.zoom_out_max < AugmentConfig.scale_hi:
        raise ParameterError(f"--zoom-out-max must be >= {AugmentConfig.scale_hi}, got "
                             f"{args.zoom_out_max}")
    if not 0 < args.val_slices < raw.shape[0]:
        raise ParameterError(f"--val-slices must be in (0, {raw.shape[0]}), got {args.val_slices}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    unit, _ = to_unit_range(raw)
    labels = labels.astype(np.int32)
    split = raw.shape[0] - args.val_slices
    train_unit, train_lab = unit[:split], labels[:split]
    val_unit, val_lab = unit[split:], labels[split:]
    norms = compute_norms(train_unit)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    requested = _parse_arch(args.arch) if args.arch else {}
    arch = {**ARCH_DEFAULTS, **requested}
    planes = _parse_planes(args.planes)
    ck = torch.load(args.resume, map_location=device, weights_only=True) if args.resume else None
    init = _load_init(args.init) if args.init and not args.resume else None
    if ck is not None:
        arch = {**ARCH_DEFAULTS, **ck["arch"]}
    elif init is not None:  # the checkpoint's architecture, weight-free options from --arch
        arch = {**ARCH_DEFAULTS, **init["arch"], **requested}
    model = build_model(**arch).to(device)
    if init is not None:
        try:
            model.load_state_dict(init["state_dict"])
        except RuntimeError as exc:
            raise ParameterError(f"--init {args.init}: its weights do not fit the architecture "
                                 f"{arch}; with --init, --arch may only change weight-free "
                                 f"options (input_norm, ctr_smooth, ctr_gate, sem_smooth, "
                                 f"offset_scale). "
                                 f"{str(exc).splitlines()[0]}") from None
        norms = dict(init["norms"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, best, history, minutes_before = 0, -1.0, [], 0.0
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        step, best, history = int(ck["step"]), float(ck["best"]), list(ck["history"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        torch.set_rng_state(ck["torch_rng"].cpu())
        norms = dict(ck["norms"])
        minutes_before = float(ck["minutes"])
    sampler = PatchSampler(train_unit, train_lab, args.patch, rng, sigma=args.sigma,
                           aug=AugmentConfig(pad_p=args.pad_p, zoom_out_hi=args.zoom_out_max,
                                             zoom_out_p=args.zoom_out_p,
                                             scale_lo=1.0 / args.zoom_in_max,
                                             shading_p=args.shading_p,
                                             object_p=args.object_contrast_p,
                                             synthetic_p=args.synthetic_p,
                                             hard_negatives_p=args.hard_negatives_p,
                                             fit=args.fit_patches,
                                             gamma=tuple(args.gamma)), planes=planes)
    if init is not None and init["recalibrate"]:  # an export: real batch-norm statistics
        cal = sampler.with_rng(np.random.default_rng([args.seed, 1]))
        seen = recalibrate_batchnorm(model, (cal.batch(args.batch_size, norms)["image"].to(device)
                                             for _ in range(max(1, 32 // args.batch_size))))
        print(f"nbapp.train: from the exported model {args.init}; batch norm recalibrated on "
              f"{seen} training patches", flush=True)

    def elapsed() -> float:
        return minutes_before + (time.monotonic() - t_start) / 60
    n_params = count_parameters(model)
    print(f"nbapp.train: {n_params} parameters, norms {norms}, train z < {split}, "
          f"{args.steps} steps of {args.batch_size}x{args.patch}^2 on {device}", flush=True)

    def checkpoint(path: Path, with_opt: bool, metrics: dict | None = None) -> None:
        ck = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "arch": dict(arch), "norms": norms,
              "step": step, "best": best, "history": history, "metrics": metrics or {},
              "minutes": elapsed(),
              "padding_factor": PADDING_FACTOR}
        if with_opt:
            ck.update(optimizer=opt.state_dict(), numpy_rng=json.dumps(rng.bit_generator.state),
                      torch_rng=torch.get_rng_state())
        tmp = path.with_suffix(".tmp")
        torch.save(ck, tmp)
        tmp.replace(path)

    def validate() -> None:
        nonlocal best
        m = evaluate(model, val_unit, val_lab, norms, device, args.val_stride)
        m["step"] = step
        m["minutes"] = round(elapsed(), 2)
        history.append(m)
        msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in m.items())
        print(f"val {msg}", flush=True)
        if _score(m) > best:
            best = _score(m)
            checkpoint(out_dir / "best.pth", False, m)
            export_model(model, out_dir / "nbapp_mito.pt", args.export_ctr_smooth,
                         args.export_ctr_gate, arch, args.export_sem_smooth)
            origin = f", fine-tuned from {args.init}" if args.init else ""
            desc = (f"nbapp mitochondria model (NBMitoNet, {n_params} parameters), trained "
                    f"on {Path(args.raw).name}{origin}.\nValidation (held-out block) at step "
                    f"{step}: "
                    f"FG IoU {m['fg_iou']:.3f}, F1@0.5 {m['f1@0.5']:.3f}.\n")
            _write_yaml(config_dict(norms, desc), out_dir / "nbapp_mito.yaml")
        (out_dir / "metrics.json").write_text(json.dumps(history, indent=1))

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = None
    if tqdm is not None and not args.no_progress:
        bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, file=sys.stdout,
                   mininterval=5)
    model.train()
    last_save = time.monotonic()
    limit = args.time_limit if args.time_limit is not None else math.inf
    stop_at = (time.monotonic() + 60 * args.stop_after if args.stop_after is not None
               else math.inf)
    batches = batch_stream(sampler, args, norms, step)
    ema: dict = {}
    stopped_early = False
    while step < args.steps:
        if elapsed() >= limit or time.monotonic() >= stop_at:
            stopped_early = True
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * _lr_factor(max(step / args.steps, elapsed() / limit),
                                           args.warmup)
        b = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        out = model(b["image"], 2, False)
        loss, parts = panoptic_loss(out, b, w_ctr=args.w_ctr, w_off=args.w_off)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        for k, v in {"loss": loss.item(), **parts}.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if bar is not None:
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in ema.items()},
                             "best": f"{best:.3f}"}, refresh=False)
        elif step % 50 == 0:
            print(f"step {step} " + " ".join(f"{k}={v:.4f}" for k, v in ema.items()), flush=True)
        if step % args.val_every == 0:
            validate()
        if time.monotonic() - last_save > 60 * args.save_minutes:
            checkpoint(out_dir / "last.pth", True)
            last_save = time.monotonic()
    batches.close()
    if bar is not None:
        bar.close()
    if not history or history[-1]["step"] != step:
        validate()
    checkpoint(out_dir / "last.pth", True)
    minutes = elapsed()
    reason = ("stopped (--stop-after), resume with --resume last.pth"
              if stopped_early and elapsed() < limit else
              "time limit" if stopped_early else "done")
    print(f"nbapp.train: {reason} at step {step} after {minutes:.1f} min; best score "
          f"{best:.4f}; outputs in {out_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m nbapp.train --help``."""
    parser = argparse.ArgumentParser(prog="python -m nbapp.train", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
