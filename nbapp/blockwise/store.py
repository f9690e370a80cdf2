"""The work store of a blockwise job, a folder beside its output: what the network stage and
the block stage have finished, so that a re-run resumes.

Layout of ``.OUT.nbapp-work/``:

* ``network.json``: the network stage's identity (:func:`~nbapp.blockwise.identity.network_identity`)
  and the slab thickness of each plane;
* ``raw_xy.zarr`` ...: each plane's per-slice panoptic labels (the network, the median and the
  2D post-processing of whole slices), one zarr chunk per slab along the slicing axis, and
  ``slabs/PLANE-K.done`` for each slab written;
* ``fwd_xy.zarr`` ... and ``trk_xy.zarr`` ...: each plane's forward-pass and tracked labels
  (:mod:`~nbapp.blockwise.tracks`; the forward labels are removed when the plane is done),
  and ``tracks/PLANE.done``;
* ``job.json``: the block stage's identity (the network's, plus the grid and the consensus
  settings);
* ``records/stats-BLOCK.npz``: each block's tables (:func:`~nbapp.blockwise.blocks.count_block`)
  and ``decisions.npz``, what was decided from them;
* ``labels.zarr`` (and ``xy.zarr`` ... for returned stacks): block-unique ids, one zarr chunk
  per block so that concurrent writers never share a chunk, and ``records/BLOCK.npz`` (one per
  written block: each layer's object table and the object each local id stands for).

A store of another network is removed; a store of the same network with other block settings
keeps its per-slice and tracked labels (the network is not run again) and starts the blocks
over.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from nbapp.blockwise.identity import what_differs
from nbapp.blockwise.plan import slabs
from nbapp.consensus import compact_labels
from nbapp.errors import InputError
from nbapp.stitch import Block, block_grid, core_table, to_slices, uid_base
from nbapp.volume import plane_axis

__all__ = ["WorkStore", "RAW_SIDE", "local_ids"]

#: Chunk side of the per-slice label stacks across the slicing axis.
RAW_SIDE = 256


def local_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` numbered 1..m (0 stays background) and the id each local number stands
    for (``ids[0]`` is 0).

    >>> ids, local = local_ids(np.array([9, 0, 4, 9]))
    >>> ids.tolist(), local.tolist()
    ([0, 4, 9], [2, 0, 1, 2])
    """
    ids, local = compact_labels(labels)
    if not ids.size or ids[0] != 0:
        return np.r_[0, ids].astype(np.int64), local + 1
    return ids, local


class WorkStore:
    """The work folder of a blockwise job (see the module docstring for its layout)."""

    def __init__(self, output: str | os.PathLike):
        output = Path(output)
        self.output = output
        self.path = output.parent / f".{output.name}.nbapp-work"
        self.shape: tuple = ()
        self.grid: list[Block] = []
        self.layers: tuple = ("labels",)
        #: Each plane's slabs ((lo, hi) along its slicing axis) of the network stage
        self.slabs: dict = {}
        #: Why :meth:`open` did not resume all of an earlier run's store (None: resumed, or none)
        self.note: str | None = None

    # opening and resuming
    def open(self, job: dict, shape: tuple, block_size: tuple, layers: tuple = ("labels",),
             resume: bool = True, network: dict | None = None, thickness: dict | None = None
             ) -> int:
        """Create the store, or reuse a previous run's: all of it for the same ``job``, its
        per-slice labels for the same ``network`` (identity; ``thickness``: slices per slab of
        each plane), nothing otherwise, or when ``resume`` is False. Returns how many blocks
        are already finished; :attr:`note` says what was not reused, and why."""
        import zarr

        self.shape = tuple(int(s) for s in shape)
        self.grid = block_grid(self.shape, block_size)
        self.layers = tuple(layers)
        chunks = tuple(hi - lo for lo, hi in self.grid[0].core)
        self.lock()
        self.note = None
        net_text = None
        if network is not None:
            thickness = {p: int(t) for p, t in (thickness or {}).items()}
            net_text = json.dumps(dict(network, slabs=thickness), sort_keys=True, default=str)
            self.slabs = {p: slabs(self.shape[plane_axis(p)], t) for p, t in thickness.items()}
        job = dict(job, shape=list(self.shape), chunks=list(chunks), layers=list(self.layers))
        text = json.dumps(job, sort_keys=True, default=str)
        meta, net_meta = self.path / "job.json", self.path / "network.json"
        if self.path.exists():
            old = meta.read_text() if meta.exists() else None
            old_net = net_meta.read_text() if net_meta.exists() else None
            raw_kept = (resume and network is not None and old_net == net_text
                        and all((self.path / f"raw_{p}.zarr").exists() for p in self.slabs))
            if resume and old == text and (network is None or raw_kept) \
                    and all((self.path / f"{n}.zarr").exists() for n in self.layers):
                return len(self.finished())
            if resume:
                why = (what_differs(old_net or old, network) if network is not None and not raw_kept
                       else what_differs(old, job))
                self.note = (f"the work store at {self.path} was made {why}; " + (
                    "its network outputs are reused and the blocks start over" if raw_kept
                    else "starting fresh"))
            if raw_kept:
                self._remove_blocks()
            else:
                shutil.rmtree(self.path)  # another job's (or a broken) work folder
        if network is not None and not net_meta.exists():
            (self.path / "slabs").mkdir(parents=True, exist_ok=True)
            for p, cuts in self.slabs.items():
                ax = plane_axis(p)
                raw_chunks = tuple(cuts[0][1] - cuts[0][0] if a == ax else min(n, RAW_SIDE)
                                   for a, n in enumerate(self.shape))
                zarr.create_array(str(self.path / f"raw_{p}.zarr"), shape=self.shape,
                                  chunks=raw_chunks, dtype="int32", fill_value=0)
                for kind in ("fwd", "trk"):
                    zarr.create_array(str(self.path / f"{kind}_{p}.zarr"), shape=self.shape,
                                      chunks=raw_chunks, dtype="int64", fill_value=0)
            (self.path / "tracks").mkdir(exist_ok=True)
            net_meta.write_text(net_text)
        (self.path / "records").mkdir(parents=True, exist_ok=True)
        for name in self.layers:
            zarr.create_array(str(self.path / f"{name}.zarr"), shape=self.shape, chunks=chunks,
                              dtype="int64", fill_value=0)
        meta.write_text(text)
        return 0

    def _remove_blocks(self) -> None:
        """The block stage's files (the network stage's are kept)."""
        (self.path / "job.json").unlink(missing_ok=True)
        shutil.rmtree(self.path / "records", ignore_errors=True)
        (self.path / "decisions.npz").unlink(missing_ok=True)
        for folder in self.path.glob("*.zarr"):
            if not folder.name.startswith(("raw_", "fwd_", "trk_")):
                shutil.rmtree(folder, ignore_errors=True)

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
        """Open the existing store at ``path`` (in a worker): shape, grid, layers and slabs
        from its ``job.json`` and ``network.json``."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.output = None
        store.note = None
        job = json.loads((store.path / "job.json").read_text())
        store.shape = tuple(job["shape"])
        store.grid = block_grid(store.shape, tuple(job["chunks"]))
        store.layers = tuple(job["layers"])
        net = store.path / "network.json"
        thickness = json.loads(net.read_text())["slabs"] if net.exists() else {}
        store.slabs = {p: slabs(store.shape[plane_axis(p)], t) for p, t in thickness.items()}
        return store

    # the network stage: per-slice labels, slab by slab
    def raw(self, plane: str, mode: str = "r"):
        """One plane's stack of per-slice labels."""
        import zarr

        return zarr.open_array(str(self.path / f"raw_{plane}.zarr"), mode=mode)

    def slab_box(self, plane: str, k: int) -> tuple:
        """The box of slab ``k`` of ``plane`` in the volume."""
        ax = plane_axis(plane)
        return tuple(self.slabs[plane][k] if a == ax else (0, n)
                     for a, n in enumerate(self.shape))

    def slabs_finished(self) -> set:
        """``(plane, k)`` of every slab written."""
        folder = self.path / "slabs"
        if not folder.exists():
            return set()
        out = set()
        for p in folder.glob("*.done"):
            plane, _, k = p.stem.partition("-")
            out.add((plane, int(k)))
        return out

    def write_slab(self, plane: str, k: int, labels: np.ndarray) -> None:
        """Slab ``k``'s per-slice labels, then its mark (a slab with a mark is finished)."""
        from nbapp.io import write_small

        self.raw(plane, "r+")[to_slices(self.slab_box(plane, k))] = labels
        write_small(self.path / "slabs" / f"{plane}-{k}.done", lambda f: f.write(b""))

    # the tracking stage: each plane's tracked labels
    def tracked(self, plane: str, kind: str = "tracked", mode: str = "r"):
        """One plane's forward-pass (``kind="forward"``) or tracked labels."""
        import zarr

        name = {"forward": "fwd", "tracked": "trk"}[kind]
        return zarr.open_array(str(self.path / f"{name}_{plane}.zarr"), mode=mode)

    def mark_tracked(self, plane: str) -> None:
        """Mark a plane's tracking finished (and drop its forward labels)."""
        from nbapp.io import write_small

        write_small(self.path / "tracks" / f"{plane}.done", lambda f: f.write(b""))
        shutil.rmtree(self.path / f"fwd_{plane}.zarr", ignore_errors=True)

    def tracks_finished(self) -> set:
        folder = self.path / "tracks"
        return {p.stem for p in folder.glob("*.done")} if folder.exists() else set()

    # the block stage
    def labels(self, mode: str = "r", layer: str = "labels"):
        """One layer's array of block-unique ids."""
        import zarr

        return zarr.open_array(str(self.path / f"{layer}.zarr"), mode=mode)

    def finished(self) -> set:
        folder = self.path / "records"
        return {int(p.stem) for p in folder.glob("*.npz") if p.stem.isdigit()} \
            if folder.exists() else set()

    def record_path(self, index: int) -> Path:
        return self.path / "records" / f"{index}.npz"

    def stats_path(self, index: int) -> Path:
        return self.path / "records" / f"stats-{index}.npz"

    def stats_finished(self) -> set:
        folder = self.path / "records"
        return {int(p.stem.split("-")[1]) for p in folder.glob("stats-*.npz")} \
            if folder.exists() else set()

    def write_global(self, block: Block, layers: dict, semantic: bool) -> None:
        """Each layer's labels of the block's core (ids that are one object wherever they
        occur, or classes) into its array, then the block's record: the object table of
        each layer and the id each of its local ids stands for (atomically)."""
        from nbapp.io import write_small

        arrays = {}
        for name in self.layers:
            core = np.ascontiguousarray(layers[name])
            if semantic:
                self.labels("r+", name)[to_slices(block.core)] = core.astype(np.int64)
                continue
            ids, local = local_ids(core)
            base = uid_base(block.index)
            self.labels("r+", name)[to_slices(block.core)] = np.where(local > 0, local + base, 0)
            for k, v in core_table(local, block.core, self.shape).items():
                arrays[f"{name}.table_{k}"] = v
            arrays[f"{name}.globals"] = ids.astype(np.int64)
        write_small(self.record_path(block.index), lambda f: np.savez_compressed(f, **arrays))

    def read_record(self, index: int, layer: str = "labels") -> tuple[dict, np.ndarray]:
        """One layer's object table of a written block, and the id each of its local ids
        stands for."""
        head = f"{layer}.table_"
        with np.load(self.record_path(index)) as z:
            table = {k[len(head):]: z[k] for k in z.files if k.startswith(head)}
            ids = z[f"{layer}.globals"] if f"{layer}.globals" in z.files else np.zeros(1, np.int64)
        return table, ids

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()
