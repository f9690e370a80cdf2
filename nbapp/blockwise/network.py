"""The network stage of a blockwise job: per-slice labels of whole slices, slab by slab.

A slab is up to :data:`~nbapp.blockwise.plan.MAX_SLAB` consecutive slices of one plane. Its
job reads those slices whole (with the median's neighbours on each side), runs the network,
the median over slices and the 2D post-processing exactly as the in-memory job does
(:func:`nbapp.volume.plane_stack_steps`), and writes the slices' labels into the work store.
The network therefore never sees a piece of a slice: its per-image standardisation, its global
pooling and its receptive field see what they see in memory, and the labels of a slice do not
depend on the block size, the memory budget or the number of workers.
"""

from __future__ import annotations

import time
from typing import Generator

import numpy as np

from nbapp.blockwise.progress import BlockProgress
from nbapp.blockwise.store import WorkStore
from nbapp.params import VolumeParams
from nbapp.stitch import to_slices
from nbapp.volume import _SLICE_DIVISOR, plane_axis, plane_stack_steps

__all__ = ["run_slab"]


def run_slab(heads_source, volume, store: WorkStore, plane: str, k: int, params: VolumeParams,
             intensity: tuple, thing_list: tuple) -> Generator[BlockProgress, None, dict]:
    """Per-slice labels of slab ``k`` of ``plane`` into ``store``; yields a report per slice,
    returns the slab's timings.

    ``heads_source(data, plane, slice_params, intensity)`` yields ``(i, Heads)`` for every
    slice of ``data`` in ``plane`` (one engine, or the device pool).
    """
    timings: dict = {}
    t0 = time.perf_counter()
    ax = plane_axis(plane)
    lo, hi = store.slabs[plane][k]
    r = (params.median_size - 1) // 2
    first, last = max(0, lo - r), min(store.shape[ax], hi + r)
    box = tuple((first, last) if a == ax else (0, n) for a, n in enumerate(store.shape))
    data = np.asarray(volume[to_slices(box)])
    timings["read_s"] = time.perf_counter() - t0
    sp = params.slice.replace(label_divisor=_SLICE_DIVISOR)
    gen = plane_stack_steps(heads_source(data, plane, sp, intensity), data.shape, plane, params,
                            thing_list, timings)
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            raw = stop.value
            break
        yield BlockProgress(plane, "network", p.done, p.total)
    keep = tuple(slice(lo - first, hi - first) if a == ax else slice(None) for a in range(3))
    t1 = time.perf_counter()
    store.write_slab(plane, k, np.ascontiguousarray(raw[keep]))
    timings["write_s"] = time.perf_counter() - t1
    timings["slab_s"] = time.perf_counter() - t0
    return timings
