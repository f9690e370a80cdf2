"""Cutting a volume into blocks and joining the objects found in each block (pure numpy).

A volume too large for one 3D job is cut into a grid of *cores* that tile it; each block job
reads its core plus a margin (the halo), segments that, and keeps the labels of its core. Two
blocks beside each other both see the strip of voxels just across their common face (one as
part of its core, the other in its margin), so an object cut by the face is one object exactly
where the two labellings of that strip agree. :func:`join_objects` unions such pieces over the
whole grid (faces, edges and corners alike), applies the 3D Min Size / Min Box Extent filters to
the joined objects and numbers them 1..N by first appearance, as the in-memory path does.

Boxes are tuples of ``(lo, hi)`` per axis, in voxels of the whole volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nbapp.errors import InputError

__all__ = ["Block", "block_grid", "splits", "grow", "to_slices", "within", "box_shape", "cut_faces",
           "filter_complete", "core_table", "edge_slabs", "slab_pairs", "mutual_pairs", "join_objects",
           "uid_base", "UID_BITS"]

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


def grow(box: tuple, by, shape: tuple) -> tuple:
    """``box`` widened by ``by`` voxels (an int, or one per axis) on each side, within
    ``shape``.

    >>> grow(((2, 4), (0, 8)), (1, 3), (10, 9))
    ((1, 5), (0, 9))
    """
    by = (by,) * len(box) if np.isscalar(by) else tuple(by)
    return tuple((max(0, lo - b), min(int(n), hi + b)) for (lo, hi), b, n in zip(box, by, shape))


def to_slices(box: tuple) -> tuple:
    return tuple(slice(lo, hi) for lo, hi in box)


def within(box: tuple, outer: tuple) -> tuple:
    """Slices that cut ``box`` out of an array that holds ``outer``."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(box, outer))


def box_shape(box: tuple) -> tuple:
    return tuple(hi - lo for lo, hi in box)


def cut_faces(region: tuple, shape: tuple) -> list[tuple[int, int]]:
    """The faces of ``region`` that cut the volume, as ``(axis, side)`` with side 0 (low) or
    -1 (high): the faces where objects may go on outside the region."""
    faces = []
    for axis, (lo, hi) in enumerate(region):
        if lo > 0:
            faces.append((axis, 0))
        if hi < shape[axis]:
            faces.append((axis, -1))
    return faces


def filter_complete(labels: np.ndarray, region: tuple, shape: tuple, min_size: int,
                    min_extent: int) -> np.ndarray:
    """The Min Size / Min Box Extent filters applied only to objects that lie wholly inside
    ``region``: an object touching a face where the volume goes on may be larger than it looks
    here, so it is kept for the filters of the joined objects to decide.

    >>> lab = np.zeros((1, 4, 6), np.int32); lab[0, 1, 0] = 1; lab[0, 1, 3] = 2
    >>> filter_complete(lab, ((0, 1), (0, 4), (4, 10)), (1, 4, 20), 2, 0)[0, 1].tolist()
    [1, 0, 0, 0, 0, 0]
    """
    from nbapp.tracking import filter_objects

    out = filter_objects(labels, min_size, min_extent)
    faces = cut_faces(region, shape)
    if not faces or np.array_equal(out, labels):
        return out
    edge = [np.unique(np.take(labels, 0 if side == 0 else labels.shape[axis] - 1, axis=axis))
            for axis, side in faces]
    keep = np.setdiff1d(np.concatenate(edge), [0])
    if keep.size:
        restore = np.isin(labels, keep)
        out[restore] = labels[restore]
    return out


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


def edge_slabs(labels: np.ndarray, region: tuple, core: tuple) -> list[tuple[tuple, np.ndarray]]:
    """The parts of ``labels`` (which cover ``region``) beyond each face of ``core``: the
    strips that the neighbouring blocks hold in their cores, with their boxes."""
    slabs = []
    for axis, ((rlo, rhi), (clo, chi)) in enumerate(zip(region, core)):
        for lo, hi in ((rlo, clo), (chi, rhi)):
            if hi > lo:
                box = tuple((lo, hi) if a == axis else r for a, r in enumerate(region))
                slabs.append((box, np.ascontiguousarray(labels[within(box, region)])))
    return slabs


def slab_pairs(mine: np.ndarray, theirs: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """Pairs ``(a, b)`` of ids (as (n, 2) int64) that are one object: two labellings of the
    same voxels (``mine`` from one block's margin, ``theirs`` from its neighbours' cores) where
    ``a`` and ``b`` share at least ``min_fraction`` of the smaller one's voxels there.

    >>> a = np.array([1, 1, 1, 2, 2, 0]); b = np.array([7, 7, 0, 9, 8, 8])
    >>> slab_pairs(a, b).tolist()
    [[1, 7], [2, 8], [2, 9]]
    """
    mine, theirs = mine.ravel().astype(np.int64), theirs.ravel().astype(np.int64)
    both = (mine != 0) & (theirs != 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    ia, na = np.unique(mine[mine != 0], return_counts=True)
    ib, nb = np.unique(theirs[theirs != 0], return_counts=True)
    pairs, nab = np.unique(np.stack([mine[both], theirs[both]], axis=1), axis=0,
                           return_counts=True)
    smaller = np.minimum(na[np.searchsorted(ia, pairs[:, 0])], nb[np.searchsorted(ib, pairs[:, 1])])
    return pairs[nab >= min_fraction * smaller]


def mutual_pairs(directed: np.ndarray) -> np.ndarray:
    """The pairs that both blocks confirm: ``(a, b)`` found in a's strips (a block's own
    object reaching into its neighbour) and ``(b, a)`` in b's. One block alone may join two
    objects its neighbour keeps apart when it sees one of them cut by its margin (its centre
    then moves towards the other); the neighbour, which sees that one whole, must agree.

    >>> mutual_pairs(np.array([[1, 7], [7, 1], [2, 8]])).tolist()
    [[1, 7]]
    """
    directed = np.asarray(directed, np.int64).reshape(-1, 2)
    if directed.size == 0:
        return directed
    both = np.unique(directed, axis=0)
    back = np.unique(both[:, ::-1], axis=0)
    keys = lambda a: a[:, 0].astype(object) * (1 << 64) + a[:, 1].astype(object)  # noqa: E731
    confirmed = np.isin(keys(both), keys(back))
    pairs = both[confirmed]
    return pairs[pairs[:, 0] < pairs[:, 1]]


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
