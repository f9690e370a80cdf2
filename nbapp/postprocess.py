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
- When a cell covers several pixels (coarse mode), connected components (step 8) are found on
  the grid (:func:`panoptic_from_cells`): pixels are looked at only where neighbouring cells
  meet and inside the rare cells whose pixels are several pieces. The result is the same as
  labelling the full-resolution instance image (:func:`panoptic_from_instances`, fine mode).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
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
    "cell_counts",
    "upsample_cells",
    "panoptic_from_instances",
    "panoptic_from_cells",
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
    heads: Heads, params: SliceParams = SliceParams(), thing_list: tuple = (1,),
    return_centres: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
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
    return_centres : bool
        Also return the detected centres (what the app marks on the centre heat-map).

    Returns
    -------
    (H, W) int32
        ``class * label_divisor + instance`` (instances numbered from 1 per class in raster
        order of their first pixel); stuff classes get ``class * label_divisor``.
    centres : (N, 2) int array, with ``return_centres``
        (row, column) of each centre on the heat-map's grid (none in semantic-only mode).
    """
    sem = semantic_classes(heads.sem, params.seg_threshold)
    if params.semantic_only:
        labels = semantic_labels(sem, params.label_divisor)
        return (labels, np.zeros((0, 2), np.intp)) if return_centres else labels
    one_class = tuple(thing_list) == (1,) and heads.sem.shape[0] == 1
    things = sem.view(bool) if one_class else np.isin(sem, thing_list)
    factor = int(round(heads.downsampling * heads.grid_step))  # original pixels per cell
    if factor < 1 or abs(factor - heads.downsampling * heads.grid_step) > 1e-6:
        raise ValueError(f"downsampling {heads.downsampling} x grid step {heads.grid_step} must "
                         "be a whole number of pixels (enlarging factors use the coarse grid)")
    min_fragment = int((2 * 4 * heads.downsampling) ** 2)
    centres = find_centres(heads.ctr, params.center_threshold, params.min_distance)
    grid = _cell_grid(things, heads.ctr.shape, factor)
    cells = group_pixels(centres, heads.offsets, heads.grid_step, grid.counts > 0)
    if factor > 1:
        # components found cell by cell; pixels are looked at only where cells meet
        top = int(grid.counts.any()) if one_class else None  # the largest class present
        labels = _panoptic_from_cells(sem, grid, cells, thing_list, params.label_divisor,
                                      min_fragment, top)
    else:
        instances = upsample_cells(cells, sem.shape, factor)
        instances[~things] = 0
        labels = panoptic_from_instances(sem, instances, thing_list, params.label_divisor,
                                         min_fragment)
    if params.fill_holes:
        labels = fill_instance_holes(labels)
    return (labels, centres) if return_centres else labels


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
        return (sem[0] >= seg_threshold).view(np.uint8)
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
    return cell_counts(mask, grid_shape, factor) > 0


def cell_counts(mask: np.ndarray, grid_shape: tuple, factor: int) -> np.ndarray:
    """(H, W) bool -> (h, w): how many True pixels each ``factor`` x ``factor`` grid cell covers.

    Pixels outside the grid are ignored; cells outside the mask count 0. The dtype is uint16
    (uint32 for cells of 2**16 pixels or more).

    >>> m = np.zeros((5, 6), bool); m[4, 5] = m[0, :3] = True
    >>> cell_counts(m, (3, 3), 2).tolist()
    [[2, 1, 0], [0, 0, 0], [0, 0, 1]]
    """
    h, w = grid_shape
    padded = _pad_mask(mask, (h * factor, w * factor)).view(np.uint8)
    dtype = np.uint16 if factor * factor < 1 << 16 else np.uint32
    # add up the rows, then the columns, of each cell (whole-row adds: no small reductions)
    rows = padded.reshape(h, factor, w * factor)
    acc = rows[:, 0].astype(dtype)
    for k in range(1, factor):
        acc += rows[:, k]
    cols = acc.reshape(h, w, factor)
    out = cols[..., 0].copy()
    for k in range(1, factor):
        out += cols[..., k]
    return out


def _pad_mask(mask: np.ndarray, shape: tuple) -> np.ndarray:
    """Bool ``mask`` cropped or zero-padded (bottom/right) to ``shape``; itself when it fits."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    out = np.zeros(shape, bool)
    hh, ww = min(mask.shape[0], shape[0]), min(mask.shape[1], shape[1])
    out[:hh, :ww] = mask[:hh, :ww]
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
    classes = int(sem.max()) + 1 if sem.size else 1
    if classes <= 2:
        out = np.zeros(n + 1, np.int64)
        out[1:] = 1 if classes == 2 else 0
        return out
    fg = instances > 0
    counts = np.bincount(instances[fg].astype(np.int64) * classes + sem[fg], minlength=(n + 1) * classes)
    return counts.reshape(n + 1, classes).argmax(axis=1)


def _fragments(area: np.ndarray, inst_of: np.ndarray, min_area: int) -> np.ndarray:
    """Components that may be stray fragments, in the order they are merged.

    A fragment is a component that is not its instance's largest component, or has fewer than
    ``min_area`` pixels (smaller than the grouping grid can resolve); it is merged only if it
    touches another instance (:func:`_merge_fragments`). Order: smallest first, ties in raster
    order (component id).

    Parameters
    ----------
    area : (n + 1,) int
        Pixels of each component (index 0, the background, unused).
    inst_of : (n + 1,) int
        Instance index of each component.
    """
    per_inst = np.bincount(inst_of[1:])
    fragments = np.zeros(0, np.int64)
    if per_inst.size and per_inst.max() > 1:
        candidates = np.flatnonzero(per_inst[inst_of] > 1)
        candidates = candidates[candidates > 0]
        # the largest component of each split instance stays; the others are fragments
        order = candidates[np.lexsort((candidates, -area[candidates], inst_of[candidates]))]
        first_of_inst = np.r_[True, inst_of[order[1:]] != inst_of[order[:-1]]]
        fragments = order[~first_of_inst]
    if min_area > 0:
        fragments = np.union1d(fragments, np.flatnonzero(area[1:] < min_area) + 1)
    return fragments[np.lexsort((fragments, area[fragments]))]


def _merge_fragments(fragments: np.ndarray, rings: dict,
                     inst_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge stray fragments into the instance they touch most.

    Coarse (1/4 grid) grouping leaves slivers along the blocky boundary between touching
    objects. Each fragment, in the given order, joins (together with the components of that
    instance it touches) the instance whose components own most of the pixels around it, ties
    to the lowest instance index; a fragment touching no other instance stays. Merged sets are
    named by their smallest component id, the one whose first pixel comes first in raster
    order, and take the instance the fragment joined.

    Parameters
    ----------
    fragments : (k,) int
        From :func:`_fragments`.
    rings : dict
        ``{c: [(d, pixels), ...]}``: for fragment ``c``, each other component ``d`` with the
        number of its pixels 8-adjacent to ``c``.
    inst_of : (n + 1,) int
        Instance index of each component.

    Returns
    -------
    root : (n + 1,) int64
        The component each component is merged into (itself when it is not).
    inst : (n + 1,) int64
        Instance of each set, at its root.

    >>> root, inst = _merge_fragments(np.array([3]), {3: [(1, 2), (2, 5)]}, np.array([0, 1, 2, 1]))
    >>> root.tolist(), inst[root].tolist()
    ([0, 1, 2, 2], [0, 1, 2, 2])
    """
    parent = list(range(inst_of.size))
    inst = inst_of.tolist()

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for f in fragments.tolist():
        ring = rings.get(f)
        if not ring:
            continue
        me = find(f)
        roots = [find(d) for d, _ in ring]
        votes: dict = {}
        for r, (_, pixels) in zip(roots, ring):
            if inst[r] != inst[me]:
                votes[inst[r]] = votes.get(inst[r], 0) + pixels
        if not votes:
            continue
        target = min(votes, key=lambda i: (-votes[i], i))
        group = {me} | {r for r in roots if inst[r] == target}
        root = min(group)
        for g in group:
            parent[g] = root
        inst[root] = target
    root = np.array(parent)
    while True:  # point every component at its root
        up = root[root]
        if np.array_equal(up, root):
            return root, np.array(inst, np.int64)
        root = up


def _ring_table(frag: np.ndarray, other: np.ndarray, pixels: np.ndarray) -> dict:
    """``{fragment: [(other component, pixels), ...]}`` from three parallel arrays."""
    out: dict = {}
    for f, d, n in zip(frag.tolist(), other.tolist(), pixels.tolist()):
        out.setdefault(f, []).append((d, n))
    return out


def _object_ids(root: np.ndarray, comp_cls: np.ndarray,
                label_divisor: int) -> tuple[np.ndarray, int]:
    """Panoptic id of each component (step 8 numbering) and the number of objects.

    Sets of merged components (``root``) are objects, numbered per class from
    ``class * label_divisor + 1`` in raster order of their first pixel, which is the order of
    their root ids; all from 1 when ``label_divisor`` is 0.
    """
    ncomp = root.size - 1
    roots = np.flatnonzero(root == np.arange(ncomp + 1))
    roots = roots[roots > 0]
    new_id = np.zeros(ncomp + 1, np.int64)
    if label_divisor == 0:
        new_id[roots] = np.arange(1, roots.size + 1)
    else:
        cls = comp_cls[roots]
        for c in np.unique(cls):
            sel = roots[cls == c]
            if sel.size >= label_divisor:
                raise LabelOverflowError(
                    f"class {int(c)} has {sel.size} instances in one image, but label_divisor "
                    f"(Max objects per class) is {label_divisor}: ids would spill into the next "
                    f"class; raise label_divisor above {sel.size}"
                )
            new_id[sel] = int(c) * label_divisor + np.arange(1, sel.size + 1)
    return new_id[root], int(roots.size)


def _stuff_classes(sem: np.ndarray, thing_list: tuple, top: int | None = None) -> list:
    """Stuff classes (not in ``thing_list``) present in ``sem``, in class order; ``top`` is
    ``sem.max()`` when known."""
    if top is None:
        top = int(sem.max()) if sem.size else 0
    if all(c in thing_list for c in range(1, top + 1)):
        return []  # only thing classes can be present: no pass over the image
    present = np.flatnonzero(np.bincount(sem.ravel(), minlength=2))
    return [int(c) for c in present if c != 0 and c not in thing_list]


def _check_int32(top: int) -> None:
    if top > np.iinfo(np.int32).max:
        raise LabelOverflowError(f"label id {top} does not fit in int32; lower label_divisor")


def _paint_stuff(out: np.ndarray, sem: np.ndarray, classes: list, label_divisor: int,
                 next_id: int) -> None:
    """Give each stuff region of at least :data:`STUFF_AREA` pixels its id, in place:
    ``class * label_divisor``, or the next free id from ``next_id`` when the divisor is 0."""
    for c in classes:
        region = sem == c
        if np.count_nonzero(region) >= STUFF_AREA:
            sid = c * label_divisor if label_divisor else next_id
            _check_int32(sid)
            out[region] = sid
            next_id += 1


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
    out = np.zeros(sem.shape, np.int32)
    nobj = 0
    if n > 0:
        inst = instances.astype(np.int32, copy=False)
        comps, ncomp = _cc_label(inst, background=0, connectivity=2, return_num=True)
        inst_of = np.zeros(ncomp + 1, np.int64)
        inst_of[comps.ravel()] = inst.ravel()
        area = np.bincount(comps.ravel(), minlength=ncomp + 1)
        area[0] = 0
        fragments = _fragments(area, inst_of, min_fragment)
        rings = {}
        if fragments.size:
            boxes = ndi.find_objects(comps)
            for c in fragments.tolist():
                sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[c - 1])
                win = comps[sl]
                own = win == c
                ring = win[_dilate(own) & ~own]
                touching = np.bincount(ring[ring > 0])
                near = np.flatnonzero(touching)
                rings[c] = list(zip(near.tolist(), touching[near].tolist()))
        root, group_inst = _merge_fragments(fragments, rings, inst_of)
        comp_cls = _majority_class(instances, sem, n)[group_inst[root]]
        new_id, nobj = _object_ids(root, comp_cls, label_divisor)
        _check_int32(int(new_id.max()))
        out = new_id.astype(np.int32)[comps]
    _paint_stuff(out, sem, _stuff_classes(sem, thing_list), label_divisor, nobj + 1)
    return out


def panoptic_from_cells(
    sem: np.ndarray, things: np.ndarray, cells: np.ndarray, factor: int,
    thing_list: tuple = (1,), label_divisor: int = 10000, min_fragment: int = 0,
) -> np.ndarray:
    """:func:`panoptic_from_instances` for instances given per grid cell (steps 7 and 8).

    Pixel (y, x) belongs to instance ``cells[y // factor, x // factor]`` where ``things`` is
    True. The result is the same as ``panoptic_from_instances(sem, upsample_cells(cells,
    sem.shape, factor) * things, ...)``, but components are found on the grid: a cell's pixels
    are looked at only to tell whether they are one piece and whether they touch the
    neighbouring cells' pixels, so the cost is a few passes over the (H, W) image instead of a
    labelling of it.

    Parameters
    ----------
    sem : (H, W) uint8
        Semantic classes.
    things : (H, W) bool
        Pixels of thing classes (where instances exist).
    cells : (h, w) int
        Instance index of each grid cell (0: none); ``h * factor >= H``, ``w * factor >= W``.
    factor : int
        Pixels per cell side.
    thing_list, label_divisor, min_fragment
        As for :func:`panoptic_from_instances`.

    >>> sem = np.array([[1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1]], np.uint8)
    >>> panoptic_from_cells(sem, sem > 0, np.array([[1, 1, 2]]), 2, (1,), 10).tolist()
    [[11, 11, 0, 0, 12, 12], [11, 0, 0, 0, 0, 12]]
    """
    cells = np.asarray(cells)
    grid = _cell_grid(np.asarray(things, bool), cells.shape, factor)
    inst = np.where(grid.counts > 0, cells, 0).astype(np.int32, copy=False)
    return _panoptic_from_cells(sem, grid, inst, thing_list, label_divisor, min_fragment)


@dataclass(frozen=True)
class _CellGrid:
    """A foreground mask seen through the grouping grid.

    ``fg`` is the (h * f, w * f) mask (zero-padded), ``counts`` its pixels per cell; for 4 x 4
    cells, ``pattern`` holds each cell's pixels as 16 bits (bit 4 * y + x) and ``facts`` the
    :func:`_pattern_table` entry of each pattern.
    """

    fg: np.ndarray
    f: int
    counts: np.ndarray
    pattern: np.ndarray | None = None
    facts: np.ndarray | None = None


def _cell_grid(mask: np.ndarray, grid_shape: tuple, f: int) -> _CellGrid:
    """See the (H, W) bool ``mask`` through a grid of ``grid_shape`` cells of f x f pixels."""
    h, w = grid_shape
    if mask.shape[0] > h * f or mask.shape[1] > w * f:
        raise ValueError(f"a grid of {h}x{w} cells of {f}x{f} pixels does not cover an image "
                         f"of {mask.shape[0]}x{mask.shape[1]} pixels")
    fg = np.ascontiguousarray(_pad_mask(mask, (h * f, w * f)))
    if f != 4:
        return _CellGrid(fg, f, cell_counts(fg, grid_shape, f))
    # a row of a cell is 4 bytes (0 or 1), one little-endian word; multiplying by 0x10204080
    # moves byte k's bit to bit 28 + k (no two partial products share a bit: nothing carries)
    words = fg.view("<u4").reshape(h, 4, w)
    pattern = np.zeros((h, w), np.uint32)
    for y in range(4):
        pattern |= ((words[:, y] * np.uint32(0x10204080)) >> np.uint32(28)) << np.uint32(4 * y)
    facts = _pattern_table()[pattern]
    return _CellGrid(fg, f, (facts >> 13).astype(np.uint16), pattern, facts)


@functools.lru_cache(maxsize=1)
def _pattern_table() -> np.ndarray:
    """What matters of each of the 2**16 foreground patterns of a 4 x 4 cell (bit 4 * y + x),
    packed in a uint32: bits 0-3 the first set bit, bit 4 whether the pattern is several
    8-connected pieces, bits 5-8 the left column and bits 9-12 the right column (bit y), bits
    13-17 the number of set bits."""
    p = np.arange(1 << 16, dtype=np.uint32)
    bits = ((p[:, None] >> np.arange(16, dtype=np.uint32)) & 1).astype(bool)
    rows = np.arange(4)
    left = (bits[:, 4 * rows] << rows).sum(axis=1)
    right = (bits[:, 4 * rows + 3] << rows).sum(axis=1)
    table = (bits.argmax(axis=1) | (_several_pieces(bits.reshape(-1, 4, 4)) << 4) | (left << 5)
             | (right << 9) | (bits.sum(axis=1) << 13))
    return table.astype(np.uint32)


def _cell_geometry(grid: _CellGrid) -> tuple:
    """What components need to know of the pixels of each grid cell.

    Returns
    -------
    first : (h, w) int
        Position of each cell's first foreground pixel in the cell's raster order (0 when
        empty).
    split : (h, w) bool
        Cells whose foreground is several 8-connected pieces.
    touch : tuple of bool arrays
        Neighbouring cells with 8-adjacent foreground pixels: right (h, w-1), lower (h-1, w),
        lower-right (h-1, w-1) and lower-left (h-1, w-1: cell (r, c+1) with cell (r+1, c)).
    """
    if grid.pattern is None:
        return (*_cell_pieces(grid), _cell_touch(grid))
    pat, facts = grid.pattern, grid.facts
    left, right = (facts >> 5) & 15, (facts >> 9) & 15
    top, bottom = pat & 15, pat >> 12

    def spread(x):  # a pixel and its two neighbours along the shared edge
        return x | (x << 1) | (x >> 1)

    east = (right[:, :-1] & spread(left[:, 1:])) != 0
    south = (bottom[:-1] & spread(top[1:])) != 0
    south_east = ((pat[:-1, :-1] >> 15) & pat[1:, 1:] & 1).astype(bool)
    south_west = ((pat[:-1, 1:] >> 12) & (pat[1:, :-1] >> 3) & 1).astype(bool)
    return facts & 15, (facts & 16).astype(bool), (east, south, south_east, south_west)


def _cell_pieces(grid: _CellGrid) -> tuple:
    """:func:`_cell_geometry`'s first pixel and split cells, for any cell size."""
    fg, f, counts = grid.fg, grid.f, grid.counts
    h, w = counts.shape
    first = np.zeros((h, w), np.int64)
    split = np.zeros((h, w), bool)
    pr, pc = np.nonzero((counts > 0) & (counts < f * f))  # full cells: one piece from (0, 0)
    if pr.size:
        blocks = fg.reshape(h, f, w, f)[pr, :, pc, :]
        first[pr, pc] = blocks.reshape(pr.size, -1).argmax(axis=1)
        split[pr, pc] = _several_pieces(blocks)
    return first, split


def _several_pieces(blocks: np.ndarray) -> np.ndarray:
    """(N, a, b) bool -> (N,) bool: whether each block's pixels are several 8-connected pieces."""
    n, a, b = blocks.shape
    stack = np.zeros((n, a + 1, b), bool)  # a blank row between blocks keeps them apart
    stack[:, :a] = blocks
    lab = ndi.label(stack.reshape(-1, b), np.ones((3, 3), bool))[0].reshape(n, -1)
    hi = lab.max(axis=1)
    lo = np.where(lab > 0, lab, hi[:, None]).min(axis=1)
    return hi != lo


def _cell_touch(grid: _CellGrid) -> tuple:
    """:func:`_cell_geometry`'s touching neighbours, for any cell size."""
    fg, f = grid.fg, grid.f
    h, w = grid.counts.shape
    # last column of a cell against the first column of the next, rows |dy| <= 1 apart within
    # the cell row (a pixel of the next cell row is the diagonal neighbour's business)
    right = fg[:, f - 1::f][:, : w - 1]
    left = fg[:, f::f]
    near = left.copy()
    near3, left3 = near.reshape(h, f, w - 1), left.reshape(h, f, w - 1)
    near3[:, 1:] |= left3[:, :-1]
    near3[:, :-1] |= left3[:, 1:]
    east = (right & near).reshape(h, f, w - 1).any(axis=1)
    bottom = fg[f - 1::f][: h - 1]
    top = fg[f::f]
    near = top.copy()
    near3, top3 = near.reshape(h - 1, w, f), top.reshape(h - 1, w, f)
    near3[..., 1:] |= top3[..., :-1]
    near3[..., :-1] |= top3[..., 1:]
    south = (bottom & near).reshape(h - 1, w, f).any(axis=2)
    south_east = fg[f - 1::f, f - 1::f][: h - 1, : w - 1] & fg[f::f, f::f]
    south_west = fg[f - 1::f, f::f][: h - 1] & fg[f::f, f - 1::f][:, : w - 1]
    return east, south, south_east, south_west


def _label_cells(inst: np.ndarray, touch: tuple) -> tuple[np.ndarray, np.ndarray, int]:
    """Connected components of the cell graph: (h, w) int32 labels, a map of those to the
    components (``lut[labels]``, numbered 1..n) and n.

    Two cells are linked when they have the same instance and 8-adjacent foreground pixels
    (``touch``, from :func:`_cell_geometry`). Cells are labelled by instance with
    4-connectivity, which links every pair of same-instance side neighbours; the cells of the
    rare such pairs that do not touch get a value of their own (so no link of theirs is
    assumed), and their true links, and the diagonal ones, then join labels.
    """
    east, south, south_east, south_west = touch
    occ = inst > 0
    same_e = occ[:, :-1] & (inst[:, :-1] == inst[:, 1:])
    same_s = occ[:-1] & (inst[:-1] == inst[1:])
    apart_e, apart_s = same_e & ~east, same_s & ~south
    values = inst
    special = None
    if apart_e.any() or apart_s.any():
        special = np.zeros(inst.shape, bool)
        special[:, :-1] |= apart_e
        special[:, 1:] |= apart_e
        special[:-1] |= apart_s
        special[1:] |= apart_s
        values = inst.copy()
        values[special] = inst.max() + 1 + np.arange(np.count_nonzero(special))
    lab, n = _cc_label(values, background=0, connectivity=1, return_num=True)
    lab = lab.astype(np.int32, copy=False)
    a, b = [], []

    def join(links, first, second):
        links = links & (first != second)
        a.append(first[links])
        b.append(second[links])

    if special is not None:
        join(same_e & east & (special[:, :-1] | special[:, 1:]), lab[:, :-1], lab[:, 1:])
        join(same_s & south & (special[:-1] | special[1:]), lab[:-1], lab[1:])
    # (cells of no instance are label 0 on both sides: never joined)
    join(south_east & (inst[:-1, :-1] == inst[1:, 1:]), lab[:-1, :-1], lab[1:, 1:])
    join(south_west & (inst[:-1, 1:] == inst[1:, :-1]), lab[:-1, 1:], lab[1:, :-1])
    a, b = np.concatenate(a), np.concatenate(b)
    if a.size:
        lut, n = _join_labels(n, a, b)
    else:
        lut = np.arange(n + 1, dtype=np.int32)
    return lab, lut, n


def _join_labels(n: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """Merge labels 1..n that are joined by pairs (a, b): (n + 1,) int32 map to new labels
    1..m in the order of the old ones (0 stays 0), and m.

    >>> lut, m = _join_labels(4, np.array([1, 4]), np.array([3, 3]))
    >>> lut.tolist(), m
    ([0, 1, 2, 1, 1], 2)
    """
    if a.size > 256:
        graph = coo_matrix((np.ones(a.size, np.int8), (a - 1, b - 1)), shape=(n, n))
        m, which = connected_components(graph, directed=True, connection="weak")
        _, first = np.unique(which, return_index=True)
        rank = np.empty(m, np.int32)
        rank[np.argsort(first, kind="stable")] = np.arange(1, m + 1, dtype=np.int32)
        return np.r_[0, rank[which]].astype(np.int32), m
    parent = np.arange(n + 1)
    for x, y in zip(a.tolist(), b.tolist()):  # few pairs: a union-find is cheaper
        while parent[x] != x:
            x = parent[x]
        while parent[y] != y:
            y = parent[y]
        parent[max(x, y)] = min(x, y)
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    new = np.cumsum(parent == np.arange(n + 1)) - 1  # roots renumbered 1..m in order
    return new[parent].astype(np.int32), int(new[-1])


def _upsample_mask(cells: np.ndarray, f: int, fg: np.ndarray) -> np.ndarray:
    """``cells`` repeated to f x f pixels, 0 where ``fg`` (same size) is False."""
    h, w = cells.shape
    out = np.empty((h, f, w * f), cells.dtype)
    out[...] = np.repeat(cells, f, axis=1)[:, None, :]  # widen the small grid, then copy rows
    out = out.reshape(h * f, w * f)
    np.multiply(out, fg, out=out)
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by a 3 x 3 square (8-neighbourhood), inside the array."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


@dataclass(frozen=True)
class _CellComponents:
    """Connected components of an instance image given per grid cell, mostly held per cell.

    ``cell_comp`` (h, w) is the component of each cell's foreground (0: none); a cell whose
    pixels belong to several components (-1) is drawn from ``patches``: (y0, x0, image of
    component ids) of whole labelled regions, 0 outside the region's components. ``area`` and
    ``inst`` give each component's pixels and instance (index 0 unused).
    """

    fg: np.ndarray
    f: int
    cell_comp: np.ndarray
    patches: list
    area: np.ndarray
    inst: np.ndarray

    def paint(self, ids: np.ndarray) -> np.ndarray:
        """(h * f, w * f) int32 image of ``ids[component]`` (0 on background)."""
        lut = np.append(ids, 0).astype(np.int32)  # cells drawn from patches (-1) -> 0
        out = _upsample_mask(lut[self.cell_comp], self.f, self.fg)
        for y0, x0, patch in self.patches:
            mine = patch > 0
            out[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]][mine] = lut[patch[mine]]
        return out

    def comp_at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Component of pixels (ys, xs) (0: background)."""
        f = self.f
        out = np.where(self.fg[ys, xs], self.cell_comp[ys // f, xs // f], 0)
        mixed = np.flatnonzero(out < 0)
        for y0, x0, patch in self.patches if mixed.size else ():
            py, px = ys[mixed] - y0, xs[mixed] - x0
            inside = (py >= 0) & (py < patch.shape[0]) & (px >= 0) & (px < patch.shape[1])
            val = patch[py[inside], px[inside]]
            out[mixed[inside][val > 0]] = val[val > 0]
        return out

    def rings(self, comps: np.ndarray) -> dict:
        """For each component in ``comps``: the other components with their number of pixels
        8-adjacent to it, as ``{c: [(d, pixels), ...]}``."""
        f = self.f
        height, width = self.fg.shape
        wanted = np.zeros(self.area.size + 1, bool)
        wanted[comps] = True
        wanted[-1] = True  # cells of several components (-1): look at their pixels
        cells = np.flatnonzero(wanted[self.cell_comp.ravel()])
        r, c = np.divmod(cells, self.cell_comp.shape[1])
        k = np.arange(f)
        ys, xs = np.broadcast_arrays((r * f)[:, None, None] + k[:, None],
                                     (c * f)[:, None, None] + k)
        ys, xs = ys.ravel(), xs.ravel()
        own = self.comp_at(ys, xs)
        keep = wanted[own] & (own > 0)
        ys, xs, own = ys[keep], xs[keep], own[keep]
        dy = np.array([-1, -1, -1, 0, 0, 1, 1, 1])
        dx = np.array([-1, 0, 1, -1, 1, -1, 0, 1])
        qy, qx = (ys[:, None] + dy).ravel(), (xs[:, None] + dx).ravel()
        own = np.repeat(own, 8)
        keep = (qy >= 0) & (qy < height) & (qx >= 0) & (qx < width)
        qy, qx, own = qy[keep], qx[keep], own[keep]
        near = self.comp_at(qy, qx)
        keep = (near > 0) & (near != own)
        # a ring pixel counts once per component it surrounds
        key = np.unique((own[keep].astype(np.int64) * height + qy[keep]) * width + qx[keep])
        own, pix = np.divmod(key, height * width)
        near = self.comp_at(pix // width, pix % width)
        pair, pixels = np.unique(own * (self.area.size + 1) + near, return_counts=True)
        return _ring_table(*np.divmod(pair, self.area.size + 1), pixels)


def _cell_components(grid: _CellGrid, inst: np.ndarray, width: int) -> _CellComponents:
    """8-connected components of the instance image ``upsample(inst) * fg``, numbered in raster
    order of their first pixel (``width``: the image width, for raster positions)."""
    fg, f = grid.fg, grid.f
    h, w = inst.shape
    first, split, touch = _cell_geometry(grid)
    labels, lut, n = _label_cells(inst, touch)
    idx = np.flatnonzero(inst)
    lab = lut[labels.ravel()[idx]]
    area = np.bincount(lab, weights=grid.counts.ravel()[idx], minlength=n + 1).astype(np.int64)
    pinst = np.zeros(n + 1, np.int64)
    pinst[lab] = inst.ravel()[idx]
    r, c = np.divmod(idx, w)
    k = first.ravel()[idx]
    pfirst = np.full(n + 1, np.iinfo(np.int64).max)
    np.minimum.at(pfirst, lab, (r * f + k // f) * width + c * f + k % f)
    # the components of the cell graph are the answer, except those with a cell whose pixels
    # are several pieces: such a region is labelled pixel by pixel
    bad = np.unique(lab[split.ravel()[idx]])
    keep = np.ones(n + 1, bool)
    keep[0] = False
    keep[bad] = False
    good = np.flatnonzero(keep)
    firsts, areas, insts = [pfirst[good]], [area[good]], [pinst[good]]
    regions = []
    struct = np.ones((3, 3), bool)
    in_bad = np.isin(lab, bad)
    for p in bad.tolist():
        mine = in_bad.copy()
        mine[in_bad] = lab[in_bad] == p
        r0, r1, c0, c1 = r[mine].min(), r[mine].max() + 1, c[mine].min(), c[mine].max() + 1
        own = lut[labels[r0:r1, c0:c1]] == p
        sub, m = ndi.label(_upsample_mask(own, f, fg[r0 * f : r1 * f, c0 * f : c1 * f]), struct)
        flat = sub.ravel()
        at = np.flatnonzero(flat)
        ids = flat[at]
        start = np.full(m + 1, flat.size)
        np.minimum.at(start, ids, at)
        y, x = np.divmod(start[1:], sub.shape[1])
        firsts.append((r0 * f + y) * width + c0 * f + x)
        areas.append(np.bincount(ids, minlength=m + 1)[1:])
        insts.append(np.full(m, pinst[p]))
        regions.append((r0, r1, c0, c1, own, sub, m))
    order = np.argsort(np.concatenate(firsts), kind="stable")
    ncomp = order.size
    comp_of_entry = np.empty(ncomp, np.int32)
    comp_of_entry[order] = np.arange(1, ncomp + 1, dtype=np.int32)
    proto_comp = np.zeros(n + 1, np.int32)
    proto_comp[good] = comp_of_entry[: good.size]
    proto_comp[bad] = -1
    cell_comp = proto_comp[lut][labels]
    patches = []
    start = good.size
    for r0, r1, c0, c1, own, sub, m in regions:
        sub_comp = np.r_[0, comp_of_entry[start : start + m]].astype(np.int32)
        start += m
        pix = sub.reshape(r1 - r0, f, c1 - c0, f)
        hi = pix.max(axis=(1, 3))
        lo = np.where(pix > 0, pix, m + 1).min(axis=(1, 3))
        whole = own & (hi == lo)  # cells that lie in one component
        cell_comp[r0:r1, c0:c1][whole] = sub_comp[hi[whole]]
        patches.append((r0 * f, c0 * f, sub_comp[sub]))
    comp_area = np.r_[0, np.concatenate(areas)[order]].astype(np.int64)
    comp_inst = np.r_[0, np.concatenate(insts)[order]].astype(np.int64)
    return _CellComponents(fg, f, cell_comp, patches, comp_area, comp_inst)


def _panoptic_from_cells(sem: np.ndarray, grid: _CellGrid, inst: np.ndarray, thing_list: tuple,
                         label_divisor: int, min_fragment: int,
                         top: int | None = None) -> np.ndarray:
    """:func:`panoptic_from_cells` with the foreground already seen through the grid.

    ``inst`` (h, w) int32 is 0 where a cell has no foreground; ``top`` is ``sem.max()`` when
    known.
    """
    height, width = sem.shape
    if top is None:
        top = int(sem.max()) if sem.size else 0
    nobj = 0
    if inst.any():
        comps = _cell_components(grid, inst, width)
        fragments = _fragments(comps.area, comps.inst, min_fragment)
        rings = comps.rings(fragments) if fragments.size else {}
        root, group_inst = _merge_fragments(fragments, rings, comps.inst)
        n = int(inst.max())
        if top > 1:  # several classes: the majority class needs the pixels
            pixels = _upsample_mask(inst, grid.f, grid.fg)[:height, :width]
            cls_of_inst = _majority_class(pixels, sem, n)
        else:
            cls_of_inst = np.r_[0, np.full(n, top, np.int64)]
        new_id, nobj = _object_ids(root, cls_of_inst[group_inst[root]], label_divisor)
        _check_int32(int(new_id.max()))
        out = comps.paint(new_id)
        if out.shape != sem.shape:
            out = np.ascontiguousarray(out[:height, :width])
    else:
        out = np.zeros(sem.shape, np.int32)
    _paint_stuff(out, sem, _stuff_classes(sem, thing_list, top), label_divisor, nobj + 1)
    return out


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
        ids = labels.ravel()
        ids = ids[ids != 0]  # most pixels are background: a cheaper count
        return int(np.count_nonzero(np.bincount(ids, minlength=top + 1)))
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
