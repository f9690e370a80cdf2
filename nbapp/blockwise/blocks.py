"""The block stage of a blockwise job: tracking and consensus block by block, over the
per-slice labels the network stage stored.

Each block reads every plane's per-slice labels on its core with ``halo`` voxels around it,
tracks them through the plane, filters the tracked objects (Min Size / Min Box Extent) except
those that touch a face where the volume goes on (the joined objects' filters decide those
later), runs the consensus on the whole box and writes its core and the strips just across its
faces (:data:`~nbapp.blockwise.plan.STITCH_DEPTH`) to the work store, whose joining then makes
one object of the pieces cut by block faces.
"""

from __future__ import annotations

import time

import numpy as np

from nbapp.blockwise.plan import STITCH_DEPTH, BlockParams
from nbapp.blockwise.store import WorkStore
from nbapp.params import PLANES, ConsensusParams, VolumeParams
from nbapp.stitch import Block, filter_complete, grow, to_slices, within
from nbapp.volume import _SLICE_DIVISOR, semantic_consensus, track_plane

__all__ = ["block_labels", "run_block", "consensus_block"]


def block_labels(raw, block: Block, shape: tuple, params: VolumeParams, blocks: BlockParams,
                 thing_list: tuple, timings: dict | None = None) -> tuple[dict, tuple]:
    """Tracking, filters and consensus of one block: returns ``(layers, region)``:
    ``layers["labels"]``, the labels (local ids 1..M, or classes for a semantic-only model)
    of the block's core grown by :data:`STITCH_DEPTH`, with each plane's stack of the same
    region under its name ("xy", ...) when ``params.return_stacks``; and that region's box.

    ``raw(plane, box)`` returns a plane's per-slice labels (``class * 2**20 + instance``) in
    ``box``.
    """
    timings = timings if timings is not None else {}
    region = grow(block.core, STITCH_DEPTH, shape)
    outer = grow(block.core, max(blocks.halo, STITCH_DEPTH), shape)
    cp = params.consensus
    stacks = {}
    for plane in params.planes:
        t0 = time.perf_counter()
        data = np.asarray(raw(plane, outer))
        t1 = time.perf_counter()
        if params.slice.semantic_only:
            stacks[plane] = (data // _SLICE_DIVISOR).astype(np.int32)
        else:
            stacks[plane] = filter_complete(track_plane(data, plane, thing_list), outer, shape,
                                            cp.min_size, cp.min_extent)
        del data
        timings["read_s"] = timings.get("read_s", 0.0) + t1 - t0
        timings["tracking_s"] = timings.get("tracking_s", 0.0) + time.perf_counter() - t1
    t1 = time.perf_counter()
    if params.slice.semantic_only:
        labels = (semantic_consensus(stacks, cp.vote_threshold) if params.orthoplane
                  else stacks[params.plane])
    elif params.orthoplane:
        from nbapp.consensus import orthoplane_consensus

        labels = orthoplane_consensus(stacks["xy"], stacks["xz"], stacks["yz"],
                                      cp.replace(min_size=0, min_extent=0))
    else:
        from nbapp.tracking import relabel_by_first_appearance

        labels = relabel_by_first_appearance(stacks[params.plane])
    timings["consensus_s"] = timings.get("consensus_s", 0.0) + time.perf_counter() - t1
    keep = within(region, outer)
    layers = {"labels": np.ascontiguousarray(labels[keep], np.int32)}
    if params.return_stacks:
        layers.update((p, np.ascontiguousarray(st[keep], np.int32)) for p, st in stacks.items())
    return layers, region


def run_block(store: WorkStore, block: Block, params: VolumeParams, blocks: BlockParams,
              thing_list: tuple) -> dict:
    """:func:`block_labels` from the store's per-slice labels, then the core written to the
    store and the block's record (which marks it finished). Returns the block's timings."""
    timings: dict = {}
    t0 = time.perf_counter()

    def raw(plane, box):
        return store.raw(plane)[to_slices(box)]

    layers, region = block_labels(raw, block, store.shape, params, blocks, thing_list, timings)
    t1 = time.perf_counter()
    store.write_block(block, layers, region, semantic=params.slice.semantic_only)
    timings["write_s"] = time.perf_counter() - t1
    timings["block_s"] = time.perf_counter() - t0
    return timings


def consensus_block(stacks: dict, store: WorkStore, block: Block, consensus: ConsensusParams,
                    halo: int) -> dict:
    """The ortho-plane consensus of one block from stored stacks: each stack read on the core
    with ``halo`` voxels around it, filtered (objects cut by a face spared, as in a block
    job), merged; the core and its strips written to ``store``. Returns the timings."""
    from nbapp.consensus import orthoplane_consensus

    t0 = time.perf_counter()
    shape = store.shape
    region = grow(block.core, STITCH_DEPTH, shape)
    outer = grow(block.core, halo, shape)
    views = []
    for p in PLANES:  # (the stacks' ids need not be consecutive: the consensus takes any)
        views.append(filter_complete(np.asarray(stacks[p][to_slices(outer)]), outer, shape,
                                     consensus.min_size, consensus.min_extent))
    t1 = time.perf_counter()
    labels = orthoplane_consensus(*views, consensus.replace(min_size=0, min_extent=0))
    t2 = time.perf_counter()
    store.write_block(block, {"labels": labels[within(region, outer)]}, region, semantic=False)
    return {"read_s": t1 - t0, "consensus_s": t2 - t1, "write_s": time.perf_counter() - t2,
            "block_s": time.perf_counter() - t0}
