"""Blockwise 3D inference: volumes larger than memory, resumable, on every device or a Dask
cluster.

The volume is cut into blocks (:func:`nbapp.stitch.block_grid`). Each block job reads its core
and a margin from the volume (lazily: zarr, OME-Zarr, memory-mapped TIFF / NumPy / MRC, HDF5),
runs the whole 3D pipeline on it (per-plane stacks, median, tracking, consensus) and writes
the labels of its core into a work store beside the output, then a record of what it found: its
objects (sizes, boxes, first voxels) and its labels of the strips just across its faces. A
block with a record is finished; re-running the same command skips it (resume after a crash
or a cancel) when the job is the same: the same model content, input content and settings
(:func:`job_identity`); another job starts fresh, and its first progress report says why.
When every block is finished, the pieces of objects cut by block faces are joined
where the two blocks' labels of a strip agree (:func:`nbapp.stitch.join_objects`), the 3D
filters are applied to the joined objects, and the labels are written, numbered 1..N by first
appearance, as an OME-Zarr multiscale image (written by ``ome-zarr``) under a temporary name
renamed onto the output when complete.

Memory: one block job at a time per worker (its peak is set by the block size) plus the work
store's small tables; nothing the size of the volume is ever held.

Where the block jobs run:

* in this process, on the engines given (one per device; slices are dealt to them as in the
  in-memory job);
* ``workers="processes"``: one worker process per device, each running whole blocks
  (``concurrent.futures.ProcessPoolExecutor``; the volume and the model must be files);
* on a Dask cluster (``client``): one task per block; each worker reads its block from the
  volume's file and writes to the work store itself (both must be on storage every worker
  sees); the client only schedules and joins the small tables.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

import numpy as np

from nbapp.errors import InputError, NbappError
from nbapp.params import PLANES, ConsensusParams, VolumeParams
from nbapp.stitch import (Block, block_grid, box_shape, core_table, edge_slabs, filter_complete,
                          grow, join_objects, mutual_pairs, slab_pairs, to_slices, uid_base, within)
from nbapp.volume import (_SLICE_DIVISOR, JOB_BYTES_PER_VOXEL, track_plane,
                          plane_axis, plane_stack_steps, semantic_consensus, volume_intensity)

__all__ = ["BlockParams", "BlockProgress", "BlockwiseResult", "VolumeSource", "WorkStore",
           "coarse_level", "consensus_block", "consensus_blockwise_steps",
           "choose_block_size", "block_labels_steps", "blockwise_steps", "needs_blockwise",
           "DEFAULT_BLOCK_BUDGET", "STITCH_DEPTH"]

#: Memory a block job may use by default (its labels, tracking, consensus and the network's
#: working memory; the model and the interpreter come on top): with the measured 30 bytes per
#: voxel of an ortho-plane job that is a 340-voxel cube with its margin.
DEFAULT_BLOCK_BUDGET = 1200 << 20
#: Voxels beyond each face of a core that a block also labels; the neighbouring blocks' labels
#: of these strips decide which pieces are one object.
STITCH_DEPTH = 2
#: Block sides are multiples of this (the network's grid) unless the volume is smaller.
_SIDE_STEP = 16


@dataclass(frozen=True)
class BlockParams:
    """How a volume is cut into blocks.

    Parameters
    ----------
    block_size : int or (int, int, int), optional
        Largest side of a block's core in voxels (one per axis, or one for all). Default:
        the largest that keeps a block job within ``memory_budget``.
    halo : int, optional
        Margin in voxels read around each core (the network's context at block faces); at
        least :data:`STITCH_DEPTH`. Default (:meth:`resolved`): 32 voxels, 16 network pixels
        times the downsampling above 2. Measured on Lucchi++ FIB-SEM (a 165x512x512 crop in
        4 blocks, bench/results/bench_blockwise_fidelity.json): F1 between blockwise and
        in-memory labels 0.87 (halo 16) -> 0.93 (32) at downsampling 1, 0.74 -> 0.87 at 2.
    memory_budget : int, optional
        Bytes a block job may use (default :data:`DEFAULT_BLOCK_BUDGET`).
    """

    block_size: Any = None
    halo: int | None = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        from nbapp.errors import ParameterError

        if self.block_size is not None:
            sizes = (self.block_size,) if np.isscalar(self.block_size) else tuple(self.block_size)
            if len(sizes) not in (1, 3) or any(isinstance(s, bool) or int(s) != s or s < 8
                                               for s in sizes):
                raise ParameterError(f"block_size must be one side or three sides of at least 8 "
                                     f"voxels, got {self.block_size!r}")
            object.__setattr__(self, "block_size",
                               int(sizes[0]) if len(sizes) == 1 else tuple(int(s) for s in sizes))
        if self.halo is not None and (isinstance(self.halo, bool) or int(self.halo) != self.halo
                                      or not STITCH_DEPTH <= self.halo <= 1024):
            raise ParameterError(f"halo must be {STITCH_DEPTH}-1024 voxels, got {self.halo!r}")
        if self.memory_budget is not None and self.memory_budget < (64 << 20):
            raise ParameterError(f"memory_budget must be at least 64 MiB, got {self.memory_budget}")

    def resolved(self, params: VolumeParams) -> "BlockParams":
        """These settings with the default halo filled in for ``params``' downsampling.

        >>> BlockParams().resolved(VolumeParams()).halo
        32
        """
        if self.halo is not None:
            return self
        ds = max(1.0, float(params.slice.downsampling))
        return BlockParams(self.block_size, int(max(32, 16 * ds)), self.memory_budget)


@dataclass(frozen=True)
class BlockProgress:
    """A progress report of a blockwise job: ``done`` of ``total`` blocks (stage
    ``"network"``, so that the job runner shows an ETA), then joining and writing."""

    plane: str
    stage: str
    done: int
    total: int
    detail: str | None = None
    #: A one-line message for the user, given once (why an earlier run's blocks were not
    #: resumed); the first report's ``detail`` carries it too
    note: str | None = None


@dataclass
class BlockwiseResult:
    """What a blockwise job wrote: the output store, its objects and where the time went."""

    path: Path
    shape: tuple
    objects: int
    blocks: int
    skipped: int
    block_size: tuple
    timings: dict = field(default_factory=dict)
    #: One row per object (id, voxels, bbox, centroid, extent), as nbapp.objects.object_table
    table: list = field(default_factory=list)
    #: Where each plane's stack was written ({"xy": path, ...}; with ``return_stacks``)
    stacks: dict = field(default_factory=dict)
    #: How many objects each of those stacks has
    stack_objects: dict = field(default_factory=dict)
    #: "segment" (a blockwise 3D job) or "consensus" (from stored stacks)
    kind: str = "segment"

    def labels(self):
        """The labels (level 0 of the output), read lazily."""
        from nbapp.io import read_image

        return read_image(self.path, lazy=True)[0]

    def stack(self, plane: str):
        """One plane's stack (level 0), read lazily."""
        from nbapp.io import read_image

        if plane not in self.stacks:
            raise InputError(f"this job wrote no {plane} stack (it wrote "
                             f"{sorted(self.stacks) or 'none'}): run it with return_stacks")
        return read_image(self.stacks[plane], lazy=True)[0]


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


def default_budget() -> int:
    """:data:`DEFAULT_BLOCK_BUDGET`, or half the memory this process has left when that is
    less (a container with little memory gets smaller blocks, not a killed kernel)."""
    from nbapp.memory import available_bytes

    return int(max(64 << 20, min(DEFAULT_BLOCK_BUDGET, available_bytes() // 2)))


def choose_block_size(shape: tuple, params: VolumeParams, blocks: BlockParams = BlockParams()
                      ) -> tuple:
    """The core side of each axis: ``blocks.block_size`` when given, else the largest cube
    (a multiple of 16) whose job with its margins fits ``blocks.memory_budget`` (default
    :func:`default_budget`), at least 64; along an axis where the volume is thinner than that
    the block takes the whole axis and the other sides grow to use the budget.

    >>> choose_block_size((1000, 2000, 2000), VolumeParams(), BlockParams(memory_budget=1200 << 20))
    (272, 272, 272)
    >>> choose_block_size((50, 2000, 2000), VolumeParams(), BlockParams(block_size=100))
    (50, 100, 100)
    >>> choose_block_size((165, 768, 1024), VolumeParams(), BlockParams(memory_budget=1200 << 20))
    (165, 432, 432)
    """
    blocks = blocks.resolved(params)
    if blocks.block_size is not None:
        sides = blocks.block_size if isinstance(blocks.block_size, tuple) \
            else (blocks.block_size,) * 3
    else:
        budget = blocks.memory_budget or default_budget()
        voxels = budget / JOB_BYTES_PER_VOXEL["ortho" if params.orthoplane else "single"]
        sides = [_side(voxels ** (1 / 3), blocks.halo)] * 3
        # an axis along which the volume is thinner than a block takes all of it (no halo
        # there): its share of the budget goes to the other axes (fewer blocks, less halo)
        while True:
            whole = [a for a in range(3) if shape[a] <= sides[a]]
            rest = [a for a in range(3) if shape[a] > sides[a]]
            if not whole or not rest:
                break
            side = _side((voxels / np.prod([shape[a] for a in whole])) ** (1 / len(rest)),
                         blocks.halo)
            if side <= sides[rest[0]]:
                break
            for a in rest:
                sides[a] = side
    return tuple(int(min(s, n)) for s, n in zip(sides, shape))


def _side(outer: float, halo: int) -> int:
    """A core side (a multiple of 16, at least 64) whose block with its halo is ``outer``."""
    return max(64, (int(round(outer)) - 2 * halo) // _SIDE_STEP * _SIDE_STEP)


def needs_blockwise(shape: tuple, params: VolumeParams, engine=None) -> bool:
    """True when the in-memory 3D job on ``shape`` would not fit in the memory left (the
    test :func:`nbapp.volume.check_job_memory` makes: 90 % of it)."""
    from nbapp.memory import available_bytes
    from nbapp.volume import job_memory

    return job_memory(tuple(shape), params, engine) > 0.9 * available_bytes()


# -- one block ----------------------------------------------------------------------------------

def block_labels_steps(heads_source, volume, block: Block, shape: tuple, params: VolumeParams,
                       blocks: BlockParams, intensity: tuple, thing_list: tuple,
                       timings: dict | None = None) -> Generator[BlockProgress, None, tuple]:
    """The 3D pipeline on one block: returns ``(layers, region)``: ``layers["labels"]``, the
    labels (local ids 1..M, or classes for a semantic-only model) of the block's core grown by
    :data:`STITCH_DEPTH`, with each plane's stack of the same region under its name ("xy",
    ...) when ``params.return_stacks``; and that region's box.

    Every plane runs on the core with ``blocks.halo`` voxels of context on each side; its
    tracked stack is filtered (Min Size / Min Box Extent) except for objects that touch a face
    where the volume goes on, which the joined objects' filters decide later; the consensus
    runs on the whole box and the labels of the core and its strips are kept.
    """
    timings = timings if timings is not None else {}
    r = (params.median_size - 1) // 2
    region = grow(block.core, STITCH_DEPTH, shape)
    # every plane runs on the same box, so that the consensus sees whole objects around the
    # core (cropped detections would vote differently) and the median has its neighbours
    outer = grow(block.core, max(blocks.halo, r + STITCH_DEPTH), shape)
    t0 = time.perf_counter()
    data = np.asarray(volume[to_slices(outer)])
    timings["read_s"] = timings.get("read_s", 0.0) + time.perf_counter() - t0
    cp = params.consensus
    sp = params.slice.replace(label_divisor=_SLICE_DIVISOR)
    stacks = {}
    for plane in params.planes:
        ax = plane_axis(plane)
        gen = plane_stack_steps(heads_source(data, plane, sp, intensity), data.shape, plane,
                                params, thing_list, timings)
        n = data.shape[ax]
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                raw = stop.value
                break
            yield BlockProgress(plane, "network", p.done, n)
        t1 = time.perf_counter()
        if params.slice.semantic_only:
            stacks[plane] = (raw // _SLICE_DIVISOR).astype(np.int32)
        else:
            stacks[plane] = filter_complete(track_plane(raw, plane, thing_list), outer, shape,
                                            cp.min_size, cp.min_extent)
        del raw
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


def run_block(heads_source, volume, store: "WorkStore", block: Block, params: VolumeParams,
              blocks: BlockParams, intensity: tuple, thing_list: tuple
              ) -> Generator[BlockProgress, None, dict]:
    """:func:`block_labels_steps`, then the core written to the store and the block's record
    (which marks it finished). Returns the block's timings."""
    timings: dict = {}
    t0 = time.perf_counter()
    layers, region = yield from block_labels_steps(heads_source, volume, block, store.shape,
                                                   params, blocks, intensity, thing_list,
                                                   timings)
    t1 = time.perf_counter()
    store.write_block(block, layers, region, semantic=params.slice.semantic_only)
    timings["write_s"] = time.perf_counter() - t1
    timings["block_s"] = time.perf_counter() - t0
    return timings


# -- the work store -----------------------------------------------------------------------------

class WorkStore:
    """The work folder of a blockwise job, beside its output: one zarr array per layer
    (``labels.zarr``, and ``xy.zarr`` ... for the per-plane stacks) of block-unique ids, one
    zarr chunk per block so that concurrent writers never share a chunk;
    ``records/BLOCK.npz`` (one per finished block: each layer's object table and strips) and
    ``job.json`` (what the job is: a re-run resumes only the same job).
    """

    def __init__(self, output: str | os.PathLike):
        output = Path(output)
        self.output = output
        self.path = output.parent / f".{output.name}.nbapp-work"
        self.shape: tuple = ()
        self.grid: list[Block] = []
        self.layers: tuple = ("labels",)
        #: Why :meth:`open` did not resume an earlier run's store (None: resumed, or none)
        self.note: str | None = None

    # opening and resuming
    def open(self, job: dict, shape: tuple, block_size: tuple,
             layers: tuple = ("labels",), resume: bool = True) -> int:
        """Create the store, or reuse a previous run's of the same ``job`` (unless ``resume``
        is False); return how many blocks are already finished. A store of another job is
        removed, and :attr:`note` says why."""
        import zarr

        self.shape = tuple(int(s) for s in shape)
        self.grid = block_grid(self.shape, block_size)
        self.layers = tuple(layers)
        chunks = tuple(hi - lo for lo, hi in self.grid[0].core)
        self.lock()
        job = dict(job, shape=list(self.shape), chunks=list(chunks), layers=list(self.layers))
        text = json.dumps(job, sort_keys=True, default=str)
        meta = self.path / "job.json"
        self.note = None
        if self.path.exists():
            old = meta.read_text() if meta.exists() else None
            if not resume:
                pass  # an input that cannot be identified: never resumed
            elif old == text and all((self.path / f"{n}.zarr").exists() for n in self.layers):
                return len(self.finished())
            else:
                self.note = (f"the work store at {self.path} was made "
                             f"{_what_differs(old, job)}; starting fresh")
            shutil.rmtree(self.path)  # another job's (or a broken) work folder
        (self.path / "records").mkdir(parents=True)
        for name in self.layers:
            zarr.create_array(str(self.path / f"{name}.zarr"), shape=self.shape, chunks=chunks,
                              dtype="int64", fill_value=0)
        meta.write_text(text)
        return 0

    def lock(self) -> None:
        """Refuse a second live run on the same output (this host); take the lock."""
        import socket

        from nbapp.io import pid_alive

        lock = self.path.parent / f"{self.path.name}.lock"
        me = f"{socket.gethostname()} {os.getpid()}"
        if lock.exists():
            host, _, pid = lock.read_text().partition(" ")
            if (host, pid) != tuple(me.split(" ")) and host == socket.gethostname() \
                    and pid.isdigit() and pid_alive(int(pid)):
                raise InputError(f"another nbapp run (process {pid}) is writing "
                                 f"{self.output}: wait for it to end or stop it")
        lock.write_text(me)
        self._lock = lock

    def unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.unlink(missing_ok=True)

    @classmethod
    def attach(cls, path: str | os.PathLike) -> "WorkStore":
        """Open the existing store at ``path`` (in a worker): shape, grid and layers from
        ``job.json``."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.output = None
        job = json.loads((store.path / "job.json").read_text())
        store.shape = tuple(job["shape"])
        store.grid = block_grid(store.shape, tuple(job["chunks"]))
        store.layers = tuple(job["layers"])
        return store

    def labels(self, mode: str = "r", layer: str = "labels"):
        """One layer's array of block-unique ids."""
        import zarr

        return zarr.open_array(str(self.path / f"{layer}.zarr"), mode=mode)

    def finished(self) -> set:
        folder = self.path / "records"
        return {int(p.stem) for p in folder.glob("*.npz")} if folder.exists() else set()

    def record_path(self, index: int) -> Path:
        return self.path / "records" / f"{index}.npz"

    def write_block(self, block: Block, layers: dict, region: tuple, semantic: bool) -> None:
        """Each layer's labels of the block's core into its array, then the block's record
        (atomically: a block with a record is finished)."""
        from nbapp.io import write_small

        arrays = {}
        for name in self.layers:
            labels = layers[name]
            core = np.ascontiguousarray(labels[within(block.core, region)])
            if semantic:
                self.labels("r+", name)[to_slices(block.core)] = core.astype(np.int64)
                continue
            base = uid_base(block.index)
            self.labels("r+", name)[to_slices(block.core)] = np.where(core > 0, core + base, 0)
            for k, v in core_table(core, block.core, self.shape).items():
                arrays[f"{name}.table_{k}"] = v
            for i, (box, lab) in enumerate(edge_slabs(labels, region, block.core)):
                arrays[f"{name}.slab{i}_box"] = np.array(box, np.int64)
                arrays[f"{name}.slab{i}"] = lab
        write_small(self.record_path(block.index), lambda f: np.savez_compressed(f, **arrays))

    def read_record(self, index: int, layer: str = "labels") -> tuple[dict, list]:
        """One layer's object table and strips from a finished block's record."""
        head = f"{layer}.table_"
        with np.load(self.record_path(index)) as z:
            table = {k[len(head):]: z[k] for k in z.files if k.startswith(head)}
            slabs = []
            i = 0
            while f"{layer}.slab{i}" in z.files:
                slabs.append((tuple(map(tuple, z[f"{layer}.slab{i}_box"].tolist())),
                              z[f"{layer}.slab{i}"]))
                i += 1
        return table, slabs

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()


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


def job_identity(source_id: str, shape: tuple, dtype, model_id: dict, params: VolumeParams,
                 blocks: BlockParams, intensity: tuple) -> dict:
    """What makes two runs the same job (a re-run resumes only then): the input (its path,
    size, modification time and first bytes, or an array's content), the model's content
    (:func:`nbapp.cluster.model_identity`), every parameter and the grid."""
    return {"version": 3, "source": source_id, "stamp": file_stamp(source_id),
            "dtype": str(dtype), "model": model_id, "params": repr(params), "halo": blocks.halo,
            "intensity": [float(v) for v in intensity[:2]]}


def _what_differs(old_text: str | None, job: dict) -> str:
    """How an earlier run's ``job.json`` differs from ``job``, for the note of a fresh start.

    >>> new = {"version": 3, "model": {"name": "m", "weights": "bb" * 32}, "source": "v.npy"}
    >>> _what_differs(json.dumps(dict(new, model={"name": "m", "weights": "aa" * 32})), new)
    'with another model (m, content aaaaaaaaaaaa, now bbbbbbbbbbbb)'
    >>> _what_differs(json.dumps(dict(new, stamp=[1, 2, "ab"])), dict(new, stamp=[1, 2, "cd"]))
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


# -- joining and writing ------------------------------------------------------------------------

def join_steps(store: WorkStore, consensus: ConsensusParams, layer: str = "labels"
               ) -> Generator[BlockProgress, None, tuple[dict, list]]:
    """Pairs of pieces from every block's strips of one layer, then
    :func:`~nbapp.stitch.join_objects`."""
    tables, pairs = {}, []
    labels = store.labels(layer=layer)
    n = len(store.grid)
    for k, block in enumerate(store.grid):
        table, slabs = store.read_record(block.index, layer)
        tables[block.index] = table
        base = uid_base(block.index)
        for box, lab in slabs:
            mine = np.where(lab > 0, lab.astype(np.int64) + base, 0)
            pairs.append(slab_pairs(mine, np.asarray(labels[to_slices(box)])))
        yield BlockProgress("blocks", "joining", k + 1, n, f"joining the {layer} pieces")
    pairs = mutual_pairs(np.concatenate(pairs)) if pairs else np.zeros((0, 2), np.int64)
    return join_objects(tables, pairs, consensus.min_size, consensus.min_extent)


def _relabel_chunk(chunk: np.ndarray, luts: dict, grid_shape: tuple, semantic_scale: int,
                   block_info=None) -> np.ndarray:
    if semantic_scale:
        return (chunk * semantic_scale).astype(np.int32)
    index = int(np.ravel_multi_index(block_info[0]["chunk-location"], grid_shape))
    lut = luts[index]
    local = (chunk - uid_base(index)).clip(0, lut.size - 1)
    return np.where(chunk > 0, lut[local], 0).astype(np.int32)


def output_chunks(shape: tuple) -> tuple:
    """Chunks of the written labels: slabs of 32 slices of 256 x 256 (a slice viewer reads few
    of them, a 3D reader not too many)."""
    return tuple(min(s, c) for s, c in zip(shape, (32, 256, 256)))


def pyramid_factors(shape: tuple, smallest: int = 64) -> list[dict]:
    """Downsampling factors of the output's multiscale levels (2, 4, ... along each axis
    while the level stays at least ``smallest`` voxels along its largest side).

    >>> [f["x"] for f in pyramid_factors((100, 1000, 1000))]
    [2, 4, 8]
    """
    out, f = [], 2
    while max(shape) // f >= smallest:
        out.append({a: (f if n // f >= 1 else 1) for a, n in zip("zyx", shape)})
        f *= 2
    return out


def coarse_level(path: str | os.PathLike, max_side: int = 160) -> tuple[np.ndarray, int]:
    """The first level of an OME-Zarr output whose largest side is at most ``max_side`` (else
    the coarsest), read into memory, and its downsampling factor (a 3D preview of labels
    larger than memory)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    base = group[datasets[0]["path"]].shape
    chosen = datasets[-1]["path"]
    for d in datasets:
        if max(group[d["path"]].shape) <= max_side:
            chosen = d["path"]
            break
    arr = np.asarray(group[chosen][...])
    return arr, int(round(max(b / s for b, s in zip(base, arr.shape))))


def write_output(store: WorkStore, luts: dict, output: Path, voxel_size: tuple | None,
                 semantic_scale: int = 0, layer: str = "labels") -> Path:
    """One layer's final labels as an OME-Zarr multiscale image (nearest-neighbour pyramid),
    written under a temporary name and renamed onto ``output`` when complete."""
    import warnings

    import dask
    import dask.array as da
    import zarr

    with warnings.catch_warnings():  # the module builds a deprecated Scaler as a default
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.scale import Methods
        from ome_zarr.writer import write_image

    from nbapp.io import _replace_tree, _temp_name, remove_stale_temporaries

    grid_shape = tuple(max(b.position[a] for b in store.grid) + 1 for a in range(3))
    src = da.from_zarr(store.labels(layer=layer))
    labels = src.map_blocks(_relabel_chunk, luts, grid_shape, semantic_scale, dtype=np.int32)
    shape = tuple(store.shape)
    labels = labels.rechunk(output_chunks(shape))
    remove_stale_temporaries(output)
    tmp = output.parent / _temp_name(output.name, "part" + output.suffix)
    try:
        group = zarr.open_group(str(tmp), mode="w")
        scale = {a: float(v) for a, v in zip("zyx", voxel_size)} if voxel_size else None
        with dask.config.set({"array.chunk-size": "64MiB"}):
            write_image(labels, group, scale_factors=pyramid_factors(shape),
                        method=Methods.NEAREST, axes="zyx", scale=scale,
                        axes_units={a: "nanometer" for a in "zyx"} if voxel_size else None,
                        storage_options={"chunks": output_chunks(shape)}, name="labels")
        _replace_tree(tmp, output)
    except OSError as exc:
        raise InputError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


# -- the job ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Task:
    """Everything a worker (process or Dask) needs to run blocks of one job."""

    source: VolumeSource
    model: str
    batch_size: int
    store: str
    params: VolumeParams
    blocks: BlockParams
    intensity: tuple
    thing_list: tuple
    #: sha256 of the model's weights when the job started (a worker refuses another file)
    digest: str | None = None

    def run(self, index: int) -> dict:
        """Run block ``index`` in this worker: open the volume, the store and the engine of
        this worker, compute, write. Returns the block's timings."""
        from nbapp.cluster import worker_engine
        from nbapp.volume import sequential_heads

        engine = worker_engine(self.model, self.batch_size, _DEVICE[0] if _DEVICE else None,
                               self.digest)
        store = WorkStore.attach(self.store)

        def heads(sub, plane, sp, intensity):
            return sequential_heads(engine, sub, plane, sp, intensity)

        return _drained(run_block(heads, self.source.open(), store, store.grid[index],
                                  self.params, self.blocks, self.intensity, self.thing_list))


@dataclass(frozen=True)
class _ConsensusTask:
    """Everything a worker needs to run the consensus of blocks from stored stacks."""

    sources: tuple  # VolumeSource of the xy, xz and yz stacks
    store: str
    consensus: ConsensusParams
    halo: int

    def run(self, index: int) -> dict:
        store = WorkStore.attach(self.store)
        stacks = {p: s.open() for p, s in zip(PLANES, self.sources)}
        return consensus_block(stacks, store, store.grid[index], self.consensus, self.halo)


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


def _block_task(task, index: int) -> dict:
    """Run one block of ``task`` (a :class:`_Task` or :class:`_ConsensusTask`) in a worker
    process or a Dask worker; returns its timings."""
    return task.run(index)


def _drained(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


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
    :class:`BlockwiseResult`.

    Parameters
    ----------
    engines : list of Engine
        One per device (in-process runs; the first one's model and checks otherwise).
    volume : (Z, Y, X) array
        Read lazily block by block (zarr, memory-mapped, HDF5 dataset, numpy).
    output : path ending in ``.zarr``
        Where the labels go (OME-Zarr); the work store sits beside it until the job ends. With
        ``params.return_stacks`` each plane's stack goes beside it too
        (:func:`nbapp.io.stack_paths`: ``OUT_xy.zarr`` ...), written before the labels.
    client : dask.distributed.Client, optional
        Run one task per block on the cluster (needs ``source`` and a file ``model``).
    workers : "threads" or "processes"
        In-process (default) or one worker process per engine's device (needs ``source`` and
        a file ``model``).
    """
    from nbapp.io import stack_paths
    from nbapp.volume import check_volume, sequential_heads

    output = _check_output(output)
    if workers not in ("threads", "processes"):
        raise InputError(f"workers must be 'threads' or 'processes', got {workers!r}")
    check_volume(volume)
    blocks = blocks.resolved(params)
    shape = tuple(int(s) for s in volume.shape)
    engine = engines[0]
    thing_list = tuple(engine.model.config.thing_list)
    block_size = choose_block_size(shape, params, blocks)
    reach = max(blocks.halo, (params.median_size - 1) // 2 + STITCH_DEPTH)
    smallest = np.min([box_shape(grow(b.core, reach, shape))
                       for b in block_grid(shape, block_size)], axis=0)
    for plane in params.planes:  # every block's slices must be large enough for the network
        ax = plane_axis(plane)
        side = tuple(int(s) for i, s in enumerate(smallest) if i != ax)
        if hasattr(engine, "check_size"):
            try:
                engine.check_size(side, params.slice.downsampling, f"{plane} slice of a block")
            except InputError as exc:
                raise InputError(f"{exc}: blocks of {'x'.join(map(str, block_size))} with a "
                                 f"{blocks.halo}-voxel halo are too small for this model here; "
                                 "give a larger block size") from None
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
    job = job_identity(source_id or "array", shape, volume.dtype, model_id, params, blocks,
                       intensity)
    skipped = store.open(job, shape, block_size, tuple(outputs), resume=source_id is not None)
    try:  # the lock is held until the job ends, in any way
        if not remote:
            from nbapp.jobs import DevicePool

            pool = DevicePool(engines) if len(engines) > 1 else None

            def heads(sub, plane, sp, intensity_):
                if pool is not None:
                    return pool.heads(sub, plane, sp, intensity_)
                return sequential_heads(engine, sub, plane, sp, intensity_)

            def local(block):
                return run_block(heads, volume, store, block, params, blocks, intensity,
                                 thing_list)

            task = None
        else:
            local = None
            task = _Task(source, model_spec, batch_size or getattr(engine, "batch_size", 4),
                         str(store.path), params, blocks, intensity, thing_list,
                         model_id.get("weights"))
        timings = {}
        yield from _blocks_steps(store, skipped, local, task, client,
                                 [str(e.device) for e in engines], timings, store.note)
        semantic = params.slice.semantic_only
        tables = yield from _finish_steps(store, outputs, params.consensus, voxel_size, timings,
                                          semantic_scale=(params.slice.label_divisor or 1)
                                          if semantic else 0)
        if not keep_work:
            store.remove()
        rows = tables.pop("labels")
        return BlockwiseResult(output, shape, len(rows), len(store.grid), skipped, block_size,
                               timings, rows, {p: outputs[p] for p in tables},
                               {p: len(r) for p, r in tables.items()})
    finally:
        store.unlock()


def _blocks_steps(store: WorkStore, skipped: int, local, task, client, devices: list,
                  timings: dict, note: str | None = None
                  ) -> Generator[BlockProgress, None, None]:
    """Run every block of ``store`` not finished yet: in this process (``local(block)``, a
    generator of progress), else ``task`` on the Dask ``client`` or in one worker process per
    device. The first report carries ``note`` (why an earlier run was not resumed). Raises
    when a block did not finish."""
    todo = [b for b in store.grid if b.index not in store.finished()]
    total = len(store.grid)
    t_start = time.perf_counter()
    done = skipped
    yield BlockProgress("blocks", "network", done, total,
                        note or (f"{skipped} of {total} blocks already done" if skipped else None),
                        note)
    if todo and local is not None:
        for block in todo:
            gen = local(block)
            while True:
                try:
                    p = next(gen)
                except StopIteration:
                    break
                yield BlockProgress("blocks", "network", done, total, f"block {done + 1}/"
                                    f"{total}: {p.plane} slice {p.done}/{p.total}")
            done += 1
            yield BlockProgress("blocks", "network", done, total, _rate(done - skipped, t_start))
    elif todo:
        runs = (_dask_blocks(client, task, todo) if client is not None
                else _process_blocks(task, todo, devices))
        for _ in runs:
            done += 1
            yield BlockProgress("blocks", "network", done, total, _rate(done - skipped, t_start))
    timings["blocks_s"] = time.perf_counter() - t_start
    missing = set(b.index for b in store.grid) - store.finished()
    if missing:
        raise NbappError(f"blocks {sorted(missing)[:5]} did not finish; re-run the same "
                         "command to resume")


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


# -- consensus from stored stacks, block by block ----------------------------------------------

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


def consensus_blockwise_steps(stacks: dict, output: str | os.PathLike,
                              consensus: ConsensusParams = ConsensusParams(),
                              blocks: BlockParams = BlockParams(), sources: dict | None = None,
                              client=None, voxel_size=None, keep_work: bool = False
                              ) -> Generator[BlockProgress, None, BlockwiseResult]:
    """Ortho-plane consensus from stored per-plane stacks, block by block (stacks larger than
    memory, e.g. the ``OUT_xy.zarr`` ... of a blockwise job with ``return_stacks``), as a
    generator of :class:`BlockProgress` returning a :class:`BlockwiseResult`.

    Each block reads the three stacks on its core and a halo, runs the consensus there and
    writes its core; the pieces are joined and filtered as in a blockwise job. Re-running it on
    the same files resumes.

    Parameters
    ----------
    stacks : {"xy", "xz", "yz"} -> (Z, Y, X) integer arrays (read lazily block by block)
    output : path ending in ``.zarr``
    consensus : ConsensusParams
        Vote threshold, permit one stack, Min Size / Min Box Extent (on the joined objects).
    blocks : BlockParams
        Block size (default: from the memory budget) and halo (default 32).
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
    halo = blocks.halo if blocks.halo is not None else 32
    block_size = choose_block_size(shape, VolumeParams(), BlockParams(
        blocks.block_size, halo, blocks.memory_budget))
    store = WorkStore(output)
    ids = {p: input_id(stacks[p], sources[p] if sources else None) for p in PLANES}
    job = {"version": 3, "kind": "consensus", "halo": halo, "consensus": repr(consensus),
           "stacks": {p: [ids[p] or "array", file_stamp(ids[p] or "array:"),
                          str(stacks[p].dtype)] for p in PLANES}}
    skipped = store.open(job, shape, block_size, resume=None not in ids.values())
    try:
        task = None
        local = None
        if client is not None:
            task = _ConsensusTask(tuple(sources[p] for p in PLANES), str(store.path), consensus,
                                  halo)
        else:
            def local(block):
                yield from ()  # (a generator, with no progress within a block)
                return consensus_block(stacks, store, block, consensus, halo)

        timings: dict = {}
        yield from _blocks_steps(store, skipped, local, task, client, [], timings, store.note)
        rows = (yield from _finish_steps(store, {"labels": output}, consensus, voxel_size,
                                         timings))["labels"]
        if not keep_work:
            store.remove()
        return BlockwiseResult(output, shape, len(rows), len(store.grid), skipped, block_size,
                               timings, rows, kind="consensus")
    finally:
        store.unlock()


def _rate(done: int, t0: float) -> str | None:
    dt = time.perf_counter() - t0
    return f"{dt / done:.1f} s per block" if done > 0 and dt > 0 else None


def _process_blocks(task: _Task, todo: list, devices: list) -> Generator[dict, None, None]:
    """One worker process per device; at most two blocks queued per worker."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    pending: set = set()
    waiting = list(todo)
    threads = max(1, usable_cores() // len(devices))
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_process_worker,
                             initargs=(queue, threads)) as pool:
        try:
            while waiting or pending:
                while waiting and len(pending) < 2 * len(devices):
                    pending.add(pool.submit(_block_task, task, waiting.pop(0).index))
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield fut.result()
        finally:
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


def _dask_blocks(client, task: _Task, todo: list) -> Generator[dict, None, None]:
    """One Dask task per block; results (timings) arrive as the blocks finish."""
    from dask.distributed import as_completed

    futures = [client.submit(_block_task, task, b.index, pure=False, key=f"nbapp-block-{b.index}-"
                             f"{os.getpid()}-{time.time_ns()}") for b in todo]
    try:
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        for fut in futures:
            fut.cancel()
