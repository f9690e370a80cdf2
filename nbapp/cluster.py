"""Running 3D jobs on a Dask distributed cluster (optional: ``pip install 'nbapp[dask]'``).

Each plane is cut into blocks of slices; one task per block runs the network, the median and the
2D post-processing on a worker (the block carries the median's halo, so the labels equal those
of a local run) and returns per-slice labels. Tracking and consensus run on the client.
Workers load the model once per process from its file (a ``str`` spec: ``"default"``, a YAML
or a TorchScript path), never per task.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Generator

import numpy as np

from nbapp.errors import InputError
from nbapp.params import VolumeParams
from nbapp.volume import Progress, block_labels, get_slice, plane_axis

__all__ = ["DaskPlanes", "model_spec_for_workers", "worker_engine", "model_identity",
           "file_digest"]


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
def worker_engine(spec: str, batch_size: int, device: str | None = None,
                  digest: str | None = None):
    """The engine of this worker process (loaded once per process, spec, device and content;
    device default: the GPU if there is one, else the CPU). Dask workers and the blockwise
    job's worker processes use it.

    ``digest`` is what :func:`model_identity` gave the client for the model's weights: a
    worker that lives on between jobs loads the file again when it changed, and a file that
    changed since the job started is refused (its blocks would mix two models).
    """
    import torch

    from nbapp.engine import Engine

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(spec, device=device, batch_size=batch_size)
    if digest is not None:
        found = model_identity(engine.model).get("weights")
        if found != digest:
            raise InputError(f"the model {spec!r} changed after the job started (content "
                             f"{digest[:12]}, now {str(found)[:12]}): run the job again")
    return engine


#: sha256 of files already hashed in this process, by (path, size, mtime, inode, ctime): a
#: model file is read once however many jobs and blocks ask for its identity.
_DIGESTS: dict = {}
_CHUNK = 16 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's content; computed once per version of the file in this
    process (its path, size, modification and change times and inode name the version)."""
    path = os.path.realpath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                h.update(block)
        if len(_DIGESTS) >= 64:
            _DIGESTS.clear()
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def module_digest(module) -> str:
    """sha256 (hex) of a torch module's state: every parameter's and buffer's name, dtype,
    shape and bytes (a model held only in memory, with no file to hash)."""
    import torch

    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu()
            if t.is_quantized:  # its values, scales and zero points applied
                t = t.dequantize()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # packed parameters and other objects: their text (a new one: start fresh)
            h.update(repr(value).encode())
    return h.hexdigest()


def model_identity(model) -> dict:
    """What a blockwise job records of its model: the name, and the content it runs: the
    sha256 of the weights file (for a config: of the file it names) and of the config file,
    or of the parameters of a model held only in memory.

    >>> model_identity("no such file")
    {'name': 'no such file'}
    """
    config = getattr(model, "config", None)
    if config is None:  # a spec (path) or a bare module
        if hasattr(model, "state_dict"):
            return {"name": type(model).__name__, "weights": module_digest(model)}
        if isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
            return {"name": os.path.basename(os.fspath(model)), "file": file_digest(model)}
        return {"name": str(model)}
    out = {"name": str(getattr(config, "name", ""))}
    weights = getattr(model, "weights", None)
    module = getattr(model, "module", None)
    if weights and os.path.isfile(weights):
        out["weights"] = file_digest(weights)
    elif module is not None:
        out["weights"] = module_digest(module)
    config_path = getattr(config, "config_path", None)
    if config_path and os.path.isfile(config_path):
        out["config"] = file_digest(config_path)
    return out


def _run_block(spec: str, batch_size: int, block: np.ndarray, params: VolumeParams,
               intensity: tuple, thing_list: tuple, start: int, stop: int, first: int,
               digest: str | None = None) -> np.ndarray:
    engine = worker_engine(spec, batch_size, None, digest)
    return block_labels(engine, block, params, intensity, thing_list, start, stop, first)


class DaskPlanes:
    """``plane_runner`` for :func:`nbapp.volume.volume_steps` that uses a Dask client."""

    def __init__(self, client, model, batch_size: int = 4, block_size: int = 16):
        self.client = client
        self.spec = model_spec_for_workers(model)
        # a loaded model's content: a worker that kept an older version of the file reloads it
        self.digest = model_identity(model).get("weights") if hasattr(model, "config") else None
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
                                     intensity, thing_list, start, stop, first, self.digest,
                                     pure=False)
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
