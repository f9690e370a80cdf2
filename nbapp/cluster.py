"""Running 3D jobs on a Dask distributed cluster (optional: ``pip install 'nbapp[dask]'``).

Each plane is cut into blocks of slices; one task per block runs the network, the median and the
2D post-processing on a worker (the block carries the median's halo, so the labels equal those
of a local run) and returns per-slice labels. Tracking and consensus run on the client.
Workers load the model once per process from its file (a ``str`` spec: ``"default"``, a YAML
or a TorchScript path), never per task.
"""

from __future__ import annotations

import functools
from typing import Generator

import numpy as np

from nbapp.errors import InputError
from nbapp.params import VolumeParams
from nbapp.volume import Progress, block_labels, get_slice, plane_axis

__all__ = ["DaskPlanes", "model_spec_for_workers", "worker_engine"]


def model_spec_for_workers(model) -> str:
    """A file-based description of ``model`` that worker processes can load."""
    from nbapp.models import Model

    if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        return str(model)
    if isinstance(model, Model):
        if model.config.config_path:
            return model.config.config_path
        if model.weights:
            return model.weights
    raise InputError("a Dask job needs a model file ('default', a .yaml config or a TorchScript "
                     "file) that every worker can read, not an in-memory module")


@functools.lru_cache(maxsize=2)
def worker_engine(spec: str, batch_size: int, device: str | None = None):
    """The engine of this worker process (loaded once per process, spec and device; device
    default: the GPU if there is one, else the CPU). Dask workers and the blockwise job's
    worker processes use it."""
    import torch

    from nbapp.engine import Engine

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Engine(spec, device=device, batch_size=batch_size)


def _run_block(spec: str, batch_size: int, block: np.ndarray, params: VolumeParams,
               intensity: tuple, thing_list: tuple, start: int, stop: int, first: int) -> np.ndarray:
    engine = worker_engine(spec, batch_size)
    return block_labels(engine, block, params, intensity, thing_list, start, stop, first)


class DaskPlanes:
    """``plane_runner`` for :func:`nbapp.volume.volume_steps` that uses a Dask client."""

    def __init__(self, client, model, batch_size: int = 4, block_size: int = 16):
        self.client = client
        self.spec = model_spec_for_workers(model)
        self.batch_size = batch_size
        self.block_size = block_size

    def __call__(self, volume, plane: str, params: VolumeParams, intensity: tuple,
                 thing_list: tuple) -> Generator[Progress, None, np.ndarray]:
        from dask.distributed import as_completed

        ax = plane_axis(plane)
        shape = tuple(volume.shape)
        n = shape[ax]
        r = (params.median_size - 1) // 2
        out = np.zeros(shape, np.int32)
        view = np.moveaxis(out, ax, 0)
        futures = {}
        for start in range(0, n, self.block_size):
            stop = min(n, start + self.block_size)
            first, last = max(0, start - r), min(n, stop + r)
            block = np.stack([get_slice(volume, plane, i) for i in range(first, last)])
            fut = self.client.submit(_run_block, self.spec, self.batch_size, block, params,
                                     intensity, thing_list, start, stop, first, pure=False)
            futures[fut] = (start, stop)
        done = 0
        try:
            for fut in as_completed(list(futures)):
                start, stop = futures[fut]
                view[start:stop] = fut.result()
                done += stop - start
                yield Progress(plane, "network", done, n)
        finally:
            for fut in futures:
                fut.cancel()
        return out
