"""The 3D front door: the one place that builds a 3D job and runs it to the end.

It sits above the job runner's device pool (:class:`nbapp.jobs.DevicePool`), the Dask path
(:class:`nbapp.cluster.DaskPlanes`) and the pipeline (:func:`nbapp.volume.volume_steps`), so
that none of those needs to import another floor above it (the import-linter ``layers``
contract in pyproject.toml checks it). The CLI, the app's 3D tab, the notebooks and the
benchmarks all build their jobs with :func:`job_steps` and :func:`make_engines`; the
synchronous :func:`segment_volume` is :func:`job_steps` drained in the calling thread.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from nbapp.errors import InputError
from nbapp.params import VolumeParams
from nbapp.volume import Cancelled, VolumeResult, check_volume, filter_stack, volume_steps

__all__ = ["available_devices", "parse_devices", "make_engines", "job_steps", "drain",
           "segment_volume", "segment_blockwise", "consensus_blockwise"]


def available_devices() -> list[str]:
    """All CUDA GPUs if there are any, else the CPU (the default device list of a 3D job)."""
    from nbapp.models import gpu_devices

    return gpu_devices() or ["cpu"]


def parse_devices(devices) -> list[str]:
    """``None`` -> all available; ``"cpu,cuda:0"`` or a list -> that list (checked)."""
    from nbapp.models import resolve_device

    if devices is None:
        return available_devices()
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    items = [str(d).strip() for d in items if str(d).strip()]
    if not items:
        raise InputError("the device list is empty: give e.g. cpu or cuda:0,cuda:1")
    for d in items:
        resolve_device(d)
    return items


def make_engines(model, devices, batch_size: int = 4) -> list:
    """One engine per device, sharing one loaded model (copied to each device)."""
    from nbapp.engine import Engine
    from nbapp.models import load_model

    devs = parse_devices(devices)
    base = load_model(model, device=devs[0])
    return [Engine(base.to(d), batch_size=batch_size) for d in devs]


def job_steps(engines: list, volume, params: VolumeParams, intensity: tuple | None = None,
              client=None, model=None):
    """The 3D job as a generator of :class:`~nbapp.volume.Progress` returning a
    :class:`~nbapp.volume.VolumeResult`: the network on every engine (a
    :class:`~nbapp.jobs.DevicePool`), or as Dask tasks when ``client`` is given (``model`` is
    then what the workers load)."""
    if not isinstance(params, VolumeParams):
        raise InputError(f"params must be VolumeParams, got {type(params).__name__}")
    if client is not None:
        from nbapp.cluster import DaskPlanes

        runner = DaskPlanes(client, model if model is not None else engines[0].model,
                            engines[0].batch_size)
        return volume_steps(engines[0], volume, params, intensity=intensity,
                            plane_runner=runner)
    from nbapp.jobs import DevicePool

    return volume_steps(engines[0], volume, params, intensity=intensity,
                        heads_source=DevicePool(engines))


def drain(gen, progress: Callable | None = None, cancel=None) -> VolumeResult:
    """Run a job generator to its end in this thread (``progress`` gets each step)."""
    while True:
        if cancel is not None and cancel.is_set():
            gen.close()
            raise Cancelled("the job was cancelled")
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(p)


def segment_volume(volume, model="default", params: VolumeParams = VolumeParams(), devices=None,
                   client=None, progress: Callable | None = None, cancel=None,
                   batch_size: int = 4) -> np.ndarray | tuple[np.ndarray, dict]:
    """Segment a (Z, Y, X) volume: single plane or ortho-plane with consensus.

    Parameters
    ----------
    volume : (Z, Y, X) array (numpy, memory-mapped or zarr)
    model : str, Model or torch.nn.Module
        What :func:`nbapp.load_model` accepts.
    params : VolumeParams
    devices : list of str or str, optional
        Devices to run on, one worker each; default: all CUDA GPUs, else the CPU.
    client : dask.distributed.Client, optional
        Run the network and 2D post-processing as tasks on a Dask cluster.
    progress : callable, optional
        Called with each :class:`~nbapp.volume.Progress` (in the calling thread).
    cancel : threading.Event, optional
        Set it to stop the job (raises :class:`~nbapp.volume.Cancelled`).

    Returns
    -------
    labels : (Z, Y, X) int32
        ids 1..N.
    stacks : dict, only when ``params.return_stacks``
        {"xy", "xz", "yz"} -> (Z, Y, X) int32 per-plane labels.
    """
    if not isinstance(params, VolumeParams):
        raise InputError(f"params must be VolumeParams, got {type(params).__name__}")
    check_volume(volume)
    engines = make_engines(model, devices, batch_size)
    result = drain(job_steps(engines, volume, params, client=client, model=model), progress,
                   cancel)
    if params.return_stacks:
        if params.slice.semantic_only:
            return result.labels, result.stacks
        return result.labels, {p: filter_stack(st, params.consensus)
                               for p, st in result.stacks.items()}
    return result.labels


def segment_blockwise(volume, output: str | os.PathLike, model="default",
                      params: VolumeParams = VolumeParams(), blocks=None,
                      devices=None, client=None, workers: str = "threads", progress=None,
                      cancel=None, batch_size: int = 4, root=None, voxel_size=None
                      ):
    """Segment a volume larger than memory block by block into an OME-Zarr ``output``
    (:mod:`nbapp.blockwise` says how).

    Parameters
    ----------
    volume : path or (Z, Y, X) array
        A file path is read lazily, and re-running the same call resumes an interrupted job
        (finished blocks are skipped), as does a numpy array with the same values; other
        in-memory arrays always run from the start.
    output : path ending in ``.zarr``
    blocks : nbapp.blockwise.BlockParams, optional
        Block size (default: from the memory budget).
    devices, client, progress, cancel, batch_size :
        As for :func:`segment_volume`.
    workers : "threads" or "processes"
        With several devices, "processes" runs one worker process per device on whole blocks.
    root : path, optional
        Confine reading to this folder (what the app passes).

    Returns
    -------
    nbapp.blockwise.BlockwiseResult
        The output's path, object count, blocks run and skipped, timings; ``.labels()`` reads
        the labels lazily.
    """
    from nbapp.blockwise import BlockParams

    blocks = BlockParams() if blocks is None else blocks
    from nbapp.blockwise import VolumeSource, blockwise_steps

    source = None
    if isinstance(volume, (str, os.PathLike)):
        source = VolumeSource(os.fspath(volume), None if root is None else os.fspath(root))
        if voxel_size is None:
            from nbapp.io import read_image

            voxel_size = read_image(source.path, lazy=True, root=root)[1].get("voxel_size")
        volume = source.open()
    engines = make_engines(model, devices, batch_size)
    return drain(blockwise_steps(engines, volume, output, params, blocks, client=client,
                                 workers=workers, model=model, source=source,
                                 voxel_size=voxel_size, batch_size=batch_size),
                 progress, cancel)



def consensus_blockwise(stacks: dict, output: str | os.PathLike, params=None, blocks=None,
                        client=None, progress=None, cancel=None, root=None, voxel_size=None):
    """Ortho-plane consensus from stored per-plane stacks larger than memory, block by block,
    into an OME-Zarr ``output`` (:func:`nbapp.blockwise.consensus_blockwise_steps`).

    Parameters
    ----------
    stacks : {"xy", "xz", "yz"} -> path or (Z, Y, X) integer array
        E.g. the ``OUT_xy.zarr``, ``OUT_xz.zarr``, ``OUT_yz.zarr`` that
        :func:`segment_blockwise` writes with ``VolumeParams(return_stacks=True)``. Files are
        read lazily, and re-running the same call resumes (as it does for numpy arrays with
        the same values).
    output : path ending in ``.zarr``
    params : nbapp.ConsensusParams, optional
    blocks : nbapp.BlockParams, optional
        Block size (default: from the memory budget).
    client : dask.distributed.Client, optional
        One task per block on the cluster (the stacks must be files every worker sees).
    progress, cancel, root, voxel_size :
        As for :func:`segment_blockwise`.

    Returns
    -------
    nbapp.blockwise.BlockwiseResult
    """
    from nbapp.blockwise import BlockParams, VolumeSource, consensus_blockwise_steps
    from nbapp.params import ConsensusParams

    params = ConsensusParams() if params is None else params
    if not isinstance(params, ConsensusParams):
        raise InputError(f"params must be ConsensusParams, got {type(params).__name__}")
    arrays, sources = {}, {}
    for plane, stack in dict(stacks).items():
        if isinstance(stack, (str, os.PathLike)):
            sources[plane] = VolumeSource(os.fspath(stack),
                                          None if root is None else os.fspath(root))
            arrays[plane] = sources[plane].open()
        else:
            arrays[plane] = stack
    if sources and len(sources) != len(arrays):
        raise InputError("give the three stacks all as files or all as arrays")
    return drain(consensus_blockwise_steps(arrays, output, params,
                                           BlockParams() if blocks is None else blocks,
                                           sources=sources or None, client=client,
                                           voxel_size=voxel_size), progress, cancel)
