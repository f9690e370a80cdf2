"""The block stage of a blockwise job: the in-memory job's filters and consensus, decided for
the whole volume from tables that blocks add up, then applied block by block.

1. Counting (:func:`count_block`, one part per block, on its core only): each plane's tracked
   objects (voxels, box, first voxel) and, for the ortho-plane consensus, the counts of the
   (xy, xz, yz) label combinations of its voxels (:func:`nbapp.consensus.combination_counts`).
2. Deciding (:func:`decide`, once, on those small tables): each plane's Min Size / Min Box
   Extent filters and numbering by first appearance (as :func:`nbapp.volume.filter_stack`), and
   the consensus object of every label combination (:func:`nbapp.consensus.consensus_of_counts`:
   every decision of the consensus depends on the voxels only through those counts).
3. Writing (:func:`write_block`, one part per block): each voxel's object from its labels, and
   the block's table of objects; the joining then makes one object of each id's pieces and
   applies the filters of the consensus objects (:func:`nbapp.stitch.join_objects`).

No block needs a margin, and the labels are the in-memory job's whatever the grid.
"""

from __future__ import annotations

import time

import numpy as np

from nbapp.blockwise.store import WorkStore, local_ids
from nbapp.errors import NbappError
from nbapp.params import PLANES, ConsensusParams
from nbapp.stitch import Block, core_table, to_slices

__all__ = ["count_block", "decide", "write_block", "DECISIONS"]

#: The decisions' file in the work store.
DECISIONS = "decisions.npz"


def _objects(labels: np.ndarray, box: tuple, shape: tuple) -> dict:
    """The object table (ids, voxels, box, first voxel) of one block's labels (any int ids)."""
    ids, local = local_ids(labels)
    table = core_table(local, box, shape)
    return {"ids": ids[1:], "counts": table["counts"], "lo": table["lo"],
            "hi": table["hi"], "first": table["first"]}


def count_block(read, store: WorkStore, block: Block, planes: tuple, orthoplane: bool) -> dict:
    """Step 1 on one block: its tables into ``store`` (``records/stats-BLOCK.npz``).
    ``read(plane, box)`` gives a plane's tracked labels in a box. Returns the timings."""
    from nbapp.io import write_small

    t0 = time.perf_counter()
    views = {p: np.asarray(read(p, block.core), np.int64) for p in planes}
    t1 = time.perf_counter()
    arrays = {}
    for p, v in views.items():
        for k, a in _objects(v, block.core, store.shape).items():
            arrays[f"{p}.{k}"] = a
    if orthoplane:
        from nbapp.consensus import combination_counts

        arrays["keys"], arrays["counts"] = combination_counts(*(views[p] for p in PLANES))
    write_small(store.stats_path(block.index), lambda f: np.savez_compressed(f, **arrays))
    return {"read_s": t1 - t0, "count_s": time.perf_counter() - t1}


def _filter_lut(tables: list, consensus: ConsensusParams) -> tuple[np.ndarray, np.ndarray]:
    """A plane's objects from every block's table: their sorted ids and each one's id after
    the filters, numbered by first appearance (0: filtered out), as filter_stack does."""
    ids = np.concatenate([t["ids"] for t in tables] + [np.zeros(0, np.int64)])
    if not ids.size:
        return ids, ids.copy()
    uniq, inv = np.unique(ids, return_inverse=True)
    inv = inv.reshape(-1)
    n = uniq.size
    size = np.bincount(inv, weights=np.concatenate([t["counts"] for t in tables]), minlength=n)
    lo = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((n, 3), np.int64)
    first = np.full(n, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(lo, inv, np.concatenate([t["lo"] for t in tables]))
    np.maximum.at(hi, inv, np.concatenate([t["hi"] for t in tables]))
    np.minimum.at(first, inv, np.concatenate([t["first"] for t in tables]))
    keep = size >= consensus.min_size
    if consensus.min_extent > 1:
        keep &= ((hi - lo) >= consensus.min_extent).all(axis=1)
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(first[kept], kind="stable")]
    new = np.zeros(n, np.int64)
    new[kept] = np.arange(1, kept.size + 1)
    return uniq, new


def _lookup(ids: np.ndarray, new: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` mapped through the table ``ids -> new`` (values not in ``ids``: 0)."""
    out = np.zeros(values.shape, np.int64)
    if not ids.size:
        return out
    top = int(ids[-1])
    if ids[0] >= 0 and top <= 4 * values.size + (1 << 16):  # a direct table: no search
        table = np.zeros(top + 2, np.int64)
        table[ids] = new
        return table[np.clip(values, -1, top + 1)]
    at = np.searchsorted(ids, values).clip(0, ids.size - 1)
    hit = ids[at] == values
    out[hit] = new[at[hit]]
    return out


def _combine(keys: np.ndarray, widths: tuple) -> np.ndarray:
    """(n, 3) rows of per-plane ids as one int64 key each."""
    return (keys[:, 0] * widths[1] + keys[:, 1]) * widths[2] + keys[:, 2]


def decide(store: WorkStore, planes: tuple, consensus: ConsensusParams,
           orthoplane: bool) -> dict:
    """Step 2: the filters, numbering and consensus decisions for the whole volume from
    every block's tables, written to the store (``decisions.npz``). Returns the timings."""
    from nbapp.io import write_small

    t0 = time.perf_counter()
    tables: dict = {p: [] for p in planes}
    keys, counts = [np.zeros((0, 3), np.int64)], [np.zeros(0, np.int64)]
    for block in store.grid:
        with np.load(store.stats_path(block.index)) as z:
            for p in planes:
                tables[p].append({k: z[f"{p}.{k}"] for k in ("ids", "counts", "lo", "hi",
                                                             "first")})
            if orthoplane:
                keys.append(z["keys"])
                counts.append(z["counts"])
    arrays = {}
    for p in planes:
        arrays[f"{p}.ids"], arrays[f"{p}.new"] = _filter_lut(tables[p], consensus)
    if orthoplane:
        from nbapp.consensus import consensus_of_counts

        keys, counts = np.concatenate(keys), np.concatenate(counts)
        mapped = np.stack([_lookup(arrays[f"{p}.ids"], arrays[f"{p}.new"], keys[:, a])
                           for a, p in enumerate(PLANES)], axis=1)
        widths = tuple(int(arrays[f"{p}.new"].max(initial=0)) + 1 for p in PLANES)
        if np.prod([float(w) for w in widths]) >= 2.0 ** 62:
            raise NbappError(f"too many objects for the consensus of one job "
                             f"({' x '.join(map(str, widths))} combinations of ids)")
        key = _combine(mapped, widths)
        fg = key > 0
        uniq, inv = np.unique(key[fg], return_inverse=True)
        total = np.bincount(inv.reshape(-1), weights=counts[fg], minlength=uniq.size)
        rows = np.stack([uniq // (widths[1] * widths[2]), (uniq // widths[2]) % widths[1],
                         uniq % widths[2]], axis=1)
        owner = consensus_of_counts(rows, total.astype(np.int64), consensus)
        arrays["keys"], arrays["objects"] = uniq, owner + 1
        arrays["widths"] = np.array(widths, np.int64)
    write_small(store.path / DECISIONS, lambda f: np.savez(f, **arrays))
    return {"decide_s": time.perf_counter() - t0}


def write_block(read, store: WorkStore, block: Block, planes: tuple, orthoplane: bool,
                return_stacks: bool) -> dict:
    """Step 3 on one block: its labels (and each plane's filtered stack with
    ``return_stacks``) from its tracked labels and the decisions, into ``store``. Returns the
    timings."""
    t0 = time.perf_counter()
    with np.load(store.path / DECISIONS) as z:
        dec = {k: z[k] for k in z.files}
    filtered = {p: _lookup(dec[f"{p}.ids"], dec[f"{p}.new"],
                           np.asarray(read(p, block.core), np.int64)) for p in planes}
    t1 = time.perf_counter()
    if orthoplane:
        flat = np.stack([filtered[p].reshape(-1) for p in PLANES], axis=1)
        labels = _lookup(dec["keys"], dec["objects"],
                         _combine(flat, tuple(dec["widths"]))).reshape(block.shape)
    else:
        labels = filtered[planes[0]]
    layers = {"labels": labels}
    if return_stacks:
        layers.update(filtered)
    t2 = time.perf_counter()
    store.write_global(block, layers, semantic=False)
    return {"read_s": t1 - t0, "labels_s": t2 - t1, "write_s": time.perf_counter() - t2}


def write_semantic_block(store: WorkStore, block: Block, planes: tuple, orthoplane: bool,
                         vote_threshold: int, return_stacks: bool) -> dict:
    """The voxels' classes of one block of a semantic-only job: each plane's classes and,
    ortho-plane, their vote (voxel by voxel: no table to decide). Returns the timings."""
    from nbapp.volume import _SLICE_DIVISOR, semantic_consensus

    t0 = time.perf_counter()
    stacks = {p: (np.asarray(store.raw(p)[to_slices(block.core)]) // _SLICE_DIVISOR
                  ).astype(np.int32) for p in planes}
    labels = semantic_consensus(stacks, vote_threshold) if orthoplane else stacks[planes[0]]
    layers = {"labels": labels}
    if return_stacks:
        layers.update(stacks)
    store.write_global(block, layers, semantic=True)
    return {"block_s": time.perf_counter() - t0}
