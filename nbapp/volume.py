"""3D inference as generators: per-plane stacks, tracking, ortho-plane consensus (SPEC section 3).

The algorithm is written as generators that yield :class:`Progress` and return their result
(STYLE #10); threads, progress bars and cancellation live outside, in :mod:`nbapp.jobs` and the
CLI, and the job is assembled (engines, devices, Dask) in :mod:`nbapp.run3d`, whose
:func:`~nbapp.run3d.segment_volume` is the synchronous recipe. Nothing here imports those.

Memory: network outputs are streamed; only a window of ``median_size`` slices of outputs is held
at a time. Each plane's labels are one int32 volume.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Generator

import numpy as np

from nbapp.errors import InputError
from nbapp.heads import Heads
from nbapp.intensity import check_image_values, intensity_range
from nbapp.params import PLANES, ConsensusParams, VolumeParams
from nbapp.postprocess import segment_heads

__all__ = ["Progress", "VolumeResult", "Cancelled", "job_memory", "check_job_memory",
           "plane_axis", "get_slice", "median_window", "check_volume",
           "plane_stack_steps", "volume_steps", "consensus", "semantic_consensus",
           "volume_intensity", "filter_stack"]

#: Per-slice label divisor used inside 3D jobs: large enough that no slice overflows.
_SLICE_DIVISOR = 1 << 20


class Cancelled(Exception):
    """Raised inside a job when its cancel event is set."""


@dataclass(frozen=True)
class Progress:
    """One progress report of a 3D job (immutable)."""

    plane: str
    stage: str  # "network", "tracking", "consensus", "done"
    done: int
    total: int


@dataclass
class VolumeResult:
    """Labels of a 3D job, the per-plane stacks (when kept) and where the time went.

    ``stacks`` are the tracked per-plane labels BEFORE the size / extent filters, so that
    :func:`consensus` and :func:`filter_stack` can re-apply any settings later.
    """

    labels: np.ndarray
    stacks: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def plane_axis(plane: str) -> int:
    """Axis of (Z, Y, X) that a plane slices along: xy -> 0, xz -> 1, yz -> 2."""
    if plane not in PLANES:
        raise InputError(f"unknown plane {plane!r}: use one of {', '.join(PLANES)}")
    return PLANES.index(plane)


def get_slice(volume, plane: str, i: int) -> np.ndarray:
    """Slice ``i`` of ``volume`` in ``plane`` (works on numpy, memory-mapped and zarr arrays)."""
    ax = plane_axis(plane)
    index = (slice(None),) * ax + (i,)
    return np.asarray(volume[index])


def median_window(probs: list[np.ndarray]) -> np.ndarray:
    """Per-pixel median of a list of (C, H, W) probability maps (an odd or even count).

    >>> a, b, c = (np.full((1, 1, 2), v, np.float32) for v in (0.1, 0.9, 0.5))
    >>> median_window([a, b, c]).ravel().tolist()
    [0.5, 0.5]
    """
    if len(probs) == 1:
        return probs[0]
    if len(probs) == 3:
        a, b, c = probs
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return np.maximum(lo, np.minimum(hi, c))
    return np.median(np.stack(probs), axis=0).astype(np.float32)


def volume_intensity(volume) -> tuple:
    """One intensity range for a whole volume (numpy: subsampled; lazy arrays: 16 z slices)."""
    if isinstance(volume, np.ndarray):
        return intensity_range(volume)
    zs = np.unique(np.linspace(0, volume.shape[0] - 1, min(16, volume.shape[0])).astype(int))
    return intensity_range(np.stack([np.asarray(volume[int(z)]) for z in zs]))


def check_volume(volume) -> None:
    """Raise :class:`InputError` unless ``volume`` is a non-empty (Z, Y, X) array."""
    shape = getattr(volume, "shape", None)
    if shape is None or len(shape) != 3:
        raise InputError(f"3D inference needs a volume (Z, Y, X), got shape {shape}")
    if min(shape) < 1:
        raise InputError(f"volume of shape {tuple(shape)} is empty")


def slice_batches(n: int, batch_size: int) -> list[range]:
    """Consecutive blocks of slice indices.

    >>> [list(b) for b in slice_batches(5, 2)]
    [[0, 1], [2, 3], [4]]
    """
    return [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def infer_batch(engine, volume, plane: str, batch: range, sp, intensity) -> list[Heads]:
    """Network outputs of one block of slices of ``plane`` (reads the slices lazily)."""
    imgs = np.stack([get_slice(volume, plane, i) for i in batch])
    check_image_values(imgs, f"{plane} slices {batch.start}-{batch.stop - 1}")
    return engine.infer(imgs, sp.downsampling, sp.fine_boundaries, intensity)


def sequential_heads(engine, volume, plane: str, sp, intensity):
    """Yield ``(i, Heads)`` for every slice of ``plane`` in order, on one engine."""
    n = volume.shape[plane_axis(plane)]
    for batch in slice_batches(n, engine.batch_size):
        yield from zip(batch, infer_batch(engine, volume, plane, batch, sp, intensity))


def plane_stack_steps(source, shape: tuple, plane: str, params: VolumeParams,
                      thing_list: tuple = (1,), timings: dict | None = None
                      ) -> Generator[Progress, None, np.ndarray]:
    """Median and 2D post-processing for every slice of one plane, as the network outputs arrive.

    Parameters
    ----------
    source : iterator of (int, Heads)
        Network outputs of the plane's slices, in slice order (see :func:`sequential_heads` and
        :class:`nbapp.jobs.DevicePool`).

    Yields :class:`Progress` after each slice; returns the (Z, Y, X) int32 stack of per-slice
    panoptic labels (``class * 2**20 + instance``, numbered per slice). Only a window of
    ``median_size`` slices of network outputs is held at a time. ``timings`` (if given)
    accumulates ``network_s`` (engine time, possibly in other threads), ``median_s`` and
    ``postprocess_s``.
    """
    t = timings if timings is not None else {}
    for k in ("network_s", "median_s", "postprocess_s"):
        t.setdefault(k, 0.0)
    ax = plane_axis(plane)
    n = shape[ax]
    r = (params.median_size - 1) // 2
    sp = params.slice.replace(label_divisor=_SLICE_DIVISOR)
    out = np.zeros(shape, np.int32)
    view = np.moveaxis(out, ax, 0)
    window: dict[int, Heads] = {}
    next_post = 0
    arrived = 0
    for i_arr, heads in source:
        window[i_arr] = heads
        t["network_s"] += heads.meta.get("network_s", 0.0)
        arrived = i_arr + 1
        while next_post < n and (next_post + r < arrived or arrived == n):
            i = next_post
            lo, hi = max(0, i - r), min(n - 1, i + r)
            t0 = time.perf_counter()
            sem = median_window([window[k].sem for k in range(lo, hi + 1)])
            t1 = time.perf_counter()
            view[i] = segment_heads(dataclasses.replace(window[i], sem=sem), sp, thing_list)
            t["median_s"] += t1 - t0
            t["postprocess_s"] += time.perf_counter() - t1
            for k in [k for k in window if k < i + 1 - r]:
                del window[k]
            next_post += 1
            yield Progress(plane, "network", next_post, n)
    if next_post != n:
        raise RuntimeError(f"{plane}: got network outputs for {arrived} of {n} slices")
    return out


def block_labels(engine, block: np.ndarray, plane_params: VolumeParams, intensity: tuple,
                 thing_list: tuple, start: int, stop: int, first: int) -> np.ndarray:
    """Per-slice labels of slices ``start:stop`` of a plane from a block of slices with halo.

    ``block`` holds slices ``first:first + len(block)`` of the plane (slicing axis first) and
    includes ``(median_size - 1) // 2`` neighbours on each side where the volume has them, so
    the result equals that of a whole-plane run. Returns (stop - start, H, W) int32.
    """
    sp = plane_params.slice.replace(label_divisor=_SLICE_DIVISOR)
    gen = plane_stack_steps(sequential_heads(engine, block, "xy", sp, intensity), block.shape, "xy",
                            plane_params, thing_list)
    while True:
        try:
            next(gen)
        except StopIteration as stop_:
            raw = stop_.value
            break
    return raw[start - first : stop - first]


def track_plane(stack: np.ndarray, plane: str, thing_list: tuple) -> np.ndarray:
    """Track instances through one plane's stack (per thing class), without size filters.

    Returns (Z, Y, X) int32 ids 1..N (objects of all thing classes numbered together, ordered by
    first appearance). The filters are applied later (:func:`filter_stack`, :func:`consensus`),
    so that stored stacks can be re-filtered with other settings.
    """
    from nbapp.tracking import relabel_by_first_appearance, track_and_filter

    ax = plane_axis(plane)
    lo = min(thing_list) * _SLICE_DIVISOR if thing_list else 0
    if len(thing_list) == 1 and stack.min() >= 0 and stack.max() < lo + _SLICE_DIVISOR \
            and not ((stack > 0) & (stack < lo)).any():
        # one thing class and nothing else: track the stack as it is (no per-class copies)
        tracked = track_and_filter(np.ascontiguousarray(np.moveaxis(stack, ax, 0)), 0, 0)
        if ax == 0:  # already numbered by first appearance in (Z, Y, X) order
            return tracked
        return relabel_by_first_appearance(np.moveaxis(tracked, 0, ax))
    cls = stack // _SLICE_DIVISOR
    out = np.zeros(stack.shape, np.int32)
    offset = 0
    for c in thing_list:
        sub = np.where(cls == c, stack, 0)
        if not sub.any():
            continue
        tracked = np.moveaxis(
            track_and_filter(np.ascontiguousarray(np.moveaxis(sub, ax, 0)), 0, 0), 0, ax)
        out[tracked > 0] = tracked[tracked > 0] + offset
        offset = int(out.max())
    return relabel_by_first_appearance(out)


def filter_stack(stack: np.ndarray, params: ConsensusParams = ConsensusParams()) -> np.ndarray:
    """A plane's stack with the Min Size / Min Box Extent filters applied, ids 1..N again."""
    from nbapp.tracking import filter_objects, relabel_by_first_appearance

    return relabel_by_first_appearance(filter_objects(stack, params.min_size, params.min_extent))


def consensus(stacks: dict, params: ConsensusParams = ConsensusParams()) -> np.ndarray:
    """Ortho-plane consensus from stored per-plane stacks ({"xy", "xz", "yz"} -> (Z, Y, X) ids).

    Each stack is filtered with ``params`` first (a no-op on stacks already filtered with the
    same settings), then the views are merged and filtered again. Re-running it on the stacks
    of a job (``VolumeResult.stacks``, which are not size-filtered) with other vote /
    allow-one-view / size / extent settings gives exactly what a full run with those settings
    gives, in seconds.
    """
    from nbapp.consensus import orthoplane_consensus

    missing = [p for p in PLANES if p not in stacks]
    if missing:
        raise InputError(f"consensus needs the xy, xz and yz stacks; missing {missing}")
    shapes = {p: tuple(np.shape(stacks[p])) for p in PLANES}
    if len(set(shapes.values())) != 1:
        raise InputError(f"the stacks have different shapes {shapes}: they must come from the "
                         "same volume")
    filtered = [filter_stack(np.asarray(stacks[p]), params) for p in PLANES]
    return orthoplane_consensus(*filtered, params)


def semantic_consensus(stacks: dict, vote_threshold: int = 2) -> np.ndarray:
    """Per-voxel class vote of three semantic stacks (class ids, 0 background): a voxel takes
    a class when at least ``vote_threshold`` views agree on it (SPEC: semantic-only classes).

    >>> a = np.array([[[1, 1, 0]]]); b = np.array([[[1, 0, 0]]]); c = np.array([[[0, 1, 2]]])
    >>> semantic_consensus({"xy": a, "xz": b, "yz": c}, 2).tolist()
    [[[1, 1, 0]]]
    """
    from nbapp.consensus import semantic_vote

    out = np.zeros(stacks["xy"].shape, np.int32)
    classes = np.union1d(np.union1d(np.unique(stacks["xy"]), np.unique(stacks["xz"])),
                         np.unique(stacks["yz"]))
    for c in classes[classes > 0]:
        masks = [stacks[p] == c for p in PLANES]
        out[semantic_vote(masks, vote_threshold)] = c
    return out


#: Peak bytes per voxel a 3D job holds besides its input and the network's working memory.
#: Measured peak growth, network included: Lucchi++ 165x768x1024 (bench/bench_3d.py) 13.2
#: single-plane and 28.4 ortho-plane; the synthetic 96x512x512 demo volume, with more objects
#: per voxel (bench/bench_memory.py), 27 for both. The larger figures are used: refusing a
#: job that would just fit is better than a kernel killed without a word.
JOB_BYTES_PER_VOXEL = {"single": 28, "ortho": 30}
#: Fixed part of a job's peak (buffers that do not grow with the volume).
JOB_OVERHEAD_BYTES = 32 << 20


def job_memory(shape: tuple, params: VolumeParams, engine=None) -> int:
    """Estimated peak bytes of a 3D job on a volume of ``shape`` (input not counted): the
    per-plane label stacks, tracking and consensus, plus the network's working memory on the
    largest slices when ``engine`` runs on the CPU.

    >>> round(job_memory((100, 1000, 1000), VolumeParams()) / 1e9, 2)
    3.03
    """
    voxels = int(np.prod([int(s) for s in shape], dtype=np.int64))
    per = JOB_BYTES_PER_VOXEL["ortho" if params.orthoplane else "single"]
    net = 0
    if engine is not None and hasattr(engine, "memory_needed"):
        for plane in params.planes:
            ax = plane_axis(plane)
            shape2d = tuple(s for i, s in enumerate(shape) if i != ax)
            net = max(net, engine.memory_needed(shape2d, getattr(engine, "batch_size", 1),
                                                params.slice.downsampling))
    return voxels * per + net + JOB_OVERHEAD_BYTES


def check_job_memory(shape: tuple, params: VolumeParams, engine=None) -> None:
    """Raise :class:`nbapp.memory.OutOfMemory` before a 3D job that would not fit in the
    memory this process has left, saying what would."""
    from nbapp.memory import check_fits, format_bytes

    def hint(_allowed: float) -> str:
        if not params.orthoplane:
            return "crop the volume"
        single = job_memory(shape, dataclasses.replace(params, orthoplane=False), engine)
        return f"run single-plane (needs {format_bytes(single)}) or crop the volume"

    check_fits(job_memory(shape, params, engine),
               f"the {'ortho-plane' if params.orthoplane else 'single-plane'} 3D job on a "
               f"{'x'.join(map(str, shape))} volume", hint)


def thin_stack_error(shape: tuple, plane: str, params: VolumeParams,
                     exc: InputError) -> InputError:
    """The error of a plane too small for the model, with what works: a stack too thin for the
    xz / yz views (fewer slices than the model's smallest side) runs single-plane xy, or needs
    more slices; less downsampling helps only when the slices themselves are the limit
    (issue 30 item 9).

    >>> from nbapp.params import VolumeParams
    >>> print(thin_stack_error((5, 1024, 1024), "xz", VolumeParams(), InputError("too small")))
    this stack has 5 slices: too few for the xz view (its slices are 5 pixels high; the model needs more). Run it single-plane xy (untick Run ortho-plane; --plane xy --no-orthoplane), or use a stack with more slices
    """
    other = shape[2] if plane == "xz" else shape[1]
    if not params.orthoplane or plane not in ("xz", "yz") or shape[0] >= other:
        return exc
    main = "xy" if params.plane in ("xz", "yz") else params.plane
    ds = params.slice.downsampling
    return InputError(
        f"this stack has {shape[0]} slices: too few for the {plane} view (its slices are "
        f"{shape[0]} pixels high; the model needs more). Run it single-plane {main} (untick "
        f"Run ortho-plane; --plane {main} --no-orthoplane), or use a stack with more slices"
        + (", or less downsampling" if ds > 1 else ""))


def volume_steps(engine, volume, params: VolumeParams = VolumeParams(),
                 intensity: tuple | None = None, heads_source=None, plane_runner=None
                 ) -> Generator[Progress, None, VolumeResult]:
    """The whole 3D job as a generator: every plane, tracking, consensus.

    ``heads_source(engine, volume, plane, slice_params, intensity)`` yields ``(i, Heads)`` in
    slice order; default :func:`sequential_heads` (one engine, in this thread).
    ``plane_runner(volume, plane, params, intensity, thing_list)``, when given, replaces the
    network + post-processing of a plane (a generator returning the raw per-slice stack, as
    :func:`plane_stack_steps` does); the Dask path uses it.
    """
    check_volume(volume)
    if intensity is None:
        intensity = volume_intensity(volume)
    thing_list = tuple(engine.model.config.thing_list)
    check = getattr(engine, "check_size", None)
    for plane in params.planes:  # fail before any work, not after the first plane
        ax = plane_axis(plane)
        shape2d = tuple(s for i, s in enumerate(volume.shape) if i != ax)
        if check is not None:
            try:
                check(shape2d, params.slice.downsampling,
                      f"{plane} slice (volume {'x'.join(map(str, volume.shape))})")
            except InputError as exc:
                raise thin_stack_error(volume.shape, plane, params, exc) from None
    check_job_memory(tuple(volume.shape), params, engine)
    timings = {"network_s": 0.0, "median_s": 0.0, "postprocess_s": 0.0, "stacks_wall_s": 0.0,
               "tracking_s": 0.0, "consensus_s": 0.0}
    stacks = {}
    for plane in params.planes:
        t0 = time.perf_counter()
        if plane_runner is not None:
            raw = yield from plane_runner(volume, plane, params, intensity, thing_list)
        else:
            source = (heads_source or sequential_heads)(
                engine, volume, plane, params.slice.replace(label_divisor=_SLICE_DIVISOR), intensity)
            raw = yield from plane_stack_steps(source, tuple(volume.shape), plane, params, thing_list,
                                               timings)
        t1 = time.perf_counter()
        yield Progress(plane, "tracking", 0, 1)
        if params.slice.semantic_only:  # no instances: the class of each voxel
            stacks[plane] = (raw // _SLICE_DIVISOR).astype(np.int32)
        else:
            stacks[plane] = track_plane(raw, plane, thing_list)
        del raw
        t2 = time.perf_counter()
        timings["stacks_wall_s"] += t1 - t0
        timings["tracking_s"] += t2 - t1
        yield Progress(plane, "tracking", 1, 1)
    if params.orthoplane:
        yield Progress("all", "consensus", 0, 1)
        t0 = time.perf_counter()
        if params.slice.semantic_only:
            labels = semantic_consensus(stacks, params.consensus.vote_threshold)
        else:
            labels = consensus(stacks, params.consensus)
        timings["consensus_s"] = time.perf_counter() - t0
        yield Progress("all", "consensus", 1, 1)
    elif params.slice.semantic_only:
        labels = stacks[params.plane]
    else:
        labels = filter_stack(stacks[params.plane], params.consensus)
    if params.slice.semantic_only and params.slice.label_divisor:
        labels = labels * np.int32(params.slice.label_divisor)
    meta = {"intensity": intensity[2] if len(intensity) > 2 else None,
            "model": engine.model.config.name, "params": params}
    return VolumeResult(labels, stacks if (params.return_stacks or params.orthoplane) else {},
                        timings, meta)
