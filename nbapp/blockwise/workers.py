"""Where a blockwise job's parts run: in this process, in one worker process per device, or
as Dask tasks; and the loop that runs every part not finished yet, slabs before blocks.

A *part* is ``("slab", plane, k)`` (the network stage: :func:`~nbapp.blockwise.network.run_slab`)
or ``("block", index)`` (the block stage: :func:`~nbapp.blockwise.blocks.run_block`, or
:func:`~nbapp.blockwise.blocks.consensus_block` from stored stacks). Every block needs the
per-slice labels of every plane around it, so all slabs finish before the first block starts.
"""

from __future__ import annotations

import operator
import os
import time
from dataclasses import dataclass
from typing import Generator

from nbapp.blockwise.blocks import count_block, write_block, write_semantic_block
from nbapp.blockwise.identity import VolumeSource
from nbapp.blockwise.network import run_slab
from nbapp.blockwise.progress import BlockProgress
from nbapp.blockwise.store import WorkStore
from nbapp.blockwise.tracks import run_tracking
from nbapp.errors import NbappError
from nbapp.params import PLANES, VolumeParams
from nbapp.stitch import to_slices

__all__ = ["parts_steps", "usable_cores"]


@dataclass(frozen=True)
class _Task:
    """Everything a worker (process or Dask) needs to run parts of one job."""

    source: VolumeSource
    model: str
    batch_size: int
    store: str
    params: VolumeParams
    intensity: tuple
    thing_list: tuple
    #: sha256 of the model's weights when the job started (a worker refuses another file)
    digest: str | None = None

    def run(self, part: tuple) -> dict:
        """Run ``part`` in this worker: open the store (and for a slab the volume and this
        worker's engine), compute, write. Returns the part's timings."""
        store = WorkStore.attach(self.store)
        if part[0] != "slab":
            return run_part(store, part, self.params, self.thing_list)
        from nbapp.cluster import worker_engine
        from nbapp.volume import sequential_heads

        engine = worker_engine(self.model, self.batch_size, _DEVICE[0] if _DEVICE else None,
                               self.digest)

        def heads(sub, plane, sp, intensity):
            return sequential_heads(engine, sub, plane, sp, intensity)

        return _drained(run_slab(heads, self.source.open(), store, part[1], part[2],
                                 self.params, self.intensity, self.thing_list))


def run_part(store: WorkStore, part: tuple, params: VolumeParams, thing_list: tuple,
             read=None) -> dict:
    """Run one part after the network stage: ``("track", plane)``, ``("stats", block)`` or
    ``("block", block)``. ``read(plane, box)`` gives a plane's tracked labels (default: the
    store's)."""
    if part[0] == "track":
        return run_tracking(store, part[1], thing_list)
    planes = params.planes
    block = store.grid[part[1]]
    if params.slice.semantic_only:
        return write_semantic_block(store, block, planes, params.orthoplane,
                                    params.consensus.vote_threshold, params.return_stacks)
    read = read or (lambda plane, box: store.tracked(plane)[to_slices(box)])
    if part[0] == "stats":
        return count_block(read, store, block, planes, params.orthoplane)
    return write_block(read, store, block, planes, params.orthoplane, params.return_stacks)


@dataclass(frozen=True)
class _ConsensusTask:
    """Everything a worker needs to run the consensus of blocks from stored stacks."""

    sources: tuple  # VolumeSource of the xy, xz and yz stacks
    store: str
    params: VolumeParams

    def run(self, part: tuple) -> dict:
        store = WorkStore.attach(self.store)
        stacks = {p: s.open() for p, s in zip(PLANES, self.sources)}
        return run_part(store, part, self.params, (1,),
                        lambda plane, box: stacks[plane][to_slices(box)])


#: The device of this worker process (set by its initializer; empty outside worker processes).
_DEVICE: list = []


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _init_process_worker(devices, threads: int) -> None:
    """Initializer of a worker process: take one device from the shared queue, and use
    ``threads`` CPU threads (each process would otherwise start one per core: two processes on
    two cores ran their blocks 12x slower than one process, their threads fighting)."""
    import torch

    _DEVICE.append(devices.get())
    torch.set_num_threads(threads)


def _part_task(task, part: tuple) -> dict:
    """Run one part of ``task`` (a :class:`_Task` or :class:`_ConsensusTask`) in a worker
    process or a Dask worker; returns its timings."""
    return task.run(part)


def _drained(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def _describe(store: WorkStore, part: tuple) -> str:
    """What a part is, for the progress line: 'network: xz slices 33-64', 'tracking xz',
    'counting block 3/12' or 'block 3/12'."""
    if part[0] == "slab":
        lo, hi = store.slabs[part[1]][part[2]]
        return f"network: {part[1]} slices {lo + 1}-{hi}"
    if part[0] == "track":
        return f"tracking {part[1]}"
    what = f"block {part[1] + 1}/{len(store.grid)}"
    return f"counting {what}" if part[0] == "stats" else what


def job_stages(store: WorkStore, params: VolumeParams, network: bool = True) -> list:
    """The stages of a job in ``store``: ``(name, parts, key, finished, after)`` each: part
    ``p`` is done when ``key(p)`` is in ``finished()`` (read from the store each time it is
    called); ``after`` runs here once the stage's parts are all done (or None)."""
    from nbapp.blockwise.blocks import decide

    planes = params.planes
    blocks = [b.index for b in store.grid]
    second = operator.itemgetter(1)
    stages = []
    if network:
        stages.append(("slabs_s", [("slab", p, k) for p in planes
                                   for k in range(len(store.slabs[p]))],
                       operator.itemgetter(1, 2), store.slabs_finished, None))
    if not params.slice.semantic_only:
        if network:
            stages.append(("tracking_s", [("track", p) for p in planes], second,
                           store.tracks_finished, None))
        stages.append(("counting_s", [("stats", i) for i in blocks], second,
                       store.stats_finished,
                       lambda: decide(store, planes, params.consensus, params.orthoplane)))
    stages.append(("blocks_s", [("block", i) for i in blocks], second, store.finished, None))
    return stages


def parts_steps(store: WorkStore, stages: list, local, task, client, devices: list,
                timings: dict, note: str | None = None) -> Generator[BlockProgress, None, None]:
    """Run every part of ``stages`` (:func:`job_stages`) not finished yet, stage by stage: in
    this process (``local(part)``, a generator of progress), else ``task`` on the Dask
    ``client`` or in one worker process per device. The first report carries ``note`` (why
    an earlier run was not resumed). Raises when a part did not finish."""
    total = sum(len(stage[1]) for stage in stages)

    def unfinished(parts, key, finished):
        held = finished()
        return [p for p in parts if key(p) not in held]

    todos = [unfinished(parts, key, finished) for _, parts, key, finished, _ in stages]
    done = total - sum(len(t) for t in todos)
    skipped = done
    t_start = time.perf_counter()
    yield BlockProgress("blocks", "network", done, total,
                        note or (f"{skipped} of {total} parts already done" if skipped else None),
                        note)
    for (name, _, key, finished, after), todo in zip(stages, todos):
        t0 = time.perf_counter()
        if todo and local is not None:
            for part in todo:
                gen = local(part)
                what = _describe(store, part)
                while True:
                    try:
                        p = next(gen)
                    except StopIteration:
                        break
                    yield BlockProgress("blocks", "network", done, total,
                                        f"{what} (slice {p.done}/{p.total})")
                done += 1
                yield BlockProgress("blocks", "network", done, total,
                                    f"{what} done{_rate(done - skipped, t_start)}")
        elif todo:
            runs = (_dask_parts(client, task, todo) if client is not None
                    else _process_parts(task, todo, devices))
            for part, _ in runs:
                done += 1
                yield BlockProgress("blocks", "network", done, total,
                                    f"{_describe(store, part)} done{_rate(done - skipped, t_start)}")
        missing = unfinished(todo, key, finished)
        if missing:
            raise NbappError(f"{len(missing)} part(s) of the job did not finish (e.g. "
                             f"{_describe(store, missing[0])}); re-run the same command to "
                             "resume")
        if after is not None:
            after()
        timings[name] = time.perf_counter() - t0


def _rate(done: int, t0: float) -> str:
    dt = time.perf_counter() - t0
    return f" · {dt / done:.1f} s a part" if done > 0 and dt > 0 else ""


def _process_parts(task: _Task, todo: list, devices: list) -> Generator[tuple, None, None]:
    """One worker process per device; at most two parts queued per worker. Yields each
    part and its timings as it finishes."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    pending: dict = {}
    waiting = list(todo)
    threads = max(1, usable_cores() // len(devices))
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_process_worker,
                             initargs=(queue, threads)) as pool:
        try:
            while waiting or pending:
                while waiting and len(pending) < 2 * len(devices):
                    part = waiting.pop(0)
                    pending[pool.submit(_part_task, task, part)] = part
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    part = pending.pop(fut)
                    yield part, fut.result()
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _dask_parts(client, task, todo: list) -> Generator[tuple, None, None]:
    """One Dask task per part; yields each part and its timings as it finishes."""
    from dask.distributed import as_completed

    stamp = f"{os.getpid()}-{time.time_ns()}"
    futures = {client.submit(_part_task, task, part, pure=False,
                             key=f"nbapp-{'-'.join(map(str, part))}-{stamp}"): part
               for part in todo}
    try:
        for fut in as_completed(list(futures)):
            yield futures[fut], fut.result()
    finally:
        for fut in futures:
            fut.cancel()
