"""Training data: volumes in, augmented 2D patches and their Panoptic-DeepLab targets out.

Each patch is cut from an xy, xz or yz slice (:func:`nbapp.volume.get_slice`) by a random
similarity transform (rotation, flip, scale, slight aspect change; bilinear for the image,
nearest for the labels); the labels of the patch are split into 2D connected components and
turned into targets (:func:`nbapp.training.targets.panoptic_targets`) AFTER the geometric
transform (so rotated offsets are right by construction); then the image gets photometric noise
(brightness, contrast, gamma, noise, blur, loss of resolution). A share of patches can be
synthetic EM (:mod:`nbapp.training.synth`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.measure import label as cc_label

from nbapp.errors import InputError
from nbapp.params import PLANES
from nbapp.training.params import AugmentConfig
from nbapp.training.synth import synthetic_patch
from nbapp.training.targets import panoptic_targets
from nbapp.volume import get_slice

__all__ = ["read_volume", "to_unit_range", "compute_norms", "AugmentConfig", "PatchSampler",
           "collate", "batch_stream"]


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
        img = get_slice(self.unit, plane, index)
        lab = get_slice(self.labels, plane, index)
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
            wcrop = np.ascontiguousarray(get_slice(self.weights, plane, index)[lo[0]:hi[0], lo[1]:hi[1]])
            weight = ndi.map_coordinates(wcrop, coords, order=0, mode="mirror").reshape(p, p)
        return self._finish(image.astype(np.float32), labs, object_contrast=True, weight=weight)

    def _synthetic(self) -> dict:
        """A patch from :func:`nbapp.training.synth.synthetic_patch` (other EM appearances), with the
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


def batch_stream(sampler: PatchSampler, params, norms: dict, step: int):
    """Iterator of training batches: from ``sampler`` in this process when ``params.workers``
    is 0 (bit-for-bit reproducible, also across resuming), else from ``params.workers`` worker
    processes (for GPUs, where one CPU core cannot keep up). ``params``: a
    :class:`~nbapp.training.params.TrainParams` (its workers, batch_size and seed)."""
    if not params.workers:
        while True:
            yield sampler.batch(params.batch_size, norms)
    stream = _PatchStream(sampler, params.batch_size, norms, params.seed, step)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=params.workers,
                                         pin_memory=torch.cuda.is_available(),
                                         prefetch_factor=4, persistent_workers=False)
    yield from loader
