"""The 3D tab's actions (start, cancel and watch the 3D job, re-run the consensus, keep the
result of a job whose page was closed), as a part of :class:`nbapp.ui.session.Session`.

The job is built by :func:`nbapp.run3d.job_steps` and run by the session's ``JobRunner``; its
snapshots reach the state only through :func:`nbapp.ui.threads.call_in_ui`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from nbapp.errors import InputError, ModelError, NbappError
from nbapp.jobs import JobMarker, JobState, Snapshot
from nbapp.objects import object_table
from nbapp.params import PLANES
from nbapp.ui.threads import call_in_ui, kernel_id
from nbapp.workspace import EXPORT_FOLDER

__all__ = ["VolumeActions", "EXPORT_FOLDER"]


class VolumeActions:
    """3D actions of :class:`~nbapp.ui.session.Session` (a base class of it; it provides
    ``state``, ``jobs``, ``data_root``, ``report`` and the model's engines)."""

    def _score_3d(self, labels) -> dict:
        """F1@0.5, PQ and FG IoU against the ground truth ({} without one): in 3D, or slice by
        slice (pooled) when the ground truth holds per-slice labels
        (:func:`nbapp.metrics.per_slice_truth`: a batch of 2D images scores near 0 in 3D)."""
        truth = self.state.truth
        if truth is None or np.shape(labels) != truth.shape:
            return {}
        from nbapp.metrics import headline_scores, per_slice_truth, slice_metrics

        if per_slice_truth(truth) is not None:
            m = slice_metrics(np.asarray(labels), truth)
            return {"f1": float(m["f1"]), "pq": float(m["pq"]), "fg_iou": float(m["fg_iou"]),
                    "of": "slice by slice"}
        return headline_scores(labels, truth)

    def _class_names(self) -> dict:
        """Names of the model's thing classes (3D objects are numbered 1..N: with one thing
        class each object is of that class)."""
        cfg = getattr(self.state.model, "config", None)
        return {c: cfg.class_names.get(c, str(c)) for c in cfg.thing_list} if cfg else {}

    def _engines_for(self, model) -> list:
        from nbapp.run3d import make_engines

        devices = tuple(self._job_devices or [str(model.device)])
        key = (id(model), devices)
        if key not in self._engines:
            self._engines = {key: make_engines(model, list(devices))}
        return self._engines[key]

    def run_3d(self) -> bool:
        """Start the 3D job (in JobRunner's thread); False if it could not start (among other
        reasons: it would need more memory than the kernel has)."""
        from nbapp.run3d import job_steps
        from nbapp.volume import check_job_memory

        st = self.state
        try:
            if st.data is None:
                raise InputError("load a volume first")
            if self.effective_kind() == "image":
                raise InputError("3D inference needs a volume (Z, Y, X); the data is one 2D "
                                 "image: load a volume, or use the 2D tab")
            if self.effective_kind() == "stack":
                raise InputError("3D inference needs a volume; the data is used as a stack of "
                                 "unrelated 2D images (Batch mode): turn Batch mode off to "
                                 "segment it as a volume")
            if st.model is None:
                raise ModelError("load a model first")
            vp = st.volume_params.replace(slice=st.slice_params.replace(batch_mode=False))
            engines = self._engines_for(st.model)
            volume, intensity = st.data.array, st.data.intensity
            if self.runs_blockwise():
                job, where = self._blockwise_job(engines, vp)
            else:
                check_job_memory(tuple(volume.shape), vp, engines[0])
                where = ""

                def job():
                    return job_steps(engines, volume, vp, intensity=intensity)

            st.say(f"3D job started: {'ortho-plane' if vp.orthoplane else vp.plane} on "
                   f"{', '.join(str(e.device) for e in engines)}{where}", "info")
            if not self.jobs.busy:
                self._marker = JobMarker.from_env(kernel_id())
                if self._marker is not None:
                    self._marker.begin()
            self.jobs.submit(job, name="3d")
        except Exception as exc:  # noqa: BLE001
            self._end_marker()
            self.report(exc, "cannot start the 3D job")
            return False
        return True

    def runs_blockwise(self) -> bool:
        """Whether the 3D job runs block by block: data left on disk, or asked for."""
        data = self.state.data
        return data is not None and (bool(data.meta.get("lazy")) or self.state.blockwise)

    def _blockwise_job(self, engines, vp) -> tuple:
        """The blockwise job of the data (a zero-argument callable for the runner) and where it
        writes: ``NAME_3d.zarr`` in the exports folder (the visitor's own). The name is the
        same for the same data, so that running again after a stop or a kernel restart resumes (the blocks
        already done are skipped)."""
        from nbapp.blockwise import BlockParams, VolumeSource, blockwise_steps

        st = self.state
        target = self._blockwise_target()
        src = st.data.meta.get("source")
        if src is not None and self.data_root is not None and not Path(src).is_absolute():
            src = str(self.data_root / src)  # the same file wherever the kernel runs from
        source = None if src is None else VolumeSource(
            src, None if self.data_root is None else str(self.data_root))
        volume, intensity, vs = st.data.array, st.data.intensity, st.data.voxel_size
        st.job_output = str(target)

        blocks = self.block_params
        if blocks is None:  # a facility (or a demo) may set the block size for its server
            env = os.environ.get("NBAPP_BLOCK_SIZE")
            blocks = BlockParams(block_size=int(env)) if env else BlockParams()

        def job():
            return blockwise_steps(engines, volume, target, vp, blocks, intensity=intensity,
                                   source=source, voxel_size=vs)

        return job, f", block by block into {target}"

    def _blockwise_target(self) -> Path:
        """``NAME_3d.zarr`` in the exports folder: the same for the same data, so that
        running again after a stop or a kernel restart resumes."""
        return self.workspace.exports() / f"{self._data_stem()}_3d.zarr"

    def _data_stem(self) -> str:
        """The data's name as a plain file-name stem ('demo volume' -> 'demo_volume')."""
        name = self.state.data.name if self.state.data is not None else "volume"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem).strip("._") or "volume"

    def _end_marker(self) -> bool:
        """Remove the running-job marker; True if the page was closed while the job ran."""
        marker, self._marker = self._marker, None
        if marker is None:
            return False
        orphaned = marker.orphaned
        marker.end()
        return orphaned

    def _save_for_closed_page(self, labels) -> None:
        """The page closed while the job ran: keep its result in the data root's
        ``nbapp-exports/`` (a visitor's: their own exports folder; the server shuts the kernel
        down right after)."""
        from nbapp.io import write_labels

        if self.data_root is None or labels is None:
            return
        try:
            target = self._write_new(f"{self._data_stem()}_3d_{time.strftime('%Y%m%d-%H%M%S')}.tif",
                                     lambda t: write_labels(t, labels))
        except (OSError, NbappError) as exc:
            self.report(exc, "saving the 3D result of a closed page failed")
            return
        self.state.say(f"the page was closed during the 3D job: labels saved to {target}", "ok")

    def cancel_3d(self) -> None:
        if self.jobs.busy:
            self.jobs.cancel()
            self.state.say("cancelling the 3D job ...", "warning")

    def _job_update(self, snap: Snapshot) -> None:
        call_in_ui(lambda: self._apply_job(snap))

    def _apply_job(self, snap: Snapshot) -> None:
        st = self.state
        if snap.job_id < st.job.job_id:
            return
        if snap.finished and self._marker is not None:
            if self._marker.orphaned and snap.state == JobState.DONE \
                    and not hasattr(snap.result, "table"):  # (a blockwise job's is on disk)
                self._save_for_closed_page(getattr(snap.result, "labels", None))
            self._end_marker()
        st.job = snap
        if snap.state == JobState.DONE and hasattr(snap.result, "table"):
            self._apply_blockwise(snap)
        elif snap.state == JobState.DONE and snap.result is not None:
            res = snap.result
            with st.hold_trait_notifications():
                st.stacks = dict(res.stacks)
                st.labels3d = res.labels
                st.table = object_table(res.labels, 0, self._class_names())
                st.result_slice = min(st.result_slice, res.labels.shape[0] - 1)
            t = res.timings
            st.score3d = self._score_3d(res.labels)
            how = f" {st.score3d['of']}" if "of" in st.score3d else ""
            score = (f"; against the ground truth{how} F1@0.5 {st.score3d['f1']:.3f}, PQ "
                     f"{st.score3d['pq']:.3f}, FG IoU {st.score3d['fg_iou']:.3f}"
                     if st.score3d else "")
            none_left = self._none_left()
            st.say(f"3D job done in {snap.elapsed:.1f} s: {len(st.table)} objects "
                   f"(network {t.get('network_s', 0):.1f} s, tracking {t.get('tracking_s', 0):.1f} s, "
                   f"consensus {t.get('consensus_s', 0):.1f} s){score}{none_left}",
                   "warning" if none_left else "ok")
        elif snap.state == JobState.CANCELLED:
            st.say("3D job cancelled", "warning")
        elif snap.state == JobState.FAILED:
            st.say(f"3D job failed: {snap.error}", "error")

    def _apply_blockwise(self, snap: Snapshot) -> None:
        """A blockwise job ended: its labels stay in their OME-Zarr store, read lazily."""
        st, res = self.state, snap.result
        names = self._class_names()
        label = next(iter(names.values()), "") if len(names) == 1 else ""
        with st.hold_trait_notifications():
            if res.kind == "segment":  # (a consensus re-run keeps the stacks it came from)
                st.stacks = {p: res.stack(p) for p in res.stacks}
                st.stack_objects = dict(res.stack_objects)
            st.labels3d = res.labels()
            st.table = [{**r, "class": label} for r in res.table]
            st.result_slice = min(st.result_slice, res.shape[0] - 1)
            st.score3d = {}
        again = res.resumed_text()
        what = "consensus re-run block by block" if res.kind == "consensus" else "3D job"
        stacks = f" (stacks beside it: {', '.join(p.name for p in res.stacks.values())})" \
            if res.stacks else ""
        st.say(f"{what} done in {snap.elapsed:.1f} s: {res.objects} objects, {res.blocks} "
               f"blocks{again}; labels in {res.path}{stacks}", "ok")

    def rerun_consensus(self) -> None:
        """Consensus again from the stored stacks with the current vote / min size / min extent /
        permit-one-stack (no network)."""
        from nbapp.volume import consensus

        st = self.state
        try:
            if not all(p in st.stacks for p in PLANES):
                raise InputError("re-running the consensus needs the xy, xz and yz stacks of an "
                                 "ortho-plane 3D job: run one first")
            if not all(isinstance(st.stacks[p], np.ndarray) for p in PLANES):
                self._rerun_consensus_blockwise()
                return
            t0 = time.perf_counter()
            labels = consensus(st.stacks, st.volume_params.consensus)
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "consensus failed")
            return
        with st.hold_trait_notifications():
            st.labels3d = labels
            st.table = object_table(labels, 0, self._class_names())
            st.score3d = self._score_3d(labels)
        cp = st.volume_params.consensus
        score = f"; F1@0.5 {st.score3d['f1']:.3f} against the ground truth" if st.score3d else ""
        none_left = self._none_left()
        st.say(f"consensus re-run in {time.perf_counter() - t0:.2f} s (vote {cp.vote_threshold}, "
               f"min size {cp.min_size}, min extent {cp.min_extent}, one stack "
               f"{'allowed' if cp.allow_one_view else 'not allowed'}): {len(st.table)} objects"
               f"{score}{none_left}", "warning" if none_left else "ok")

    def _none_left(self) -> str:
        """When the result has no object but a stack had some: what removed them all (the
        filters or the vote) and what to do; else ''."""
        st = self.state
        if st.table:
            return ""
        found = {p: int(np.count_nonzero(np.unique(s))) for p, s in st.stacks.items()
                 if isinstance(s, np.ndarray) and s.any()}
        if not found:
            return ""
        cp = st.volume_params.consensus
        had = ", ".join(f"{p} {n}" for p, n in found.items())
        return (f". The stacks had objects ({had}), but Min Size {cp.min_size}, Min Box Extent "
                f"{cp.min_extent} and the vote ({cp.vote_threshold} of 3) removed every one: "
                "lower them and press Re-run consensus")

    def _rerun_consensus_blockwise(self) -> None:
        """The stacks are on disk (a block-by-block job): the consensus runs block by block
        as a background job, into the job's labels store."""
        from nbapp.blockwise import BlockParams, VolumeSource, consensus_blockwise_steps
        from nbapp.io import stack_paths

        st = self.state
        if self.jobs.busy:
            raise InputError("a 3D job is running: wait for it or cancel it")
        stacks = dict(st.stacks)
        target = self._blockwise_target()
        root = None if self.data_root is None else str(self.data_root)
        # the stacks a block-by-block job wrote beside its labels (so that a re-run resumes)
        sources = {p: VolumeSource(str(path), root) for p, path in stack_paths(target).items()}
        cp = st.volume_params.consensus
        blocks = self.block_params or BlockParams()
        vs = st.data.voxel_size if st.data is not None else None

        def job():
            return consensus_blockwise_steps(stacks, target, cp, blocks, sources=sources,
                                             voxel_size=vs)

        st.job_output = str(target)
        st.say(f"consensus re-run started block by block into {target} (vote "
               f"{cp.vote_threshold}, min size {cp.min_size}, min extent {cp.min_extent})", "info")
        self.jobs.submit(job, name="3d")
