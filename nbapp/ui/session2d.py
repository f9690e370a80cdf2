"""The 2D tab's actions (live inference on the visible slice, compare downsampling, batch
mode, the box tool's suggestions), as a part of :class:`nbapp.ui.session.Session`.

Slider changes reach :meth:`SliceActions.request_2d`, which hands the work to the session's
``LatestRunner`` (debounced, latest request wins); results come back to the state only through
:func:`nbapp.ui.threads.call_in_ui`.
"""

from __future__ import annotations

import time

import numpy as np

from nbapp import region
from nbapp.errors import NbappError
from nbapp.intensity import intensity_range
from nbapp.metrics import headline_scores
from nbapp.objects import (plane_pixel_size, suggest_downsampling, suggest_filters,
                           suggest_from_mask, suggest_from_object, suggest_median)
from nbapp.params import LABELS, PLANES
from nbapp.ui.state import CompareResult, Result2D
from nbapp.ui.threads import call_in_ui

__all__ = ["SliceActions", "COMPARE_FACTORS"]

#: What "Compare downsampling" runs: enlarging (0.5) too, and always the current factor.
COMPARE_FACTORS = (0.5, 1, 2, 4, 8)
#: Panels of the comparison.
COMPARE_PANELS = 5
#: The values a parameter sweep scores (post-processing parameters: no network run).
SWEEPS = {
    "seg_threshold": tuple(round(0.1 * i, 2) for i in range(1, 10)),
    "center_threshold": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6),
    "min_distance": (1, 2, 3, 5, 7, 10, 15, 20),
}
#: What "Compare downsampling" shows when the scale suggestion enlarges by 4 (coarse pixels).
COMPARE_ENLARGING = (0.25, 0.5, 1, 2, 4)


def compare_factors(current: float, suggested: float | None = None) -> tuple:
    """The downsampling factors "Compare downsampling" runs: :data:`COMPARE_FACTORS` (or
    :data:`COMPARE_ENLARGING` when the scale suggestion enlarges by 4 or more), with the
    current and suggested factors always among them; at most :data:`COMPARE_PANELS`, dropping
    the ones farthest from the current.

    >>> compare_factors(1), compare_factors(16), compare_factors(1, 0.25)
    ((0.5, 1, 2, 4, 8), (1, 2, 4, 8, 16), (0.25, 0.5, 1, 2, 4))
    """
    base = COMPARE_ENLARGING if suggested is not None and suggested <= 0.25 else COMPARE_FACTORS
    keep = {current} | ({suggested} if suggested is not None else set())
    values = sorted(set(base) | keep)
    while len(values) > COMPARE_PANELS:
        far = max((v for v in values if v not in keep), key=lambda v: abs(np.log2(v / current)))
        values.remove(far)
    return tuple(values)


def compare_verdict(results: list, current: float) -> str:
    """The comparison's best factor against the ground truth ('' without one).

    >>> from types import SimpleNamespace as C
    >>> compare_verdict([C(downsampling=1, f1=0.52), C(downsampling=2, f1=0.63)], 1)
    '; best F1@0.5 at downsampling 2 (now 1: 0.520)'
    """
    scored = [c for c in results if getattr(c, "f1", None) is not None]
    if not scored:
        return ""
    best = max(scored, key=lambda c: c.f1)
    if best.downsampling == current:
        return f"; the current downsampling {current:g} scores best (F1@0.5 {best.f1:.3f})"
    now = [c.f1 for c in scored if c.downsampling == current]
    return (f"; best F1@0.5 at downsampling {best.downsampling:g} (now {current:g}"
            + (f": {now[0]:.3f})" if now else ")"))


def sweep_verdict(rows: list, current: float) -> str:
    """What a sweep's (value, scores) rows say: the best F1@0.5 and where, without sending the
    user to another value when it scores the same as the current one.

    >>> sweep_verdict([(0.1, {"f1": 0.9}), (0.5, {"f1": 0.9})], 0.5)
    'F1@0.5 0.900 at every value: it does not change the result on this slice'
    >>> sweep_verdict([(0.1, {"f1": 0.8}), (0.5, {"f1": 0.9}), (0.9, {"f1": 0.9})], 0.5)
    'best F1@0.5 0.900 at 0.5-0.9, which includes the current 0.5'
    >>> sweep_verdict([(0.1, {"f1": 0.8}), (0.5, {"f1": 0.7})], 0.5)
    'best F1@0.5 0.800 at 0.1 (now 0.5: 0.700)'
    """
    f1 = np.array([m["f1"] for _, m in rows])
    top = f1.max()
    if np.ptp(f1) < 1e-9:
        return f"F1@0.5 {top:.3f} at every value: it does not change the result on this slice"
    best = [v for v, m in rows if m["f1"] >= top - 1e-9]
    where = f"{best[0]:g}" if len(best) == 1 else f"{min(best):g}-{max(best):g}"
    if any(abs(v - current) < 1e-9 for v in best):
        return f"best F1@0.5 {top:.3f} at {where}, which includes the current {current:g}"
    now = [m["f1"] for v, m in rows if abs(v - current) < 1e-9]
    return (f"best F1@0.5 {top:.3f} at {where} (now {current:g}"
            + (f": {now[0]:.3f})" if now else ")"))


class SliceActions:
    """2D actions of :class:`~nbapp.ui.session.Session` (a base class of it; it provides
    ``state``, ``segmenter``, ``runner2d`` and ``report``)."""

    def effective_kind(self) -> str | None:
        d = self.state.data
        if d is None:
            return None
        if d.array.ndim == 2:
            return "image"
        return "stack" if self.state.slice_params.batch_mode else "volume"

    def slice_image(self, plane: str, index: int) -> tuple[np.ndarray, tuple]:
        """The 2D image shown for (plane, index) and its intensity range."""
        d = self.state.data
        kind = self.effective_kind()
        if kind == "image":
            return d.array, d.intensity
        if kind == "stack":
            img = np.asarray(d.array[index])
            return img, intensity_range(img)
        from nbapp.volume import get_slice

        return get_slice(d.array, plane, index), d.intensity

    def slice_count(self, plane: str | None = None) -> int:
        d = self.state.data
        if d is None or d.array.ndim == 2:
            return 1
        kind = self.effective_kind()
        plane = "xy" if kind == "stack" else (plane or self.state.plane)
        return d.array.shape[PLANES.index(plane)]

    def _params_changed(self, change) -> None:
        if change.name == "plane":
            self.state.view = None  # another plane's slice: shown whole, no old zoom
            self.suggest_scale()
        if not self._quiet:
            self.request_2d()

    def _view_moved(self, change) -> None:
        """The viewer zoomed or panned over a big slice: segment the region now in view."""
        r, seg = self.state.result2d, self.segmenter
        if change.new is None or r is None or r.region is None or seg is None:
            return
        if region.region_for_view(change.new, r.full_shape, r.params.downsampling,
                                  seg.engine.min_side) != r.region:
            self.request_2d()

    def suggest_scale(self) -> None:
        """Put the Image Downsampling that matches the data's pixel size to the model's into
        ``state.suggestion`` (with why), or say what is missing for one."""
        st = self.state
        cfg = getattr(st.model, "config", None)
        model_nm = getattr(cfg, "pixel_size_nm", None)
        pixel = plane_pixel_size(st.data.voxel_size, st.plane) if st.data is not None else None
        sug = {k: v for k, v in st.suggestion.items() if k not in ("downsampling", "scale_why")}
        factor = suggest_downsampling(pixel, model_nm)
        if factor is not None:
            sug["downsampling"] = factor
            sug["scale_why"] = (f"the data's {pixel:g} nm pixels to the model's "
                                f"{model_nm:g} nm")
        elif cfg is not None and model_nm is None:
            sug["scale_why"] = (f"{cfg.name} records no training pixel size: compare "
                                "downsampling factors")
        elif cfg is not None and pixel is None:
            sug["scale_why"] = (f"give the pixel size (Data tab) for a downsampling that "
                                f"matches the model's {model_nm:g} nm")
        st.suggestion = sug

    def suggest_from_voxel_size(self) -> None:
        """The Median Filter Size and Image Downsampling suggested by the data's voxel size."""
        st = self.state
        med = suggest_median(st.data.voxel_size) if st.data is not None else None
        sug = {k: v for k, v in st.suggestion.items() if k != "median_size"}
        if med is not None:
            sug["median_size"] = med
        st.suggestion = sug
        self.suggest_scale()

    def set_voxel_size(self, text: str) -> bool:
        """The data's pixel / voxel size typed by the user: "5" (nm, in-plane; Z the same) or
        "Z, Y, X" in nm. Updates the downsampling and median filter suggestions."""
        import dataclasses

        st = self.state
        if st.data is None:
            st.say("load data first", "warning")
            return False
        try:
            parts = [float(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
        except ValueError:
            parts = []
        if len(parts) not in (1, 3) or not all(0 < v < 1e6 for v in parts):
            st.say(f"pixel size {text!r}: give one number in nm (e.g. 5) or Z, Y, X in nm "
                   "(e.g. 40, 5, 5)", "error")
            return False
        vs = tuple(parts * 3 if len(parts) == 1 else parts)
        st.data = dataclasses.replace(st.data, voxel_size=vs)
        self.suggest_from_voxel_size()
        st.say(f"voxel size set to {' x '.join(f'{v:g}' for v in vs)} nm", "ok")
        return True

    def request_2d(self) -> None:
        """Segment the current slice (latest request wins; cached heads when only
        post-processing parameters changed)."""
        st = self.state
        if st.data is None or self.segmenter is None:
            return
        kind = self.effective_kind()
        plane = st.plane if kind == "volume" else "xy"
        index = min(max(st.index, 0), self.slice_count(plane) - 1)
        sp = st.slice_params
        seg = self.segmenter
        data = st.data
        view = st.view
        st.busy2d = True

        def work():
            return self._compute_2d(seg, data, kind, plane, index, sp, view)

        def deliver(result, error):
            call_in_ui(lambda: self._apply_2d(result, error))

        self.runner2d.submit("slice", work, deliver)

    def _compute_2d(self, seg, data, kind, plane, index, sp, view=None) -> Result2D:
        img, intensity = self.slice_image(plane, index)
        big = {}
        if region.is_big(img.shape, sp.downsampling):
            # a big slice: the region in view (its centre, at most REGION_MAX_PIXELS), the
            # rest as a coarse overview (nbapp.region)
            box = region.region_for_view(view, img.shape, sp.downsampling,
                                         seg.engine.min_side)
            step = region.overview_step(img.shape)
            big = {"region": box, "full_shape": tuple(img.shape), "overview_step": step,
                   "overview": self._overview(data, kind, plane, index, img, step)}
            y0, y1, x0, x1 = box
            if intensity is None:  # the whole slice's grey range, not the region's
                intensity = intensity_range(img)
            img = np.ascontiguousarray(img[y0:y1, x0:x1])
        key = (id(data), kind, plane, index, big.get("region"))
        heads = seg.heads(img, sp, key=key, intensity=intensity)
        timing = dict(seg.timings)
        t0 = time.perf_counter()
        labels, centres = seg.postprocess(heads, sp, return_centres=True)
        post = time.perf_counter() - t0
        count = int(np.count_nonzero(np.unique(labels)))
        return Result2D(img, labels, heads, centres, count, float(timing.get("network_s", 0.0)),
                        post, bool(timing.get("cached", False)), plane, index, sp, **big)

    def _overview(self, data, kind, plane, index, img, step) -> np.ndarray:
        """Every ``step``-th pixel of a big slice, kept for the slice shown last."""
        key = (id(data), kind, plane, index, step)
        cached = self._overview_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        out = np.ascontiguousarray(img[::step, ::step])
        self._overview_cache = (key, out)
        return out

    def _apply_2d(self, result, error) -> None:
        st = self.state
        st.busy2d = False
        if error is not None:
            self.report(error, "2D inference failed")
            self._error_2d = True
            return
        with st.hold_trait_notifications():
            st.result2d = result
            self.show_edits()  # the slice's proofreading edits, if any, stay on top
            self.score_2d()
        # an error the status line still shows is over (the user has moved on, and the log
        # keeps it): say so there
        if self._error_2d or st.status_level == "error":
            self._error_2d = False
            if st.status_level == "error":
                st.say(f"2D inference: {result.count} instances", "ok")

    # -- scores against ground truth
    def truth_slice(self, plane: str, index: int):
        """The ground truth of (plane, index), or None without one."""
        truth, d = self.state.truth, self.state.data
        if truth is None or d is None or truth.shape != d.shape:
            return None
        kind = self.effective_kind()
        if kind == "image":
            return truth
        if kind == "stack":
            return np.asarray(truth[index])
        from nbapp.volume import get_slice

        return get_slice(truth, plane, index)

    def score_2d(self, change=None) -> None:
        """F1@0.5, PQ and FG IoU against the ground truth of what the viewer shows: the user's
        edits when there are any, else the model's result; ``of`` says which."""
        st = self.state
        r = st.result2d
        gt = self.truth_slice(r.plane, r.index) if r is not None else None
        if gt is None:
            st.score2d = {}
            return
        shown = st.shown_labels()
        gt = r.crop(gt)
        st.score2d = {**headline_scores(shown, gt),
                      "of": "your edits" if shown is not r.labels else "the model's output"}

    def sweep(self, param: str) -> None:
        """Score the visible slice against the ground truth at a range of ``param`` values
        (post-processing parameters reuse the cached network outputs) into ``state.sweep``."""
        st = self.state
        values = SWEEPS.get(param)
        if values is None:
            st.say(f"cannot sweep {param!r}: choose one of {', '.join(SWEEPS)}", "error")
            return
        values = tuple(sorted(set(values) | {getattr(st.slice_params, param)}))  # the current too
        r = st.result2d
        gt = self.truth_slice(r.plane, r.index) if r is not None else None
        if gt is None:
            st.say("a sweep needs ground truth: the demo has it, or load a label file in the "
                   "Data tab", "warning")
            return
        seg, data, kind, sp = self.segmenter, st.data, self.effective_kind(), st.slice_params
        plane, index, view = r.plane, r.index, st.view

        def work():
            rows = []
            for v in values:
                try:
                    res = self._compute_2d(seg, data, kind, plane, index,
                                           sp.replace(**{param: v}), view)
                except NbappError:
                    continue
                rows.append((v, headline_scores(res.labels, res.crop(gt))))
            return rows

        def deliver(rows, error):
            def apply():
                if error is not None:
                    self.report(error, "the sweep failed")
                    return
                st.sweep = {"param": param, "values": [v for v, _ in rows],
                            "f1": [m["f1"] for _, m in rows], "pq": [m["pq"] for _, m in rows],
                            "current": getattr(sp, param)}
                if rows:
                    st.say(f"sweep of {LABELS[param]} on {plane} slice {index}: "
                           f"{sweep_verdict(rows, getattr(sp, param))}", "ok")
            call_in_ui(apply)

        self.runner2d.submit("sweep", work, deliver)

    def compare_factors(self) -> tuple:
        """:func:`compare_factors` of the current and suggested downsampling."""
        return compare_factors(self.state.slice_params.downsampling,
                               self.state.suggestion.get("downsampling"))

    def compare_downsampling(self) -> None:
        """Run the current slice at four downsampling factors (:meth:`compare_factors`)."""
        st = self.state
        if st.data is None or self.segmenter is None:
            st.say("load data and a model first", "warning")
            return
        kind = self.effective_kind()
        plane = st.plane if kind == "volume" else "xy"
        index = min(max(st.index, 0), self.slice_count(plane) - 1)
        sp, seg, data = st.slice_params, self.segmenter, st.data
        factors = self.compare_factors()
        gt = self.truth_slice(plane, index)
        view = st.view

        def work():
            out = []
            for ds in factors:
                try:
                    r = self._compute_2d(seg, data, kind, plane, index,
                                         sp.replace(downsampling=ds), view)
                    f1 = None if gt is None else headline_scores(r.labels, r.crop(gt))["f1"]
                    out.append(CompareResult(ds, r.image, r.labels, r.count, r.network_s,
                                             r.postprocess_s, f1=f1))
                except NbappError as exc:
                    img, _ = self.slice_image(plane, index)
                    step = region.overview_step(img.shape)
                    img = img[::step, ::step]
                    out.append(CompareResult(ds, img, None, 0, 0.0, 0.0, str(exc)))
            return out

        def deliver(result, error):
            def apply():
                if error is not None:
                    self.report(error, "compare downsampling failed")
                else:
                    st.compare = result
                    st.say("compared downsampling " + ", ".join(
                        f"{c.downsampling:g}: " + ("too small" if c.error is not None else
                                                   f"{c.count}" if c.f1 is None else
                                                   f"{c.count} (F1 {c.f1:.3f})")
                        for c in result) + compare_verdict(result, sp.downsampling), "ok")
            call_in_ui(apply)

        self.runner2d.submit("compare", work, deliver)

    def run_batch(self) -> None:
        """Batch mode: segment every image of the stack on its own."""
        st = self.state
        if st.data is None or self.segmenter is None or st.data.array.ndim != 3:
            st.say("batch mode needs a stack of 2D images and a model", "warning")
            return
        if st.data.meta.get("lazy"):
            st.say("this volume is larger than memory: batch mode would load it whole; run the "
                   "3D job (block by block) or crop the file", "warning")
            return
        seg, arr, sp = self.segmenter, st.data.array, st.slice_params

        def deliver(result, error):
            def apply():
                if error is not None:
                    self.report(error, "batch inference failed")
                    return
                st.batch_labels = result
                n = sum(int(np.count_nonzero(np.unique(s))) for s in result)
                st.say(f"batch mode: {n} instances in {len(result)} images", "ok")
            call_in_ui(apply)

        self.runner2d.submit("batch", lambda: seg.segment_batch(np.asarray(arr), sp), deliver)

    def suggest_from_box(self, height: float, width: float, centre: tuple | None = None) -> dict:
        """Min Size / Min Box Extent from a box drawn around the smallest object to keep: the
        object under the box's centre measured in the 3D result when there is one (xy plane),
        else from the box alone (:func:`nbapp.objects.suggest_filters`)."""
        st = self.state
        sug = {k: v for k, v in st.suggestion.items()
               if k in ("median_size", "downsampling", "scale_why")}
        measured = None
        lab = st.labels3d
        if centre is not None and lab is not None and st.plane == "xy" and st.data is not None \
                and lab.shape == st.data.shape and 0 <= st.index < lab.shape[0]:
            r, c = int(round(centre[0])), int(round(centre[1]))
            if 0 <= r < lab.shape[1] and 0 <= c < lab.shape[2] and lab[st.index, r, c] > 0:
                measured = int(lab[st.index, r, c])
        on_slice = None if measured is not None or centre is None else \
            self._object_in_box(height, width, centre)
        if measured is not None:
            sug.update(suggest_from_object(lab, measured))
            sug["filters_why"] = f"object {measured} of the 3D result, measured"
        elif on_slice is not None:
            sug.update(suggest_from_mask(on_slice))
            sug["filters_why"] = ("from the object's pixels on this slice (thickness unknown: a "
                                  "quarter of its width); run the 3D job and draw again to "
                                  "measure it in 3D")
        else:
            sug.update(suggest_filters(height, width))
            sug["filters_why"] = ("from the box alone (thickness unknown: a quarter of its "
                                  "width); run the 3D job and draw again to measure the object")
        st.box = (float(abs(height)), float(abs(width)))
        st.suggestion = sug
        return sug

    def _object_in_box(self, height: float, width: float, centre: tuple):
        """The mask (on the shown slice) of the object of the 2D result under the box's centre,
        else the one with most pixels inside the box; None without one."""
        labels = self.state.shown_labels()
        if labels is None:
            return None
        labels = np.asarray(labels)
        if labels.ndim != 2:
            return None
        cy, cx = int(round(centre[0])), int(round(centre[1]))
        h, w = abs(float(height)) / 2, abs(float(width)) / 2
        y0, y1 = max(0, int(centre[0] - h)), max(0, int(np.ceil(centre[0] + h)) + 1)
        x0, x1 = max(0, int(centre[1] - w)), max(0, int(np.ceil(centre[1] + w)) + 1)
        inside = 0 <= cy < labels.shape[0] and 0 <= cx < labels.shape[1]
        label = int(labels[cy, cx]) if inside else 0
        if label == 0:
            ids, counts = np.unique(labels[y0:y1, x0:x1], return_counts=True)
            counts, ids = counts[ids > 0], ids[ids > 0]
            if ids.size == 0:
                return None
            label = int(ids[np.argmax(counts)])
        return labels == label

    def apply_suggestion(self) -> None:
        st = self.state
        sug = st.suggestion
        if not any(k in sug for k in ("min_size", "median_size", "downsampling")):
            st.say("draw a box around the smallest object first", "warning")
            return
        try:
            cp = st.volume_params.consensus.replace(
                **{k: sug[k] for k in ("min_size", "min_extent") if k in sug})
            vp = st.volume_params.replace(consensus=cp)
            if "median_size" in sug:
                vp = vp.replace(median_size=sug["median_size"])
        except NbappError as exc:
            self.report(exc, "cannot apply the suggestion")
            return
        sp = st.slice_params
        if "downsampling" in sug:
            try:
                sp = sp.replace(downsampling=sug["downsampling"])
            except NbappError as exc:
                self.report(exc, "cannot apply the suggestion")
                return
        thin = ""
        if vp.orthoplane and self._too_thin_for_orthoplane(sp.downsampling):
            # the 3D job would refuse xz / yz views of this stack: never apply what it refuses
            vp = vp.replace(orthoplane=False)
            thin = (f"; ortho-plane off: the stack's {st.data.shape[0]} slices are too few for "
                    "xz and yz views")
        with st.hold_trait_notifications():
            st.volume_params = vp
            st.slice_params = sp
        st.say(f"applied: Image Downsampling {sp.downsampling}, Min Size {cp.min_size}, "
               f"Min Box Extent {cp.min_extent}, Median Filter Size {vp.median_size}{thin}", "ok")

    def _too_thin_for_orthoplane(self, downsampling) -> bool:
        """Whether the xz / yz slices of the data are too small for the model at
        ``downsampling`` (a stack of few slices)."""
        st, seg = self.state, self.segmenter
        if st.data is None or st.data.array.ndim != 3 or seg is None:
            return False
        z, y, x = st.data.shape
        try:
            for side in ((z, x), (z, y)):
                seg.engine.check_size(side, downsampling)
        except NbappError:
            return True
        return False
