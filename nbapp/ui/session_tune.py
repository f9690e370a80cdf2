"""Proofreading the visible slice and fine-tuning on the corrected slices, as a part of
:class:`nbapp.ui.session.Session`.

Edits go through a :class:`nbapp.proofread.LabelEditor` per (data, plane, index) (so going to
another slice and back keeps them); ``state.edited`` holds the edited labels of the visible
slice. "Add to training set" stores the slice in ``nbapp-training/`` inside the data root (or
beside the data); "Fine-tune" trains the current model on the stored slices in a background
job (``state.tuning``), and the tuned model becomes the active one when it ends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nbapp.errors import InputError
from nbapp.jobs import JobState
from nbapp.proofread import LabelEditor, TrainingSet
from nbapp.ui.threads import call_in_ui
from nbapp.workspace import release, reserve_numbered


def _which(indices) -> str:
    """'slice 3' or 'slices 3, 9 and 14' (the slices a score is on).

    >>> _which([3]), _which([3, 9, 14])
    ('slice 3', 'slices 3, 9 and 14')
    """
    idx = [str(i) for i in indices]
    return f"slice {idx[0]}" if len(idx) == 1 else f"slices {', '.join(idx[:-1])} and {idx[-1]}"

__all__ = ["TuneActions", "EDIT_MODES"]

EDIT_MODES = ("view", "delete", "merge", "paint", "erase")


class TuneActions:
    """Proofreading and fine-tuning actions of :class:`~nbapp.ui.session.Session` (a base class
    of it; it provides ``state``, ``data_root``, ``tuning`` (a JobRunner), ``report`` and
    ``use_model``, and holds ``_editors`` (edits per slice) and ``_merge_from``)."""

    # -- proofreading
    def _edit_key(self):
        r = self.state.result2d
        d = self.state.data
        if r is None or d is None:
            return None
        return (d.name, id(d.array), r.plane, r.index, r.region)

    def _editor(self) -> LabelEditor | None:
        """The editor of the visible slice (made from its current result on first use)."""
        key = self._edit_key()
        if key is None:
            self.state.say("no result to proofread yet: wait for the slice to be segmented",
                           "warning")
            return None
        if key not in self._editors:
            self._editors[key] = LabelEditor(self.state.result2d.labels)
        return self._editors[key]

    def show_edits(self) -> None:
        """Point ``state.edited`` at the visible slice's edits (None when it has none)."""
        key = self._edit_key()
        ed = self._editors.get(key)
        self.state.edited = ed.labels if ed is not None and ed.edits else None

    def _edited(self, before: np.ndarray, ed: LabelEditor, what: str) -> None:
        if ed.labels is before:
            return
        self.state.edited = ed.labels
        self.state.say(f"{what}; {ed.edits} edit(s) on this slice (Undo takes the last back)", "ok")

    def edit_click(self, y: float, x: float) -> None:
        """A click on the viewer in the delete or merge tool."""
        mode = self.state.edit_mode
        ed = self._editor()
        if ed is None:
            return
        before = ed.labels
        if mode == "delete":
            i = ed.id_at(y, x)
            ed.delete(y, x)
            self._edited(before, ed, f"object {i} deleted")
        elif mode == "merge":
            self._merge_click(ed, y, x)

    #: Objects farther apart than this (pixels) merge only when the second click is repeated.
    MERGE_GAP = 3.0

    def _merge_click(self, ed: LabelEditor, y: float, x: float) -> None:
        """Merge: the first click picks an object, the second merges its object into the
        first; objects that do not touch merge only when that second click is repeated. Picks
        live on one slice with one tool and model (:meth:`clear_merge_pick`)."""
        key, here = self._edit_key(), ed.id_at(y, x)
        pick = self._merge_from if self._merge_from and self._merge_from[0] == key else None
        if pick is None:
            if here == 0:
                self.state.say("merge: click on an object first", "warning")
                return
            self._merge_from = (key, (y, x), None)
            self.state.say(f"merge: object {here} picked; click the object to merge into it",
                           "info")
            return
        _, first, confirm = pick
        a = ed.id_at(*first)
        if here == 0 or here == a:
            self.state.say(f"merge: object {a} stays picked; click another object "
                           "(View cancels)", "info")
            return
        gap = ed.gap(first, (y, x))
        if gap > self.MERGE_GAP and confirm != here:
            self._merge_from = (key, first, here)
            self.state.say(f"merge: objects {here} and {a} do not touch (they are {gap:.0f} "
                           f"pixels apart); click object {here} again to merge them anyway, or "
                           "View to cancel", "warning")
            return
        self._merge_from = None
        before = ed.labels
        ed.merge(first, (y, x))
        self._edited(before, ed, f"object {here} merged into {a}")

    def clear_merge_pick(self, change=None) -> None:
        """Forget a pending merge pick (a tool, slice, plane, data or model change)."""
        if self._merge_from is not None:
            self._merge_from = None
            if change is not None and change.get("name") == "edit_mode" and change.new != "merge":
                self.state.say("merge pick cleared", "info")

    def edit_stroke(self, points: list) -> None:
        """A brush stroke (list of (y, x)) in the paint or erase tool."""
        mode = self.state.edit_mode
        ed = self._editor()
        if ed is None or not points:
            return
        before = ed.labels
        radius = self.state.brush
        if mode == "paint":
            label = ed.id_at(*points[0])
            ed.paint(points, radius)
            self._edited(before, ed, f"painted object {label or ed.labels.max()}"
                         + (" (extended)" if label else " (new)"))
        elif mode == "erase":
            ed.erase(points, radius)
            self._edited(before, ed, "erased")

    def undo_edit(self) -> None:
        ed = self._editors.get(self._edit_key())
        if ed is None or not ed.edits:
            self.state.say("nothing to undo on this slice", "info")
            return
        ed.undo()
        self.state.edited = ed.labels if ed.edits else None
        self.state.say(f"undone; {ed.edits} edit(s) left on this slice", "ok")

    def discard_edits(self) -> None:
        key = self._edit_key()
        self._editors.pop(key, None)
        self.state.edited = None
        self.state.say("edits of this slice discarded", "info")

    # -- the training set
    def training_set(self) -> TrainingSet:
        """The visitor's own training set, or ``nbapp-training/`` in the data root, or beside
        the data, or here (:meth:`nbapp.workspace.Workspace.training`)."""
        d = self.state.data
        src = (d.meta or {}).get("path") if d is not None else None
        return TrainingSet(self.workspace.training(beside=src))

    def add_to_training(self) -> bool:
        """Store the visible slice (its edits, or the result as it is) in the training set."""
        st = self.state
        r = st.result2d
        if r is None or st.data is None:
            st.say("nothing to add: no segmented slice yet", "warning")
            return False
        ed = self._editors.get(self._edit_key())
        labels = ed.labels if ed is not None else r.labels
        try:
            ts = self.training_set()
            ts.add(r.image, labels, r.labels, data=st.data.name, plane=r.plane, index=r.index,
                   downsampling=r.params.downsampling, model=st.model_info.get("name"),
                   edits=ed.edits if ed is not None else 0)
        except InputError as exc:
            self.report(exc, "cannot add the slice")
            return False
        if ed is not None:
            ed.stored = True  # in the training set: the tuned model's result replaces it later
        st.training = ts.summary()
        st.say(f"{r.plane} slice {r.index} added to the training set ({st.training}, in "
               f"{ts.folder})", "ok")
        return True

    # -- fine-tuning
    def start_finetune(self, minutes: float = 3.0) -> bool:
        """Fine-tune the current model on the stored slices in the background; the tuned model
        becomes the active one when it ends (False if it could not start)."""
        from nbapp.fewshot import (FinetuneParams, corrected_weights, finetune, score_slices,
                                   tune_thresholds)
        from nbapp.jobs import JobBusyError, callback_steps

        st = self.state
        ts = self.training_set()
        slices = ts.slices()
        if not slices:
            st.say("the training set is empty: proofread a slice and add it first", "warning")
            return False
        if st.model is None:
            st.say("load a model first", "warning")
            return False
        spec = st.model.config.config_path or st.model.weights or st.model_spec
        ds = st.slice_params.downsampling
        from nbapp.objects import plane_pixel_size

        pixel = plane_pixel_size(st.data.voxel_size, st.plane) if st.data is not None else None
        try:
            params = FinetuneParams(minutes=float(minutes), downsampling=ds)
        except Exception as exc:  # noqa: BLE001
            self.report(exc, "cannot fine-tune")
            return False
        images = [s.image for s in slices]
        labels = [s.labels for s in slices]
        weights = [corrected_weights(s.labels, s.predicted, params.corrected_weight)
                   for s in slices]
        n = sum(s.objects for s in slices)
        try:  # reserved at once: two fine-tunes started together get two names
            self._reserved = reserve_numbered(ts.folder / "models", "tuned_", ".yaml")
            name = self._reserved.stem
        except InputError as exc:
            self.report(exc, "cannot fine-tune")
            return False
        before_model = st.model
        self._spec_before = self._model_box_text(before_model)
        name_now = st.data.name if st.data is not None else None
        held_out = self._truth_slices({int(s.meta.get("index", -1)) for s in slices
                                       if s.meta.get("plane") == "xy"
                                       and s.meta.get("data") == name_now})

        sp = st.slice_params  # the sliders the user tuned (for the model before)

        def run(report, cancel):
            res = finetune(images, labels, spec, params=params, weights=weights,
                           out=ts.folder / "models", name=name,
                           progress=lambda step, total, detail: report(step, total, detail),
                           cancel=cancel, device=str(before_model.device), pixel_size_nm=pixel)
            # scored with the user's sliders: what the page shows with each model
            scores = tuple(score_slices(m, images, labels, params=sp)
                           for m in (before_model, res.model))
            truth = None
            if held_out:
                idx, him, hla = held_out
                truth = {"slices": len(idx), "which": _which(idx),
                         **{k: score_slices(m, him, hla, params=sp)
                            for k, m in (("before", before_model), ("after", res.model))}}
            # the old sliders were tuned for the old model: choose the tuned model's on slices
            # it did not train on where there are any, else on the stored slices
            ims, las, on = (held_out[1], held_out[2], f"{_which(held_out[0])} (ground truth)") \
                if held_out else (images, labels, "the stored slices")
            thresholds = {**tune_thresholds(res.model, ims, las, sp), "on": on}
            return res, scores, truth, thresholds

        def job():
            # the loss curve redrawn once a second, not after every step: the page trained 15 %
            # slower than the command line (bench/bench_finetune_paths.py)
            return (yield from callback_steps(run, "fine-tune", min_interval_s=1.0))

        if self.tuning.busy:
            release(self._reserved)
            st.say("a fine-tuning run is going on: wait for it or cancel it first", "warning")
            return False
        st.say(f"fine-tuning {st.model_info.get('name')} on {len(slices)} slice(s) ({n} "
               f"objects) for up to {minutes:g} min at downsampling {ds}", "info")
        try:
            self.tuning.submit(job, name=name)
        except JobBusyError:
            release(self._reserved)
            st.say("a fine-tuning run is going on: wait for it or cancel it first", "warning")
            return False
        return True

    TRUTH_SLICES = 4  # xy slices with ground truth, not in the training set, scored after tuning

    def _truth_slices(self, exclude: set) -> tuple[list, list] | None:
        """Up to :attr:`TRUTH_SLICES` xy slices of the data with ground truth (spread evenly,
        none of ``exclude``): (indices, images, truths), or None without ground truth."""
        st = self.state
        if st.truth is None or st.data is None or st.data.array.ndim != 3:
            return None
        n = st.data.shape[0]
        picks = [int(z) for z in np.linspace(0, n - 1, self.TRUTH_SLICES + 2)[1:-1].round()]
        picks = [z for z in dict.fromkeys(picks) if z not in exclude]
        images, truths = [], []
        for z in picks:
            gt = self.truth_slice("xy", z)
            if gt is None:
                return None
            images.append(self.slice_image("xy", z)[0])
            truths.append(np.asarray(gt))
        return (picks, images, truths) if images else None

    def apply_tuned_thresholds(self) -> bool:
        """Set the sliders to the thresholds chosen for the tuned model after fine-tuning."""
        st = self.state
        best = (st.tune_scores or {}).get("thresholds")
        if not best or best["f1"] <= best["current_f1"] + 1e-9:
            st.say("no better thresholds to apply: fine-tune first", "info")
            return False
        st.slice_params = st.slice_params.replace(seg_threshold=best["seg_threshold"],
                                                  center_threshold=best["center_threshold"])
        st.say(f"applied the tuned model's thresholds (Segmentation {best['seg_threshold']:g}, "
               f"Center {best['center_threshold']:g}; F1@0.5 {best['f1']:.2f} on "
               f"{best['on']})", "ok")
        return True

    def _model_box_text(self, model) -> str:
        """What to type in the Data tab's model box to load ``model`` again: 'default', a zoo
        name or the file it came from."""
        from nbapp.models import default_config_path

        spec = str(self.state.model_spec or "")
        if spec and not spec.startswith("("):  # (not "(in-memory model)")
            return spec
        path = getattr(model.config, "config_path", None)
        if path is not None and Path(path).resolve() == default_config_path().resolve():
            return "default"
        return str(path or getattr(model, "weights", None) or model.config.name)

    def cancel_finetune(self) -> None:
        """Stop fine-tuning; the active model stays as it was."""
        self.tuning.cancel()

    def _tuned(self, snap) -> None:
        call_in_ui(lambda: self._apply_tuned(snap))

    def _apply_tuned(self, snap) -> None:
        st = self.state
        st.tuning = snap
        if not snap.finished:
            return
        if snap.state == JobState.DONE and snap.result is not None:
            res, (before, after), truth, thresholds = snap.result
            previous = getattr(self, "_spec_before", None) or st.model_info.get("name", "")
            editors = self._editors
            for key in [k for k, ed in editors.items() if getattr(ed, "stored", False)]:
                del editors[key]  # stored slices now show the tuned model's result
            st.edited = None
            self.use_model(res.model)
            self.show_edits()
            st.tune_scores = {"before": before, "after": after, "steps": res.steps,
                              "minutes": res.seconds / 60, "config": str(res.config),
                              "stopped": res.stopped, "truth": truth,
                              "held_out": res.held_out,
                              "thresholds": thresholds}
            # the stored slices are what it trained on: where there is ground truth, other
            # slices say whether it generalises, and a drop there is a warning
            held = worse = ""
            if truth is not None:
                held = (f"; against the ground truth on {truth['which']} (not trained on) "
                        f"{truth['before']['f1']:.2f} -> {truth['after']['f1']:.2f}")
                if truth["after"]["f1"] < truth["before"]["f1"] - 0.02:
                    worse = (f". It is worse there than before: load {previous!r} in the Data "
                             "tab to go back, or proofread more slices and fine-tune again")
            better = ""
            if thresholds["f1"] > thresholds["current_f1"] + 1e-9:
                better = (f". Its best thresholds on {thresholds['on']}: Segmentation "
                          f"{thresholds['seg_threshold']:g}, Center {thresholds['center_threshold']:g} "
                          f"(F1@0.5 {thresholds['current_f1']:.2f} -> {thresholds['f1']:.2f}): "
                          "Apply tuned thresholds sets them")
            from nbapp.fewshot import held_out_text

            st.say(f"fine-tuned in {res.seconds / 60:.1f} min ({res.steps} steps, "
                   f"{res.stopped}): {held_out_text(res.held_out)}; F1@0.5 on the stored "
                   f"slices {before['f1']:.2f} -> {after['f1']:.2f}{held}; the tuned model "
                   f"{'(the starting weights, unchanged) ' if res.kept_start else ''}is "
                   "active and saved as "
                   f"{res.config}{worse}{better}", "warning" if worse else "ok")
        elif snap.state == JobState.CANCELLED:
            st.say("fine-tuning cancelled; the model is unchanged", "warning")
        elif snap.state == JobState.FAILED:
            st.say(f"fine-tuning failed: {snap.error}", "error")
        if snap.state != JobState.DONE and getattr(self, "_reserved", None) is not None:
            release(self._reserved)  # the name reserved for a model that was not made
