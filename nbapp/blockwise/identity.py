"""What a blockwise job is: its input (a file that workers open lazily, or an array) and the
identity that decides whether a re-run resumes an earlier run's work store.

Two identities: the *network's* (input, model, slice settings, median, planes, intensity
range) decides whether the stored per-slice labels can be reused; the *job's* (that, plus the
block grid and consensus settings) whether the finished blocks can.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from nbapp.errors import InputError
from nbapp.params import VolumeParams

__all__ = ["VolumeSource", "file_stamp", "array_digest", "input_id", "network_identity",
           "job_identity", "what_differs", "IDENTITY_VERSION"]

#: Bumped when the work store's layout or meaning changes: an older store is never resumed.
IDENTITY_VERSION = 4


@dataclass(frozen=True)
class VolumeSource:
    """A volume file that block jobs (in this process, worker processes or Dask workers) open
    lazily by path; what :func:`nbapp.io.read_image` accepts."""

    path: str
    root: str | None = None

    def open(self):
        return _open_source(self.path, self.root)


_SOURCES: dict = {}


def _open_source(path: str, root):
    key = (path, root)
    if key not in _SOURCES:
        from nbapp.io import read_image

        vol = read_image(path, lazy=True, root=root)[0]
        if len(vol.shape) != 3:
            raise InputError(f"blockwise 3D needs a volume (Z, Y, X); {path} has shape "
                             f"{tuple(vol.shape)}")
        if len(_SOURCES) >= 3:
            _SOURCES.clear()
        _SOURCES[key] = vol
    return _SOURCES[key]


#: Bytes at the start of an input file whose digest joins its size and modification time in
#: a job's identity (another file of the same size and time is still another input).
HEAD_BYTES = 64 << 10
_ZARR_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def file_stamp(source_id: str) -> list | None:
    """Size, modification time and a digest of the first :data:`HEAD_BYTES` of a source's
    file (of a zarr store: of its metadata files); None for an in-memory array or a file
    that cannot be read.

    A zarr store's chunks are not read: a chunk rewritten in place leaves it the same.
    """
    from nbapp.io import source_file, split_h5_path, split_zarr_path

    if source_id.startswith("array:"):
        return None
    file = source_file(source_id)
    try:
        st = os.stat(file)
        h = hashlib.sha256()
        if os.path.isdir(file):
            node = split_zarr_path(split_h5_path(source_id)[0])[1]
            folders = [file] + ([os.path.join(file, node)] if node else [])
            for folder in folders:
                for name in _ZARR_METADATA:
                    path = os.path.join(folder, name)
                    if os.path.isfile(path):
                        with open(path, "rb") as f:
                            h.update(path.encode() + b"\0" + f.read(HEAD_BYTES))
        else:
            with open(file, "rb") as f:
                h.update(f.read(HEAD_BYTES))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, h.hexdigest()[:32]]


def array_digest(volume: np.ndarray) -> str:
    """sha256 (hex) of a numpy array's shape, dtype and values, read 16 MiB at a time (an
    in-memory input's identity: an array changed in place is another input). About 0.2 s
    per 256 MB on one core.

    >>> a = np.arange(6).reshape(2, 3)
    >>> array_digest(a) == array_digest(a.copy()), array_digest(a) == array_digest(a.T)
    (True, False)
    """
    h = hashlib.sha256(f"{volume.dtype.str}{tuple(volume.shape)}".encode())
    step = 16 << 20
    if volume.flags.c_contiguous:
        flat = memoryview(volume.reshape(-1).view(np.uint8))
        for i in range(0, len(flat), step):
            h.update(flat[i:i + step])
    elif volume.ndim:
        rows = max(1, step // max(1, volume[:1].nbytes))
        for i in range(0, volume.shape[0], rows):
            h.update(np.ascontiguousarray(volume[i:i + rows]).reshape(-1).view(np.uint8))
    return h.hexdigest()


def input_id(volume, source: VolumeSource | None) -> str | None:
    """The input's part of a job's identity: its file, or ``array:DIGEST`` for a numpy
    array; None for another in-memory array-like (reading it all to hash it could take as
    long as the job: such a job is never resumed)."""
    if source is not None:
        return source.path
    if isinstance(volume, np.ndarray):
        return f"array:{array_digest(volume)}"
    return None


def network_identity(source_id: str, shape: tuple, dtype, model_id: dict,
                     params: VolumeParams, intensity: tuple) -> dict:
    """What makes two runs' per-slice labels the same (the network stage resumes or is reused
    only then): the input (its path, size, modification time and first bytes, or an array's
    content), the model's content (:func:`nbapp.cluster.model_identity`), the slice settings,
    the median, the planes and the intensity range."""
    return {"version": IDENTITY_VERSION, "source": source_id, "stamp": file_stamp(source_id),
            "dtype": str(dtype), "shape": [int(s) for s in shape], "model": model_id,
            "slice": repr(params.slice), "median_size": params.median_size,
            "planes": list(params.planes), "intensity": [float(v) for v in intensity[:2]]}


def job_identity(network: dict, params: VolumeParams) -> dict:
    """What makes two runs the same job (a re-run resumes its finished blocks only then): the
    network's identity and every parameter (the grid is added by the store)."""
    return dict(network, params=repr(params))


def what_differs(old_text: str | None, job: dict) -> str:
    """How an earlier run's ``job.json`` differs from ``job``, for the note of a fresh start.

    >>> new = {"version": 4, "model": {"name": "m", "weights": "bb" * 32}, "source": "v.npy"}
    >>> what_differs(json.dumps(dict(new, model={"name": "m", "weights": "aa" * 32})), new)
    'with another model (m, content aaaaaaaaaaaa, now bbbbbbbbbbbb)'
    >>> what_differs(json.dumps(dict(new, stamp=[1, 2, "ab"])), dict(new, stamp=[1, 2, "cd"]))
    'for another input (v.npy changed since)'
    """
    try:
        old = json.loads(old_text) if old_text else None
    except ValueError:
        old = None
    if not isinstance(old, dict):
        return "by a run that did not record its job (a broken store)"
    old = {k: v for k, v in old.items() if k not in ("shape", "chunks", "layers")}
    if old.get("version") != job.get("version"):
        return "by another version of nbapp"
    if old.get("model") != job.get("model"):
        was, now = old.get("model") or {}, job.get("model") or {}
        name = now.get("name") if isinstance(now, dict) else now
        if isinstance(was, dict) and isinstance(now, dict) and was.get("name") == name:
            return (f"with another model ({name}, content {str(was.get('weights'))[:12]}, now "
                    f"{str(now.get('weights'))[:12]})")
        return f"with another model ({_name(was)}, now {_name(now)})"
    if old.get("source") != job.get("source") or old.get("stamp") != job.get("stamp"):
        source = str(job.get("source"))
        if source.startswith("array:"):
            return "for another input (the array's values differ)"
        return f"for another input ({os.path.basename(source)} changed since)"
    if old.get("stacks") != job.get("stacks"):
        return "for other stacks (a stack changed since)"
    return "with other settings"


def _name(model) -> str:
    return str(model.get("name")) if isinstance(model, dict) else str(model)
