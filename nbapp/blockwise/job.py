"""The blockwise jobs: a 3D job on a volume of any size, and the consensus of stored stacks.

:func:`blockwise_steps` runs in two stages, each resumable part by part:

1. the network stage (:mod:`nbapp.blockwise.network`): every plane's per-slice labels from
   whole slices, slab by slab, into the work store;
2. the block stage (:mod:`nbapp.blockwise.blocks`): tracking and consensus block by block over
   those labels; then the pieces are joined and written (:mod:`nbapp.blockwise.output`).

Both stages run where :mod:`nbapp.blockwise.workers` puts them (this process, worker
processes, Dask).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Generator

import numpy as np

from nbapp.blockwise.identity import (IDENTITY_VERSION, VolumeSource, file_stamp, input_id,
                                      job_identity, network_identity)
from nbapp.blockwise.network import run_slab
from nbapp.blockwise.output import join_steps, write_output
from nbapp.blockwise.plan import BlockParams, choose_block_size, slab_thickness
from nbapp.blockwise.progress import BlockProgress, BlockwiseResult
from nbapp.blockwise.store import WorkStore
from nbapp.blockwise.workers import _ConsensusTask, _Task, job_stages, parts_steps, run_part
from nbapp.errors import InputError
from nbapp.params import PLANES, ConsensusParams, VolumeParams
from nbapp.stitch import to_slices
from nbapp.volume import plane_axis, thin_stack_error, volume_intensity

__all__ = ["blockwise_steps", "consensus_blockwise_steps"]


def _check_output(output: Path) -> Path:
    output = Path(output)
    if output.suffix.lower() != ".zarr":
        raise InputError(f"a blockwise job writes OME-Zarr: give an output ending in .zarr, not "
                         f"{str(output)!r}")
    if not output.parent.is_dir():
        raise InputError(f"output folder {str(output.parent)!r} does not exist")
    return output


def blockwise_steps(engines: list, volume, output: str | os.PathLike,
                    params: VolumeParams = VolumeParams(), blocks: BlockParams = BlockParams(),
                    intensity: tuple | None = None, client=None, workers: str = "threads",
                    model=None, source: VolumeSource | None = None, voxel_size=None,
                    batch_size: int | None = None, keep_work: bool = False
                    ) -> Generator[BlockProgress, None, BlockwiseResult]:
    """The blockwise job as a generator of :class:`BlockProgress` returning a
    :class:`BlockwiseResult`; its labels are the in-memory job's (the network sees whole
    slices, and the blocks' pieces are joined where their strips agree).

    Parameters
    ----------
    engines : list of Engine
        One per device (in-process runs; the first one's model and checks otherwise).
    volume : (Z, Y, X) array
        Read lazily, a slab of whole slices or a block at a time (zarr, memory-mapped, HDF5
        dataset, numpy).
    output : path ending in ``.zarr``
        Where the labels go (OME-Zarr); the work store sits beside it until the job ends. With
        ``params.return_stacks`` each plane's stack goes beside it too
        (:func:`nbapp.io.stack_paths`: ``OUT_xy.zarr`` ...), written before the labels.
    client : dask.distributed.Client, optional
        Run one task per part on the cluster (needs ``source`` and a file ``model``).
    workers : "threads" or "processes"
        In-process (default) or one worker process per engine's device (needs ``source`` and
        a file ``model``).
    keep_work : bool
        Keep the work store: a run with other block or consensus settings then reuses its
        network outputs and tracked labels.
    """
    from nbapp.io import stack_paths
    from nbapp.volume import check_volume

    output = _check_output(output)
    if workers not in ("threads", "processes"):
        raise InputError(f"workers must be 'threads' or 'processes', got {workers!r}")
    check_volume(volume)
    shape = tuple(int(s) for s in volume.shape)
    engine = engines[0]
    thing_list = tuple(engine.model.config.thing_list)
    block_size = choose_block_size(shape, params, blocks)
    for plane in params.planes:  # every plane's slices must be large enough for the network
        ax = plane_axis(plane)
        side = tuple(int(s) for i, s in enumerate(shape) if i != ax)
        if hasattr(engine, "check_size"):
            try:
                engine.check_size(side, params.slice.downsampling,
                                  f"{plane} slice (volume {'x'.join(map(str, shape))})")
            except InputError as exc:
                raise thin_stack_error(shape, plane, params, exc) from None
    if intensity is None:
        intensity = volume_intensity(volume)
    remote = client is not None or workers == "processes"
    if remote and source is None:
        raise InputError("worker processes and Dask workers read the volume themselves: give "
                         "its file (source=VolumeSource(path))")
    if remote:
        from nbapp.cluster import model_spec_for_workers

        model_spec = model_spec_for_workers(model if model is not None else engine.model)
    # the stacks first, the labels last: the labels appear only when everything is written
    outputs = {p: path for p, path in stack_paths(output).items() if p in params.planes} \
        if params.return_stacks else {}
    outputs["labels"] = output
    store = WorkStore(output)
    from nbapp.cluster import model_identity

    model_id = model_identity(engine.model if hasattr(getattr(engine, "model", None), "config")
                              else model)
    source_id = input_id(volume, source)
    network = network_identity(source_id or "array", shape, volume.dtype, model_id, params,
                               intensity)
    thickness = {p: slab_thickness(shape, p, params, blocks.memory_budget, engine)
                 for p in params.planes}
    skipped = store.open(job_identity(network, params), shape, block_size,
                         tuple(outputs), resume=source_id is not None, network=network,
                         thickness=thickness)
    slabs_done = len(store.slabs_finished())
    try:  # the lock is held until the job ends, in any way
        if not remote:
            from nbapp.jobs import DevicePool

            pool = DevicePool(engines)  # (a worker thread per engine, as in memory)

            def heads(sub, plane, sp, intensity_):
                return pool.heads(sub, plane, sp, intensity_)

            def local(part):
                if part[0] == "slab":
                    return run_slab(heads, volume, store, part[1], part[2], params, intensity,
                                    thing_list)
                return _no_steps(run_part, store, part, params, thing_list)

            task = None
        else:
            local = None
            task = _Task(source, model_spec, batch_size or getattr(engine, "batch_size", 4),
                         str(store.path), params, intensity, thing_list,
                         model_id.get("weights"))
        timings = {}
        yield from parts_steps(store, job_stages(store, params), local, task, client,
                               [str(e.device) for e in engines], timings, store.note)
        semantic = params.slice.semantic_only
        tables = yield from _finish_steps(store, outputs, params.consensus, voxel_size, timings,
                                          semantic_scale=(params.slice.label_divisor or 1)
                                          if semantic else 0)
        if not keep_work:
            store.remove()
        rows = tables.pop("labels")
        return BlockwiseResult(output, shape, len(rows), len(store.grid), skipped, _largest(store),
                               timings, rows, {p: outputs[p] for p in tables},
                               {p: len(r) for p, r in tables.items()},
                               slabs=sum(len(s) for s in store.slabs.values()),
                               slabs_skipped=slabs_done)
    finally:
        store.unlock()


def _largest(store: WorkStore) -> tuple:
    """The largest block of the grid actually used (its first: the others are as large or
    shorter at the volume's end)."""
    return tuple(hi - lo for lo, hi in store.grid[0].core)


def _no_steps(fn, *args):
    """``fn(*args)`` as a generator with no progress (a part whose work has no steps)."""
    yield from ()
    return fn(*args)


def _finish_steps(store: WorkStore, outputs: dict, consensus: ConsensusParams, voxel_size,
                  timings: dict, semantic_scale: int = 0) -> Generator[BlockProgress, None, dict]:
    """Join and write each layer to its output (in the order given); returns each layer's
    object table."""
    tables: dict = {}
    timings.update(join_s=0.0, write_s=0.0)
    for layer, path in outputs.items():
        t0 = time.perf_counter()
        if semantic_scale:  # class ids: nothing to join; the stacks keep the class ids
            luts, found = {}, []
            scale = semantic_scale if layer == "labels" else 1
        else:
            luts, found = yield from join_steps(store, consensus, layer)
            scale = 0
        timings["join_s"] += time.perf_counter() - t0
        yield BlockProgress("blocks", "writing", 0, 1, f"writing {path.name}")
        t0 = time.perf_counter()
        write_output(store, luts, path, voxel_size, semantic_scale=scale, layer=layer)
        timings["write_s"] += time.perf_counter() - t0
        yield BlockProgress("blocks", "writing", 1, 1)
        tables[layer] = found
    return tables


def consensus_blockwise_steps(stacks: dict, output: str | os.PathLike,
                              consensus: ConsensusParams = ConsensusParams(),
                              blocks: BlockParams = BlockParams(), sources: dict | None = None,
                              client=None, voxel_size=None, keep_work: bool = False
                              ) -> Generator[BlockProgress, None, BlockwiseResult]:
    """Ortho-plane consensus from stored per-plane stacks, block by block (stacks larger than
    memory, e.g. the ``OUT_xy.zarr`` ... of a blockwise job with ``return_stacks``), as a
    generator of :class:`BlockProgress` returning a :class:`BlockwiseResult`.

    Each block counts the label combinations of its voxels, the consensus is decided for the
    whole volume from those counts (:func:`nbapp.consensus.consensus_of_counts`) and each block
    writes its objects: the labels are the in-memory consensus', voxel for voxel. Re-running it
    on the same files resumes.

    Parameters
    ----------
    stacks : {"xy", "xz", "yz"} -> (Z, Y, X) integer arrays (read lazily block by block)
    output : path ending in ``.zarr``
    consensus : ConsensusParams
        Vote threshold, permit one stack, Min Size / Min Box Extent (on the joined objects).
    blocks : BlockParams
        Block size (default: from the memory budget).
    sources : {"xy", ...} -> VolumeSource, optional
        The stacks' files: needed for a Dask ``client`` (the workers read them) and to resume.
    """
    output = _check_output(output)
    missing = [p for p in PLANES if p not in stacks]
    if missing:
        raise InputError(f"consensus needs the xy, xz and yz stacks; missing {missing}")
    shapes = {p: tuple(int(n) for n in stacks[p].shape) for p in PLANES}
    if len(set(shapes.values())) != 1 or len(shapes["xy"]) != 3:
        raise InputError(f"the stacks must be volumes (Z, Y, X) of one shape, got {shapes}: "
                         "they must come from the same volume")
    for p in PLANES:
        if not np.issubdtype(stacks[p].dtype, np.integer):
            raise InputError(f"the {p} stack must hold integer labels, got dtype "
                             f"{stacks[p].dtype}")
    if client is not None and sources is None:
        raise InputError("Dask workers read the stacks themselves: give their files "
                         "(sources={'xy': VolumeSource(path), ...})")
    shape = shapes["xy"]
    block_size = choose_block_size(shape, VolumeParams(), blocks)
    store = WorkStore(output)
    ids = {p: input_id(stacks[p], sources[p] if sources else None) for p in PLANES}
    job = {"version": IDENTITY_VERSION, "kind": "consensus", "consensus": repr(consensus),
           "stacks": {p: [ids[p] or "array", file_stamp(ids[p] or "array:"),
                          str(stacks[p].dtype)] for p in PLANES}}
    skipped = store.open(job, shape, block_size, resume=None not in ids.values())
    try:
        task = None
        local = None
        params = VolumeParams(consensus=consensus)  # (ortho-plane, the three planes)
        if client is not None:
            task = _ConsensusTask(tuple(sources[p] for p in PLANES), str(store.path), params)
        else:
            def read(plane, box):
                return stacks[plane][to_slices(box)]

            def local(part):
                return _no_steps(run_part, store, part, params, (1,), read)

        timings: dict = {}
        yield from parts_steps(store, job_stages(store, params, network=False), local, task,
                               client, [], timings, store.note)
        rows = (yield from _finish_steps(store, {"labels": output}, consensus, voxel_size,
                                         timings))["labels"]
        if not keep_work:
            store.remove()
        return BlockwiseResult(output, shape, len(rows), len(store.grid), skipped, _largest(store),
                               timings, rows, kind="consensus")
    finally:
        store.unlock()
