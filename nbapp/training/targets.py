"""Panoptic-DeepLab training targets ("ideal heads") from instance label images.

Pure numpy. Used to train models and, in tests, as the core oracle: a network that outputs
these heads exactly must give back the labels it was made from.

>>> import numpy as np
>>> lab = np.zeros((9, 9), np.int32); lab[2:5, 2:5] = 7
>>> t = panoptic_targets(lab, sigma=1.0)
>>> float(t.heatmap[3, 3]), int(t.semantic[3, 3]), t.offsets[:, 2, 2].tolist()
(1.0, 1, [1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PanopticTargets", "panoptic_targets", "instance_centroids"]


@dataclass(frozen=True)
class PanopticTargets:
    """Targets for one (H, W) label image.

    Attributes
    ----------
    semantic : (H, W) uint8
        Class of each pixel (1 for any labelled pixel unless ``classes`` was given).
    heatmap : (H, W) float32
        Max over instances of a Gaussian at each instance centroid, peak 1.
    offsets : (2, H, W) float32
        (dy, dx) from each instance pixel to its centroid; 0 on background.
    centroids : (K, 2) float64
        Centroid (y, x) of each instance, in the order of ``ids``.
    ids : (K,) int64
        Instance ids present in the label image, ascending.
    """

    semantic: np.ndarray
    heatmap: np.ndarray
    offsets: np.ndarray
    centroids: np.ndarray
    ids: np.ndarray


def instance_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ids, centroids)`` of the non-zero labels of an (H, W) image.

    >>> lab = np.array([[0, 2, 2], [0, 2, 2], [5, 0, 0]])
    >>> ids, c = instance_centroids(lab)
    >>> ids.tolist(), c.tolist()
    ([2, 5], [[0.5, 1.5], [2.0, 0.0]])
    """
    labels = np.asarray(labels)
    flat = labels.ravel()
    ids, inverse = np.unique(flat, return_inverse=True)
    yy, xx = np.divmod(np.arange(flat.size), labels.shape[1])
    counts = np.bincount(inverse, minlength=ids.size).astype(np.float64)
    cy = np.bincount(inverse, weights=yy, minlength=ids.size) / counts
    cx = np.bincount(inverse, weights=xx, minlength=ids.size) / counts
    keep = ids != 0
    return ids[keep].astype(np.int64), np.stack([cy[keep], cx[keep]], axis=1)


def panoptic_targets(
    labels: np.ndarray, sigma: float = 6.0, classes: np.ndarray | None = None
) -> PanopticTargets:
    """Build semantic, centre heat-map and offset targets from an (H, W) instance image.

    Parameters
    ----------
    labels : (H, W) int array
        Instance labels, 0 = background. Each id is one object (its pixels need not touch).
    sigma : float
        Standard deviation in pixels of the Gaussian placed at each centroid (6 as in
        Panoptic-DeepLab).
    classes : (H, W) int array, optional
        Semantic class of each pixel; default 1 wherever ``labels`` is non-zero.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D (H, W), got shape {labels.shape}")
    h, w = labels.shape
    ids, cents = instance_centroids(labels)
    semantic = (labels != 0).astype(np.uint8) if classes is None else np.asarray(classes, np.uint8)

    heatmap = np.zeros((h, w), np.float32)
    radius = int(np.ceil(3 * sigma))
    g = np.arange(-radius - 1, radius + 2, dtype=np.float64)
    for cy, cx in cents:
        iy, ix = int(round(cy)), int(round(cx))
        y0, y1 = max(iy - radius - 1, 0), min(iy + radius + 2, h)
        x0, x1 = max(ix - radius - 1, 0), min(ix + radius + 2, w)
        if y0 >= y1 or x0 >= x1:
            continue
        gy = np.exp(-(g[y0 - iy + radius + 1 : y1 - iy + radius + 1] ** 2) / (2 * sigma**2))
        gx = np.exp(-(g[x0 - ix + radius + 1 : x1 - ix + radius + 1] ** 2) / (2 * sigma**2))
        np.maximum(heatmap[y0:y1, x0:x1], np.outer(gy, gx).astype(np.float32),
                   out=heatmap[y0:y1, x0:x1])

    offsets = np.zeros((2, h, w), np.float32)
    if ids.size:
        lut_y = np.zeros(int(ids.max()) + 1, np.float64)
        lut_x = np.zeros_like(lut_y)
        lut_y[ids], lut_x[ids] = cents[:, 0], cents[:, 1]
        fg = labels != 0
        yy, xx = np.nonzero(fg)
        lab = labels[fg]
        offsets[0][fg] = lut_y[lab] - yy
        offsets[1][fg] = lut_x[lab] - xx
    return PanopticTargets(semantic, heatmap, offsets, cents, ids)
