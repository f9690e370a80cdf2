"""The tracking stage of a blockwise job: each plane's per-slice labels linked into 3D objects
through whole slices, a slice at a time, as :func:`nbapp.volume.track_plane` links them in
memory (a forward pass, then a backward pass; :func:`nbapp.tracking.forward_step`).

Only two slices per thing class are held at a time (and the slab being read or written); the
forward labels are kept in the work store between the passes (``class index << 40 | id``).
The tracked ids are unique in the plane (each class's after the previous classes'); the
block stage renumbers them as the in-memory job does (by first appearance, after the
filters).
"""

from __future__ import annotations

import time

import numpy as np

from nbapp.blockwise.store import WorkStore
from nbapp.stitch import to_slices
from nbapp.tracking import backward_step, forward_step
from nbapp.volume import _SLICE_DIVISOR, plane_axis

__all__ = ["run_tracking", "CLASS_SHIFT"]

#: Tracked ids of the k-th thing class are ``k << CLASS_SHIFT | id``.
CLASS_SHIFT = 40


def _classes(sl: np.ndarray, thing_list: tuple) -> list:
    """Each thing class's part of one flat slice of per-slice labels."""
    if len(thing_list) == 1:
        c = thing_list[0]
        return [np.where(sl // _SLICE_DIVISOR == c, sl, 0)]
    cls = sl // _SLICE_DIVISOR
    return [np.where(cls == c, sl, 0) for c in thing_list]


def run_tracking(store: WorkStore, plane: str, thing_list: tuple) -> dict:
    """Track ``plane``'s per-slice labels in ``store`` into its tracked stack, then mark the
    plane done. Returns the timings."""
    t0 = time.perf_counter()
    ax = plane_axis(plane)
    raw, fwd = store.raw(plane), store.tracked(plane, "forward", "r+")
    side = tuple(s for a, s in enumerate(store.shape) if a != ax)
    area = side[0] * side[1]
    k = len(thing_list)
    prev = [np.zeros(area, np.int64) for _ in range(k)]
    next_label = [1] * k
    for s in range(len(store.slabs[plane])):
        box = store.slab_box(plane, s)
        data = np.moveaxis(np.asarray(raw[to_slices(box)]), ax, 0)
        out = np.zeros(data.shape, np.int64)
        for i in range(data.shape[0]):
            flat = out[i].reshape(-1)
            for c, part in enumerate(_classes(data[i].reshape(-1).astype(np.int64), thing_list)):
                prev[c], next_label[c] = forward_step(prev[c], part, next_label[c])
                fg = prev[c] != 0
                flat[fg] = prev[c][fg] | (c << CLASS_SHIFT)
        fwd[to_slices(box)] = np.moveaxis(out, 0, ax)
    t1 = time.perf_counter()
    final = store.tracked(plane, "tracked", "r+")
    # each class's ids follow the previous classes' (small ids: blocks count them by table)
    offset = np.cumsum([0] + [n - 1 for n in next_label[:-1]])
    nxt: list = [None] * k
    for s in reversed(range(len(store.slabs[plane]))):
        box = store.slab_box(plane, s)
        data = np.moveaxis(np.asarray(fwd[to_slices(box)]), ax, 0)
        out = np.zeros(data.shape, np.int64)
        for i in reversed(range(data.shape[0])):
            flat, src = out[i].reshape(-1), data[i].reshape(-1)
            for c in range(k):
                part = np.where((src >> CLASS_SHIFT == c) & (src != 0),
                                src & ((1 << CLASS_SHIFT) - 1), 0)
                nxt[c] = part if nxt[c] is None else backward_step(nxt[c], part)
                fg = nxt[c] != 0
                flat[fg] = nxt[c][fg] + offset[c]
        final[to_slices(box)] = np.moveaxis(out, 0, ax)
    store.mark_tracked(plane)
    return {"forward_s": t1 - t0, "backward_s": time.perf_counter() - t1}
