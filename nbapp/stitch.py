"""Cutting a volume into blocks and joining the objects found in each block (pure numpy).

A volume too large for one 3D job is cut into a grid of blocks that tile it
(:func:`block_grid`; their boxes are called *cores*). Each block writes its objects with
block-unique ids and a table of them (:func:`core_table`); :func:`join_objects` unions the
pieces of each object over the whole grid (faces, edges and corners alike), applies the 3D
Min Size / Min Box Extent filters to the joined objects and numbers them 1..N by first
appearance, as the in-memory path does.

Boxes are tuples of ``(lo, hi)`` per axis, in voxels of the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nbapp.errors import InputError

__all__ = ["Block", "block_grid", "splits", "to_slices", "box_shape", "core_table",
           "join_objects", "uid_base", "UID_BITS"]

#: Object ids of a block are stored as ``block_index << UID_BITS | local_id`` until joined.
UID_BITS = 32


@dataclass(frozen=True)
class Block:
    """One block of a grid: its number (C order over the grid), grid position and core box."""

    index: int
    position: tuple
    core: tuple

    @property
    def shape(self) -> tuple:
        return box_shape(self.core)


def splits(n: int, size: int) -> list[tuple[int, int]]:
    """``n`` voxels cut into the fewest pieces of at most ``size``, all of one length but the
    last, which is at most ``k - 1`` voxels shorter (no thin last piece: a 100-voxel axis with
    size 96 gives 50 + 50, not 96 + 4). Equal pieces are what makes each block one zarr chunk.

    >>> splits(100, 96), splits(10, 20), splits(1024, 432)
    ([(0, 50), (50, 100)], [(0, 10)], [(0, 342), (342, 684), (684, 1024)])
    """
    k = max(1, math.ceil(n / size))
    step = math.ceil(n / k)
    edges = [min(i * step, n) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def block_grid(shape: tuple, block) -> list[Block]:
    """The blocks whose cores tile a volume of ``shape``; ``block`` is the largest core side
    (an int, or one per axis).

    >>> [b.core for b in block_grid((4, 10, 10), 6)]
    [((0, 4), (0, 5), (0, 5)), ((0, 4), (0, 5), (5, 10)), ((0, 4), (5, 10), (0, 5)), ((0, 4), (5, 10), (5, 10))]
    """
    sizes = (block,) * len(shape) if np.isscalar(block) else tuple(block)
    if len(sizes) != len(shape) or min(int(s) for s in sizes) < 1:
        raise InputError(f"block size {block!r} does not fit a volume of shape {tuple(shape)}: "
                         "give one positive side or one per axis")
    axes = [splits(int(n), int(s)) for n, s in zip(shape, sizes)]
    blocks = []
    for index, position in enumerate(np.ndindex(*(len(a) for a in axes))):
        blocks.append(Block(index, tuple(int(p) for p in position),
                            tuple(axes[d][p] for d, p in enumerate(position))))
    return blocks


def to_slices(box: tuple) -> tuple:
    return tuple(slice(lo, hi) for lo, hi in box)


def box_shape(box: tuple) -> tuple:
    return tuple(hi - lo for lo, hi in box)


def uid_base(block_index: int) -> np.int64:
    """What is added to a block's local ids (1..) to make them unique in the volume."""
    return np.int64(block_index) << np.int64(UID_BITS)


def core_table(core: np.ndarray, box: tuple, shape: tuple) -> dict:
    """The objects of a block's core: local ids, voxel counts, bounding boxes (``lo``, ``hi``
    in volume coordinates) and each one's first voxel as a flat C-order index in the volume
    (the C order inside a block is the volume's, so the first voxel of the joined object is
    the smallest of its pieces')."""
    from scipy import ndimage as ndi

    from nbapp.tracking import first_voxels

    ids, first = first_voxels(core)
    if ids.size == 0:
        empty = np.zeros((0, 3), np.int64)
        return {"ids": ids, "counts": ids.copy(), "lo": empty, "hi": empty.copy(),
                "first": ids.copy(), "sums": np.zeros((0, 3))}
    m = int(ids[-1]) + 1
    counts = np.zeros(m, np.int64)
    sums = np.zeros((m, 3))
    yy, xx = np.indices(core.shape[1:])
    for z, plane in enumerate(core):  # slice by slice: no volume-sized index arrays
        flat = plane.ravel()
        n = np.bincount(flat, minlength=m)
        counts += n
        sums[:, 0] += n * z
        sums[:, 1] += np.bincount(flat, weights=yy.ravel(), minlength=m)
        sums[:, 2] += np.bincount(flat, weights=xx.ravel(), minlength=m)
    counts, sums = counts[ids], sums[ids]
    found = ndi.find_objects(core, max_label=int(ids[-1]))
    origin = np.array([lo for lo, _ in box], np.int64)
    lo = np.array([[s.start for s in found[i - 1]] for i in ids], np.int64) + origin
    hi = np.array([[s.stop for s in found[i - 1]] for i in ids], np.int64) + origin
    local = np.unravel_index(first, core.shape)
    glob = np.ravel_multi_index(tuple(c + o for c, o in zip(local, origin)), shape)
    return {"ids": ids.astype(np.int64), "counts": counts, "lo": lo, "hi": hi,
            "first": glob.astype(np.int64), "sums": sums + counts[:, None] * origin}


def join_objects(tables: dict, pairs: np.ndarray, min_size: int = 0, min_extent: int = 0
                 ) -> tuple[dict, list]:
    """Join the pieces of objects across blocks, filter, number them.

    Parameters
    ----------
    tables : {block index: core_table(...)}
    pairs : (n, 2) int64
        Pairs of block-unique ids (``uid_base(block) + local id``) that are one object.
    min_size, min_extent : int
        The 3D filters, applied to the joined objects.

    Returns
    -------
    luts : {block index: int32 array}
        ``lut[local id]`` is the object's final id (0: filtered out).
    rows : list of dict
        One per object, in id order, as :func:`nbapp.objects.object_table` gives them
        (``id``, ``voxels``, ``bbox``, ``centroid``, ``extent``).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    order = sorted(tables)
    uids = np.concatenate([uid_base(b) + tables[b]["ids"] for b in order] + [np.zeros(0, np.int64)])
    luts = {b: np.zeros(int(tables[b]["ids"].max(initial=0)) + 1, np.int32) for b in order}
    if uids.size == 0:
        return luts, []
    pick = lambda key: np.concatenate([tables[b][key] for b in order])  # noqa: E731
    counts, lo, hi, first = pick("counts"), pick("lo"), pick("hi"), pick("first")
    sums = pick("sums")
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    ends = np.searchsorted(uids, pairs)
    known = (ends < uids.size).all(axis=1)
    known[known] &= (uids[ends[known]] == pairs[known]).all(axis=1)  # pieces filtered away
    ends = ends[known]
    n = uids.size
    graph = coo_matrix((np.ones(len(ends)), (ends[:, 0], ends[:, 1])), shape=(n, n))
    k, comp = connected_components(graph, directed=False)
    size = np.bincount(comp, weights=counts, minlength=k)
    glo = np.full((k, 3), np.iinfo(np.int64).max, np.int64)
    ghi = np.zeros((k, 3), np.int64)
    gfirst = np.full(k, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(glo, comp, lo)
    np.maximum.at(ghi, comp, hi)
    np.minimum.at(gfirst, comp, first)
    gsums = np.zeros((k, 3))
    np.add.at(gsums, comp, sums)
    keep = size >= min_size
    if min_extent > 1:
        keep &= ((ghi - glo) >= min_extent).all(axis=1)
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(gfirst[kept], kind="stable")]
    final = np.zeros(k, np.int32)
    final[kept] = np.arange(1, kept.size + 1)
    at = 0
    for b in order:
        ids = tables[b]["ids"]
        luts[b][ids] = final[comp[at : at + ids.size]]
        at += ids.size
    rows = []
    for i, c in enumerate(kept, start=1):
        box = tuple(int(v) for v in glo[c]) + tuple(int(v) for v in ghi[c])
        rows.append({"id": i, "voxels": int(size[c]), "bbox": box,
                     "centroid": tuple(round(float(v) / size[c], 1) for v in gsums[c]),
                     "extent": tuple(int(v) for v in ghi[c] - glo[c])})
    return luts, rows
