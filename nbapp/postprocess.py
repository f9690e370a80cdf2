"""Pure post-processing: network heads -> panoptic labels (SPEC.md section 2, steps 4-10).

Every function takes arrays and returns new arrays: no torch, no devices, no I/O. The recipe is
:func:`segment_heads`; each step is a function of its own and is tested on literal arrays.

Conventions
-----------
- Class ids: with one semantic channel (C = 1) foreground is class 1; with C > 1 the channel
  index is the class id and channel 0 is background.
- The grouping grid has ``grid_step`` model-input pixels per cell (4 coarse, 1 fine) and the
  model input is the image reduced by ``downsampling``, so one cell covers
  ``downsampling * grid_step`` original pixels. Cell ``i`` sits at input coordinate
  ``i * grid_step + (grid_step - 1) / 2``; offsets are in model-input pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import label as _cc_label

from nbapp.errors import LabelOverflowError
from nbapp.heads import Heads
from nbapp.params import SliceParams

__all__ = [
    "segment_heads",
    "semantic_classes",
    "find_centres",
    "group_pixels",
    "cells_with_foreground",
    "upsample_cells",
    "panoptic_from_instances",
    "semantic_labels",
    "fill_instance_holes",
    "count_objects",
    "STUFF_AREA",
]

#: Minimum area (pixels) of a stuff class region to be kept.
STUFF_AREA = 64

_CHUNK = 1 << 16
#: Above this many centres, grouping uses a k-d tree (ties are then broken arbitrarily).
_KDTREE_MIN_CENTRES = 32


def segment_heads(
    heads: Heads, params: SliceParams = SliceParams(), thing_list: tuple = (1,)
) -> np.ndarray:
    """Turn one image's network outputs into int32 panoptic labels at the original size.

    Parameters
    ----------
    heads : Heads
        Engine output for one (H, W) image.
    params : SliceParams
        Thresholds, min_distance, label_divisor, semantic_only, fill_holes (the network
        parameters in it are already reflected in ``heads``).
    thing_list : tuple of int
        Classes that have instances.

    Returns
    -------
    (H, W) int32
        ``class * label_divisor + instance`` (instances numbered from 1 per class in raster
        order of their first pixel); stuff classes get ``class * label_divisor``.
    """
    sem = semantic_classes(heads.sem, params.seg_threshold)
    if params.semantic_only:
        return semantic_labels(sem, params.label_divisor)
    if tuple(thing_list) == (1,) and heads.sem.shape[0] == 1:
        things = sem.view(bool)
    else:
        things = np.isin(sem, thing_list)
    factor = heads.downsampling * heads.grid_step
    centres = find_centres(heads.ctr, params.center_threshold, params.min_distance)
    cell_mask = cells_with_foreground(things, heads.ctr.shape, factor)
    cells = group_pixels(centres, heads.offsets, heads.grid_step, cell_mask)
    instances = upsample_cells(cells, sem.shape, factor)
    instances[~things] = 0
    labels = panoptic_from_instances(sem, instances, thing_list, params.label_divisor,
                                     min_fragment=(2 * 4 * heads.downsampling) ** 2)
    if params.fill_holes:
        labels = fill_instance_holes(labels)
    return labels


def semantic_classes(sem: np.ndarray, seg_threshold: float = 0.5) -> np.ndarray:
    """(C, H, W) probabilities -> (H, W) uint8 class map (step 4).

    >>> p = np.array([[[0.2, 0.5, 0.9]]], np.float32)
    >>> semantic_classes(p, 0.5).tolist()
    [[0, 1, 1]]
    >>> semantic_classes(np.array([[[0.1]], [[0.7]], [[0.2]]]), 0.9).tolist()
    [[1]]
    """
    if sem.ndim != 3:
        raise ValueError(f"semantic probabilities must be (C, H, W), got shape {sem.shape}")
    if sem.shape[0] == 1:
        return (sem[0] >= seg_threshold).astype(np.uint8)
    return np.argmax(sem, axis=0).astype(np.uint8)


def find_centres(ctr: np.ndarray, center_threshold: float = 0.1, min_distance: int = 3) -> np.ndarray:
    """Object centres on the heat-map grid by thresholding and max-pool NMS (step 5).

    A cell is a centre when its value is > ``center_threshold`` and equals the maximum of its
    ``min_distance`` x ``min_distance`` neighbourhood. Returns (K, 2) int64 (row, col) in
    raster order.

    >>> h = np.zeros((5, 5), np.float32); h[1, 1] = 0.9; h[1, 2] = 0.5; h[4, 4] = 0.3
    >>> find_centres(h, 0.1, 3).tolist()
    [[1, 1], [4, 4]]
    >>> find_centres(h, 0.1, 1).tolist()
    [[1, 1], [1, 2], [4, 4]]
    """
    hm = np.where(ctr > center_threshold, ctr, -1.0).astype(np.float32, copy=False)
    if min_distance > 1:
        peak = ndi.maximum_filter(hm, size=min_distance, mode="constant", cval=-np.inf)
        keep = (hm == peak) & (hm > 0)
    else:
        keep = hm > 0
    return np.argwhere(keep)


def cells_with_foreground(mask: np.ndarray, grid_shape: tuple, factor: int) -> np.ndarray:
    """(H, W) bool -> (h, w) bool: which grid cells cover at least one True pixel.

    >>> m = np.zeros((5, 6), bool); m[4, 5] = True
    >>> cells_with_foreground(m, (3, 3), 2).astype(int).tolist()
    [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    """
    h, w = grid_shape
    padded = np.zeros((h * factor, w * factor), bool)
    hh, ww = min(mask.shape[0], h * factor), min(mask.shape[1], w * factor)
    padded[:hh, :ww] = mask[:hh, :ww]
    if factor == 1:
        return padded
    # OR over the columns, then over the rows, of each cell (strided views: no big reductions)
    cols = padded.reshape(h * factor, w, factor)
    acc = cols[..., 0].copy()
    for k in range(1, factor):
        acc |= cols[..., k]
    rows = acc.reshape(h, factor, w)
    out = rows[:, 0].copy()
    for k in range(1, factor):
        out |= rows[:, k]
    return out


def group_pixels(
    centres: np.ndarray, offsets: np.ndarray, grid_step: int = 4, mask: np.ndarray | None = None
) -> np.ndarray:
    """Assign each grid cell to the nearest detected centre (step 6).

    Each cell's predicted centre is its position plus its offset (model-input pixels); it joins
    the nearest centre (Euclidean, ties to the lowest index; with more than 32 centres a k-d tree
    finds it, and exact ties, which real offsets practically never produce, are broken by the
    tree).

    Parameters
    ----------
    centres : (K, 2) int
        Centre cells (row, col) on the grid.
    offsets : (2, h, w) float
        (dy, dx) in model-input pixels.
    grid_step : int
        Model-input pixels per cell.
    mask : (h, w) bool, optional
        Cells to group; the others get 0.

    Returns
    -------
    (h, w) int32
        1 + index of the centre each cell joins; 0 where masked out or when K = 0.

    >>> off = np.zeros((2, 1, 4), np.float32); off[1] = [0, -1, 1, 0]
    >>> group_pixels(np.array([[0, 0], [0, 3]]), off, grid_step=1).tolist()
    [[1, 1, 2, 2]]
    """
    h, w = offsets.shape[1:]
    out = np.zeros((h, w), np.int32)
    if len(centres) == 0:
        return out
    if mask is None:
        ys, xs = np.indices((h, w)).reshape(2, -1)
    else:
        ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return out
    py = ys * float(grid_step) + offsets[0, ys, xs]
    px = xs * float(grid_step) + offsets[1, ys, xs]
    c = centres.astype(np.float64) * grid_step
    pts = np.stack([py, px], axis=1).astype(np.float64)
    if len(c) > _KDTREE_MIN_CENTRES:
        # nearest centre by k-d tree: O(cells log K) instead of O(cells K)
        best = cKDTree(c).query(pts, k=1)[1].astype(np.int32)
    else:
        # argmin_k |p - c_k|^2 = argmin_k (|c_k|^2 - 2 p.c_k); exact ties go to the lowest index
        c2 = (c * c).sum(axis=1)
        best = np.empty(ys.size, np.int32)
        step = max(1, _CHUNK * 16 // max(len(c), 1))
        for s in range(0, ys.size, step):
            d = pts[s : s + step] @ (-2.0 * c.T)
            d += c2
            best[s : s + step] = np.argmin(d, axis=1)
    out[ys, xs] = best + 1
    return out


def upsample_cells(cells: np.ndarray, shape: tuple, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a grid to ``shape``: pixel (y, x) takes cell (y//f, x//f).

    >>> upsample_cells(np.array([[1, 2]]), (2, 3), 2).tolist()
    [[1, 1, 2], [1, 1, 2]]
    """
    if factor == 1 and cells.shape == tuple(shape):
        return cells.copy()
    rows = np.arange(shape[0]) // factor
    cols = np.arange(shape[1]) // factor
    return np.take(np.take(cells, rows, axis=0), cols, axis=1)


def _majority_class(instances: np.ndarray, sem: np.ndarray, n: int) -> np.ndarray:
    """Majority semantic class of each instance index 0..n (index 0 unused)."""
    fg = instances > 0
    classes = int(sem.max()) + 1 if sem.size else 1
    if classes <= 2:
        out = np.zeros(n + 1, np.int64)
        out[1:] = 1 if classes == 2 else 0
        return out
    counts = np.bincount(instances[fg].astype(np.int64) * classes + sem[fg], minlength=(n + 1) * classes)
    return counts.reshape(n + 1, classes).argmax(axis=1)


def _fragment_merges(comps: np.ndarray, ncomp: int, inst_of: np.ndarray,
                     min_area: int = 0) -> np.ndarray:
    """Map each component to the component it is merged into (the identity when none is).

    A fragment is a connected component that touches another instance and either is not its
    instance's largest component, or has fewer than ``min_area`` pixels (smaller than the
    grouping grid can resolve). Coarse (1/4 grid) grouping leaves such slivers along
    the blocky boundary between touching objects; each joins the instance it touches most
    (smallest fragments first). Merged sets are named by their smallest component id, which is
    the one whose first pixel comes first in raster order.
    """
    parent = np.arange(ncomp + 1)
    per_inst = np.bincount(inst_of[1:])
    split = per_inst.size > 0 and per_inst.max() > 1
    if not split and min_area <= 0:
        return parent  # every instance is one component and no size rule: nothing to do
    area = np.bincount(comps.ravel(), minlength=ncomp + 1)
    area[0] = 0
    fragments = np.zeros(0, np.int64)
    if split:
        multi = np.flatnonzero(per_inst > 1)
        candidates = np.flatnonzero(np.isin(inst_of, multi))
        candidates = candidates[candidates > 0]
        # the largest component of each split instance stays; the others are fragments
        order = candidates[np.lexsort((candidates, -area[candidates], inst_of[candidates]))]
        first_of_inst = np.r_[True, inst_of[order[1:]] != inst_of[order[:-1]]]
        fragments = order[~first_of_inst]
    if min_area > 0:
        small = np.flatnonzero(area[1:] < min_area) + 1
        fragments = np.union1d(fragments, small)
    if fragments.size == 0:
        return parent

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    boxes = ndi.find_objects(comps)
    struct = np.ones((3, 3), bool)
    for f in fragments[np.argsort(area[fragments], kind="stable")]:
        sl = boxes[f - 1]
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        win = comps[sl]
        own = win == f
        ring = win[ndi.binary_dilation(own, struct) & ~own]
        ring = ring[ring > 0]
        if ring.size == 0:
            continue
        roots = np.array([find(int(c)) for c in ring])
        insts = inst_of[roots]
        mine = inst_of[find(int(f))]
        others = insts != mine
        if not others.any():
            continue
        target = np.bincount(insts[others]).argmax()
        group = {find(int(f))} | {int(r) for r in np.unique(roots[insts == target])}
        root = min(group)
        for g in group:
            parent[g] = root
    return np.array([find(c) for c in range(ncomp + 1)])


def panoptic_from_instances(
    sem: np.ndarray, instances: np.ndarray, thing_list: tuple = (1,), label_divisor: int = 10000,
    min_fragment: int = 0,
) -> np.ndarray:
    """Merge semantic classes and instance indices into panoptic labels (steps 7 and 8).

    Each instance takes the majority class of its pixels; disconnected pieces of an instance
    become separate objects (8-connectivity), except stray fragments touching another instance,
    which join the instance they touch most (so do pieces smaller than ``min_fragment`` pixels
    that touch another instance). Objects are numbered from
    ``class * label_divisor + 1`` in raster order of their first pixel; stuff classes with at
    least :data:`STUFF_AREA` pixels get ``class * label_divisor``. With ``label_divisor`` 0 all
    objects are numbered 1..N and stuff regions follow.

    >>> sem = np.array([[1, 1, 0, 1]], np.uint8)
    >>> panoptic_from_instances(sem, np.array([[2, 2, 0, 1]]), (1,), 100).tolist()
    [[101, 101, 0, 102]]
    >>> panoptic_from_instances(sem, np.array([[2, 2, 0, 1]]), (1,), 0).tolist()
    [[1, 1, 0, 2]]
    """
    instances = np.asarray(instances)
    n = int(instances.max()) if instances.size else 0
    out = np.zeros(sem.shape, np.int64)
    nobj = 0
    if n > 0:
        inst = instances.astype(np.int32, copy=False)
        comps, ncomp = _cc_label(inst, background=0, connectivity=2, return_num=True)
        inst_of = np.zeros(ncomp + 1, np.int64)
        inst_of[comps.ravel()] = inst.ravel()
        root = _fragment_merges(comps, ncomp, inst_of, min_fragment)
        inst_of = inst_of[root]  # a merged fragment takes the instance it joined
        cls_of_inst = _majority_class(instances, sem, n)
        comp_cls = cls_of_inst[inst_of]
        roots = np.flatnonzero(root == np.arange(ncomp + 1))
        roots = roots[roots > 0]  # raster order of first pixel
        new_id = np.zeros(ncomp + 1, np.int64)
        if label_divisor == 0:
            new_id[roots] = np.arange(1, roots.size + 1)
        else:
            for c in np.unique(comp_cls[roots]):
                sel = roots[comp_cls[roots] == c]
                if sel.size >= label_divisor:
                    raise LabelOverflowError(
                        f"class {int(c)} has {sel.size} instances in one image, but label_divisor "
                        f"(Max objects per class) is {label_divisor}: ids would spill into the next "
                        f"class; raise label_divisor above {sel.size}"
                    )
                new_id[sel] = int(c) * label_divisor + np.arange(1, sel.size + 1)
        nobj = roots.size
        out = new_id[root][comps]
    present = np.flatnonzero(np.bincount(sem.ravel(), minlength=2)) if sem.size else []
    stuff_classes = [c for c in present if c != 0 and c not in thing_list]
    next_id = nobj + 1
    for c in stuff_classes:
        region = sem == c
        if region.sum() >= STUFF_AREA:
            out[region] = int(c) * label_divisor if label_divisor else next_id
            next_id += 1
    return _to_int32(out)


def _to_int32(labels: np.ndarray) -> np.ndarray:
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        raise LabelOverflowError(
            f"label id {int(labels.max())} does not fit in int32; lower label_divisor"
        )
    return labels.astype(np.int32)


def semantic_labels(sem: np.ndarray, label_divisor: int = 10000) -> np.ndarray:
    """Semantic-only output: every foreground pixel gets ``class * label_divisor`` (class id if 0).

    >>> semantic_labels(np.array([[0, 1, 2]], np.uint8), 1000).tolist()
    [[0, 1000, 2000]]
    """
    sem = sem.astype(np.int64)
    return _to_int32(sem * label_divisor if label_divisor else sem)


def count_objects(labels: np.ndarray) -> int:
    """Number of distinct non-zero labels (O(pixels) for ids below 2**24).

    >>> count_objects(np.array([[0, 10001, 10001, 10002]]))
    2
    """
    if labels.size == 0:
        return 0
    top = int(labels.max())
    if top <= 0:
        return 0
    if top < 1 << 24 and labels.min() >= 0:
        return int(np.count_nonzero(np.bincount(labels.ravel(), minlength=top + 1)[1:]))
    return int(np.count_nonzero(np.unique(labels)))


def fill_instance_holes(labels: np.ndarray) -> np.ndarray:
    """Fill the holes of each object using only that object's mask (step 9, the FIX).

    Only background pixels are filled: another object inside a hole keeps its label.

    >>> lab = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 2]])
    >>> fill_instance_holes(lab).tolist()
    [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 2]]
    """
    out = labels.copy()
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return out
    compact = np.searchsorted(ids, labels) + 1
    compact[labels == 0] = 0
    for i, sl in enumerate(ndi.find_objects(compact)):
        if sl is None:
            continue
        own = compact[sl] == i + 1
        holes = ndi.binary_fill_holes(own) & ~own & (labels[sl] == 0)
        if holes.any():
            out[sl][holes] = ids[i]
    return out
