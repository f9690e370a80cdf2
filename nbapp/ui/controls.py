"""Control panels: they set the state (through the session's actions) and follow it.

Every parameter widget carries its SPEC label (:data:`nbapp.params.LABELS`) as ``description``.
"""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from nbapp.errors import NbappError
from nbapp.jobs import JobState
from nbapp.params import DOWNSAMPLING_FACTORS, LABELS, MEDIAN_SIZES, PLANES
from nbapp.ui.session import EXPORT_FOLDER, Session
from nbapp.ui.state import AppState

__all__ = ["StatusArea", "DataPanel", "ModelPanel", "Controls2D", "Controls3D", "ProgressBars",
           "ProofreadPanel", "loss_curve_svg", "sweep_svg", "line_svg", "download_link"]

_WIDE = {"description_width": "initial"}
#: One label column for every slider, dropdown and number box of a panel, wide enough for the
#: longest SPEC label ("Segmentation Confidence Threshold"), so that their tracks and boxes
#: start at the same place and have the same length.
_LABEL_COLUMN = {"description_width": "250px"}
_PARAM_WIDTH = "480px"
_COLUMN_WIDTH = "500px"  # the 2D controls' column: fixed, so the viewer beside it never moves
_COLOURS = {"info": "#333", "ok": "#1a7f37", "warning": "#9a6700", "error": "#cf222e"}


def _factor_label(f) -> str:
    """"0.5 (enlarge 2x)" for enlarging factors, "4" for the others."""
    return f"{f:g} (enlarge {int(round(1 / f))}x)" if f < 1 else f"{f:g}"


def _layout(width="420px"):
    return W.Layout(width=width)


def _fit(*buttons) -> None:
    """Buttons as wide as their text (ipywidgets' fixed width cuts longer ones off)."""
    for b in buttons:
        b.layout.width = "auto"
        b.layout.min_width = "fit-content"


def _labelled(widgets: dict, handler_for) -> dict:
    """Give each parameter widget its SPEC label and observe its value with ``handler_for(name)``."""
    for name, widget in widgets.items():
        widget.description = LABELS[name]
        widget.tooltip = LABELS[name]  # the whole label on hover, should the panel be narrow
        if isinstance(widget, W.Checkbox):
            widget.style = _WIDE
            widget.indent = False  # long labels ("Permit detections ...") are not cut off
            widget.layout.width = "auto"
        else:  # one label column: tracks and boxes line up
            widget.style = _LABEL_COLUMN
            widget.layout.width = _PARAM_WIDTH
        widget.observe(handler_for(name), names=["value"])
    return widgets


class StatusArea:
    """The status line (last message, coloured by level) and the log (every message and
    traceback). Updated only from the state, i.e. in the UI thread."""

    def __init__(self, state: AppState):
        self.state = state
        self.line = W.HTML("")
        self.log = W.Output(layout=W.Layout(max_height="160px", overflow="auto",
                                            border="1px solid #ddd"))
        self.log.add_class("nbapp-log")  # (the app's CSS keeps its newest entry in view)
        self.log_box = W.Accordion(children=[self.log], titles=("Log",))
        self.log_box.selected_index = None
        # the app places ``line`` (above its tabs) and ``log_box`` (below them) itself
        self._seen = 0
        state.observe(self._status, names=["status", "status_level"])
        state.observe(self._messages, names=["messages"])

    def _status(self, change=None) -> None:
        st = self.state
        colour = _COLOURS.get(st.status_level, "#333")
        self.line.value = (f"<div class='nbapp-status nbapp-{st.status_level}' style='color:{colour}'>"
                           f"{html.escape(st.status)}</div>")

    def _messages(self, change) -> None:
        new = change.new[len(change.old):] if len(change.new) >= len(change.old) else change.new[-1:]
        for line in new:
            self.log.append_stdout(line + "\n")


class DataPanel:
    """Path box (restricted to the data root in Voila mode), upload, demo, data info."""

    def __init__(self, state: AppState, session: Session):
        self.state, self.session = state, session
        root = session.data_root
        self.path = W.Text(placeholder=("a path inside " + str(root)) if root else "path to a file",
                           description="Path", layout=_layout("420px"))
        self.load = W.Button(description="Load", icon="folder-open")
        self.upload = W.FileUpload(accept=",".join(
            (".tif", ".tiff", ".png", ".jpg", ".npy", ".mrc", ".h5", ".hdf5")), multiple=False,
            description=f"Upload (≤ {session.upload_limit_mb:g} MB)",
            layout=W.Layout(width="220px"))
        self.demo = W.Button(description="Demo volume")
        self.voxel = W.Text(placeholder="e.g. 5 or 40, 5, 5", description="Pixel size (nm)",
                            style={"description_width": "100px"}, layout=_layout("300px"))
        self.set_voxel = W.Button(description="Set", icon="check")
        self.set_voxel.on_click(lambda _: session.set_voxel_size(self.voxel.value))
        self.truth = W.Text(placeholder="labels of the same shape (scores the results)",
                            description="Ground truth", style={"description_width": "100px"},
                            layout=_layout("420px"))
        self.load_truth = W.Button(description="Load labels", icon="check-square-o")
        self.load_truth.on_click(lambda _: session.load_truth(self.truth.value))
        self.info = W.HTML("<i>no data</i>")
        self.load.on_click(lambda _: session.load_path(self.path.value))
        self.demo.on_click(lambda _: session.load_demo())
        self.upload.observe(self._uploaded, names=["value"])
        self.widget = W.VBox([W.HTML("<b>Data</b>"), W.HBox([self.path, self.load]),
                              W.HBox([self.upload, self.demo]), self.info,
                              W.HBox([self.voxel, self.set_voxel]),
                              W.HBox([self.truth, self.load_truth])])
        state.observe(self._data, names=["data", "slice_params"])

    def _uploaded(self, change) -> None:
        for item in change.new:
            self.session.load_upload(item["name"], item["content"], item.get("size"))
        if change.new:
            self.upload.value = ()

    def _data(self, change=None) -> None:
        d = self.state.data
        if d is None:
            self.info.value = "<i>no data</i>"
            return
        kind = self.session.effective_kind()
        vs = ("voxel size " + " x ".join(f"{v:g}" for v in d.voxel_size) + " nm"
              if d.voxel_size else "voxel size unknown")
        note = d.intensity[2] if d.intensity and len(d.intensity) > 2 else ""
        self.info.value = (f"<b>{html.escape(d.name)}</b>: {' x '.join(map(str, d.shape))} "
                           f"{d.array.dtype} &middot; <b>{kind}</b> (detected: {d.detected}) "
                           f"&middot; {vs}<br><small>{html.escape(note)}</small>")


class ModelPanel:
    """Model choice (the zoo, and model files in the data root), quantized, device, the
    download bar with its Cancel button, and the model info."""

    def __init__(self, state: AppState, session: Session, devices: list[str]):
        self.state, self.session = state, session
        self.spec = W.Combobox(value=state.model_spec, options=self._choices(session.workspace),
                               description="Model",
                               placeholder="default, a zoo name, config .yaml or TorchScript .pt",
                               ensure_option=False, layout=_layout("420px"))
        self.quantized = W.Checkbox(state.quantized, description="Quantized (CPU; zoo models)",
                                    indent=False, layout=_layout("260px"))
        self.device = W.Dropdown(options=devices, value=state.device if state.device in devices
                                 else devices[0], description="Device")
        self.load = W.Button(description="Load model", icon="cube")
        self.bar = W.FloatProgress(0.0, min=0.0, max=1.0, description="Download",
                                   layout=_layout("300px"))
        self.bar_text = W.HTML("")
        self.cancel = W.Button(description="Cancel", icon="stop", button_style="warning")
        self.cancel.on_click(lambda _: session.cancel_download())
        self.download_row = W.HBox([self.bar, self.bar_text, self.cancel],
                                   layout=W.Layout(display="none"))
        self.info = W.HTML("<i>no model loaded</i>")
        self.load.on_click(self._load)
        self.zoo = W.HTML(self._zoo_text())
        self.widget = W.VBox([W.HTML("<b>Model</b>"), W.HBox([self.spec, self.load]), self.zoo,
                              self.quantized, self.device, self.download_row, self.info])
        state.observe(self._info, names=["model_info"])
        state.observe(self._download, names=["download"])

    @staticmethod
    def _choices(workspace) -> list[str]:
        """The zoo's models, then the model files this user may load: their fine-tunes and the
        administrator's folders (a served page), or the files at the top of the data root."""
        from nbapp.models import zoo

        found = workspace.model_choices()
        root = workspace.root
        if workspace.root_models and root is not None and root.is_dir():
            found += sorted(p.name for p in root.iterdir()
                            if p.suffix.lower() in (".yaml", ".yml", ".pt", ".pth") and p.is_file())
        named = [m.name for m in zoo.zoo().values() if not m.quantized]
        return [*named, *found[:50]]

    @staticmethod
    def _zoo_text() -> str:
        """The zoo's names under the model box: which are here and which download once."""
        from nbapp.models import zoo

        names = []
        for m in zoo.zoo().values():
            if m.quantized or m.bundled:
                continue
            here = zoo.model_path(m.name).is_file()
            classes = ", ".join(m.config.class_names.values())
            names.append(f"<b>{html.escape(m.name)}</b> ({classes}{'' if here else ', downloads once'})")
        return ("<small>Model zoo (type or pick a name): " + " &middot; ".join(names)
                + "</small>")

    def _load(self, _=None) -> None:
        self.state.model_spec = self.spec.value.strip() or "default"
        self.state.quantized = bool(self.quantized.value)
        self.session.load_model(self.state.model_spec, self.device.value)

    def _download(self, change=None) -> None:
        snap = self.state.download
        running = snap.state.value == "running"
        if snap.finished:
            self.zoo.value = self._zoo_text()
        self.download_row.layout.display = "flex" if running else "none"
        self.load.disabled = running
        if running:
            total = snap.total or 0
            self.bar.value = snap.done / total if total else 0.0
            size = f"{snap.done / 1e6:.1f} / {total / 1e6:.1f} MB" if total else \
                f"{snap.done / 1e6:.1f} MB"
            self.bar_text.value = f"&nbsp;{html.escape(str(self.state.model_spec))}: {size}"

    def _info(self, change=None) -> None:
        i = self.state.model_info
        if not i:
            self.info.value = "<i>no model loaded</i>"
            return
        if self.state.model_spec and self.spec.value != self.state.model_spec:
            self.spec.value = self.state.model_spec  # the loaded one (a tuned model included)
        norms = i.get("norms") or {}
        rows = [("name", i.get("name")), ("classes", ", ".join(map(str, i.get("classes", [])))),
                ("thing classes", i.get("thing_list")),
                ("norms", f"mean {norms.get('mean')}, std {norms.get('std')}"),
                ("padding factor", i.get("padding_factor")),
                ("parameters", f"{i.get('parameters', 0):,}"), ("device", i.get("device")),
                ("description", i.get("description"))]
        def cell(key, value) -> str:
            text = html.escape(str(value))
            if key == "description" and text:  # long: folded, one click away
                first = text.split(". ")[0][:90]
                return f"<details><summary>{first} ...</summary>{text}</details>"
            return text

        self.info.value = "<table class='nbapp-model-info'>" + "".join(
            f"<tr><th style='text-align:left;padding-right:8px;vertical-align:top'>{k}</th>"
            f"<td>{cell(k, v)}</td></tr>" for k, v in rows) + "</table>"


class Controls2D:
    """Plane, slice and every 2D parameter; opacity; network outputs; compare; box tool."""

    def __init__(self, state: AppState, session: Session, on_box_mode=None):
        self.state, self.session = state, session
        sp = state.slice_params
        self.plane = W.ToggleButtons(options=PLANES, value=state.plane, description="Plane")
        self.index = W.IntSlider(0, min=0, max=0, description="Slice", continuous_update=True,
                                 style=_LABEL_COLUMN, layout=_layout(_PARAM_WIDTH))
        w = {
            "downsampling": W.Dropdown(options=[(_factor_label(f), f) for f in DOWNSAMPLING_FACTORS],
                                       value=sp.downsampling),
            "seg_threshold": W.FloatSlider(sp.seg_threshold, min=0.1, max=0.9, step=0.05,
                                           layout=_layout()),
            "center_threshold": W.FloatSlider(sp.center_threshold, min=0.05, max=0.9, step=0.05,
                                              layout=_layout()),
            "min_distance": W.IntSlider(sp.min_distance, min=1, max=35, layout=_layout()),
            "fine_boundaries": W.Checkbox(sp.fine_boundaries),
            "label_divisor": W.BoundedIntText(sp.label_divisor, min=0, max=2**31 - 1),
            "semantic_only": W.Checkbox(sp.semantic_only),
            "fill_holes": W.Checkbox(sp.fill_holes),
            "batch_mode": W.Checkbox(sp.batch_mode),
        }
        self.widgets = _labelled(w, self._param)
        self.opacity = W.FloatSlider(state.opacity, min=0, max=1, step=0.05,
                                     description="Label opacity", style=_LABEL_COLUMN,
                                     layout=_layout(_PARAM_WIDTH))
        W.link((self.opacity, "value"), (state, "opacity"))
        self.show_heads = W.ToggleButton(False, description="Network outputs", icon="eye")
        W.link((self.show_heads, "value"), (state, "show_heads"))
        self.compare = W.Button(description="Compare downsampling", icon="th-large")
        self.compare.on_click(lambda _: session.compare_downsampling())
        self.run_batch = W.Button(description="Run batch", icon="play", disabled=not sp.batch_mode)
        self.run_batch.on_click(lambda _: session.run_batch())
        self.box = W.ToggleButton(False, description="Draw box", icon="square-o",
                                  tooltip="draw a box around the smallest object to keep")
        if on_box_mode is not None:
            self.box.observe(lambda c: on_box_mode(c.new), names=["value"])
        # wraps inside the column: a long suggestion never widens it (nor moves the viewer)
        self.suggestion = W.HTML("", layout=_layout(_PARAM_WIDTH))
        self.apply = W.Button(description="Apply suggestion", disabled=True)
        _fit(self.show_heads, self.compare, self.run_batch, self.box, self.apply)
        self.apply.on_click(lambda _: session.apply_suggestion())
        self.plane.observe(lambda c: setattr(state, "plane", c.new), names=["value"])
        self.index.observe(lambda c: setattr(state, "index", c.new), names=["value"])
        state.observe(self._from_state, names=["slice_params", "plane", "index", "data"])
        state.observe(self._suggest, names=["suggestion"])
        from nbapp.ui.session2d import SWEEPS

        self.sweep_param = W.Dropdown(options=[(LABELS[k], k) for k in SWEEPS],
                                      value="seg_threshold", layout=_layout("260px"))
        self.sweep = W.Button(description="Sweep vs ground truth", icon="line-chart",
                              tooltip="score the slice at a range of values of this parameter")
        _fit(self.sweep)
        self.sweep.on_click(lambda _: session.sweep(self.sweep_param.value))
        self.sweep_plot = W.HTML("")
        state.observe(self._sweep, names=["sweep"])
        self.widget = W.VBox([
            W.HBox([self.plane]), self.index, *w.values(), self.opacity,
            W.HBox([self.show_heads, self.compare, self.run_batch]),
            W.HBox([self.box, self.apply]), self.suggestion,
            W.HBox([self.sweep_param, self.sweep]), self.sweep_plot,
        ], layout=W.Layout(width=_COLUMN_WIDTH, min_width=_COLUMN_WIDTH))

    def _sweep(self, change=None) -> None:
        sw = self.state.sweep
        self.sweep_plot.value = sweep_svg(sw) if sw and sw.get("values") else ""

    def _param(self, name):
        def handler(change):
            st = self.state
            try:
                st.slice_params = st.slice_params.replace(**{name: change.new})
            except NbappError as exc:
                self.session.report(exc, LABELS[name])
        return handler

    def _from_state(self, change=None) -> None:
        st = self.state
        sp = st.slice_params
        for name, widget in self.widgets.items():
            v = getattr(sp, name)
            if widget.value != v:
                widget.value = v
        kind = self.session.effective_kind()
        self.plane.disabled = kind != "volume"
        if kind != "volume" and st.plane != "xy":
            st.plane = "xy"
        if self.plane.value != st.plane:
            self.plane.value = st.plane
        n = self.session.slice_count()
        self.index.max = max(n - 1, 0)
        self.index.disabled = n <= 1
        if self.index.value != st.index:
            self.index.value = min(st.index, self.index.max)
        if st.index > self.index.max:
            st.index = self.index.max
        self.run_batch.disabled = kind != "stack"

    def _suggest(self, change=None) -> None:
        s = self.state.suggestion
        parts = []
        if "min_size" in s:
            parts.append(f"{LABELS['min_size']} <b>{s['min_size']}</b>")
            parts.append(f"{LABELS['min_extent']} <b>{s['min_extent']}</b>"
                         + (f" ({html.escape(s['filters_why'])})" if s.get("filters_why") else ""))
        if "median_size" in s:
            parts.append(f"{LABELS['median_size']} <b>{s['median_size']}</b> (from the voxel size)")
        if "downsampling" in s:
            parts.insert(0, f"{LABELS['downsampling']} <b>{_factor_label(s['downsampling'])}</b> "
                            f"({html.escape(s.get('scale_why', ''))})")
        text = ("Suggested: " + ", ".join(parts)) if parts else ""
        if "downsampling" not in s and s.get("scale_why"):
            text += f"<br><small>{html.escape(s['scale_why'])}</small>"
        self.suggestion.value = text
        self.apply.disabled = not parts


class ProgressBars:
    """One progress bar per plane (and one for the consensus) fed by job snapshots; a
    blockwise job has one bar, of blocks."""

    ROWS = (*PLANES, "all", "blocks")

    def __init__(self, state: AppState):
        self.state = state
        # one label column, so that the consensus bar is as long as the plane bars
        names = {"all": "consensus", "blocks": "blocks"}
        self.bars = {p: W.IntProgress(0, min=0, max=1, description=names.get(p, p),
                                      style={"description_width": "80px"},
                                      layout=_layout("300px")) for p in self.ROWS}
        self.labels = {p: W.Label("") for p in self.ROWS}
        self.rows = {p: W.HBox([self.bars[p], self.labels[p]]) for p in self.ROWS}
        self.rows["blocks"].layout.display = "none"
        self.summary = W.HTML("")
        self.widget = W.VBox([self.summary] + list(self.rows.values()))
        state.observe(self._update, names=["job"])

    def _update(self, change=None) -> None:
        snap = self.state.job
        blockwise = "blocks" in snap.planes
        for p in self.ROWS:
            self.rows[p].layout.display = "none" if blockwise != (p == "blocks") else None
        for p in self.ROWS:
            if p in snap.planes:
                done, total = snap.planes[p]
                stage = snap.stages.get(p, "")
                bar = self.bars[p]
                if stage == "network" or p == "all":
                    bar.max = max(total, 1)
                    bar.value = min(done, max(total, 1))
                else:  # tracking after the network: the slices are all done
                    bar.value = bar.max
                text = f"{stage} {done}/{total}" if stage == "network" else (
                    f"{stage} {'done' if done >= total else '...'}")
                if p == "blocks":
                    text = (f"{done}/{total} parts" if stage == "network"
                            else "labels written" if stage == "writing" and done >= total
                            else f"{stage} {done}/{total}")
                    if snap.detail and snap.state == JobState.RUNNING:
                        text += f" · {snap.detail}"
                if p == snap.plane and snap.state == JobState.RUNNING:
                    text += f" · {snap.elapsed:.1f} s"
                    if snap.eta is not None:
                        text += f" · ETA {snap.eta:.0f} s"
                self.labels[p].value = text
            elif snap.state == JobState.RUNNING and snap.stage == "starting":
                self.bars[p].value = 0
                self.labels[p].value = ""
            style = {JobState.DONE: "success", JobState.FAILED: "danger",
                     JobState.CANCELLED: "warning"}.get(snap.state, "info")
            self.bars[p].bar_style = style
        extra = f" · {snap.error}" if snap.error else ""
        self.summary.value = (f"job {snap.job_id}: <b>{snap.state.value}</b>"
                              f" · {snap.elapsed:.1f} s{html.escape(extra)}" if snap.job_id else "")


class Controls3D:
    """Every 3D parameter; Run / Cancel; progress; re-run consensus; exports."""

    def __init__(self, state: AppState, session: Session):
        self.state, self.session = state, session
        vp = state.volume_params
        cp = vp.consensus
        w = {
            "plane": W.Dropdown(options=PLANES, value=vp.plane),
            "orthoplane": W.Checkbox(vp.orthoplane),
            "median_size": W.Dropdown(options=MEDIAN_SIZES, value=vp.median_size),
            "min_size": W.BoundedIntText(cp.min_size, min=0, max=1_000_000),
            "min_extent": W.BoundedIntText(cp.min_extent, min=0, max=1000),
            "vote_threshold": W.IntSlider(cp.vote_threshold, min=1, max=3),
            "allow_one_view": W.Checkbox(cp.allow_one_view),
            "return_stacks": W.Checkbox(vp.return_stacks),
        }
        self.widgets = _labelled(w, self._param)
        self.blockwise = W.Checkbox(state.blockwise, description="Block by block (larger than "
                                    "memory; resumes)", indent=False, style=_WIDE,
                                    layout=W.Layout(width="auto"),
                                    tooltip="run the 3D job on blocks of the volume into an "
                                            "OME-Zarr file in the exports folder; a volume too large "
                                            "to load always runs this way")
        W.link((self.blockwise, "value"), (state, "blockwise"))
        state.observe(self._data, names=["data"])
        self.run = W.Button(description="Run", icon="play", button_style="primary")
        self.cancel = W.Button(description="Cancel", icon="stop", disabled=True)
        self.rerun = W.Button(description="Re-run consensus", icon="refresh", disabled=True)
        self.run.on_click(lambda _: session.run_3d())
        self.cancel.on_click(lambda _: session.cancel_3d())
        self.rerun.on_click(lambda _: session.rerun_consensus())
        self.progress = ProgressBars(state)
        where = str(session.workspace.exports()) if session.workspace.served else EXPORT_FOLDER
        self.export_path = W.Text(value="labels.tif", description="Export to", style=_WIDE,
                                  placeholder="NAME.tif or NAME.zarr",
                                  tooltip=f"a name: the file goes into {where}/ (a name that "
                                          "exists gets the next free one: nothing is replaced)")
        self.export_labels = W.Button(description="Export labels", icon="download")
        self.table_path = W.Text(value="objects.csv", description="Table to", style=_WIDE,
                                 placeholder="NAME.csv")
        self.export_table = W.Button(description="Export table (CSV)", icon="table")
        _fit(self.run, self.cancel, self.rerun, self.export_labels, self.export_table)
        # a visitor of a served page has no access to the server's disk: small exports also
        # come as a link that downloads them to the visitor's computer
        self.download = W.HTML("")
        self._links: dict = {}  # the latest labels and table exports of this data
        self.export_labels.on_click(
            lambda _: self._offer("labels", session.export_labels(self.export_path.value)))
        self.export_table.on_click(
            lambda _: self._offer("table", session.export_table(self.table_path.value)))
        state.observe(self._new_data, names=["data"])
        state.observe(self._from_state, names=["volume_params"])
        state.observe(self._job, names=["job", "stacks"])
        self.widget = W.VBox([
            *w.values(), self.blockwise, W.HBox([self.run, self.cancel, self.rerun]),
            self.progress.widget,
        ])
        self.export_widget = W.VBox([W.HBox([self.export_path, self.export_labels]),
                                     W.HBox([self.table_path, self.export_table]),
                                     self.download])

    def _offer(self, what: str, target) -> None:
        """Show the download link of the latest export of ``what`` (labels or table) beside the
        other's; a failed export removes its link."""
        if target is None:
            self._links.pop(what, None)
        else:
            self._links[what] = download_link(target)
        self.download.value = "<br>".join(self._links[k] for k in ("labels", "table")
                                          if k in self._links)

    def _new_data(self, change=None) -> None:
        """Links of another data set's exports go when new data is loaded."""
        self._links = {}
        self.download.value = ""

    def _param(self, name):
        def handler(change):
            st = self.state
            vp = st.volume_params
            try:
                if name in ("vote_threshold", "allow_one_view", "min_size", "min_extent"):
                    vp = vp.replace(consensus=vp.consensus.replace(**{name: change.new}))
                else:
                    vp = vp.replace(**{name: change.new})
            except NbappError as exc:
                self.session.report(exc, LABELS[name])
                return
            st.volume_params = vp
        return handler

    def _from_state(self, change=None) -> None:
        vp = self.state.volume_params
        for name, widget in self.widgets.items():
            src = vp.consensus if name in ("vote_threshold", "allow_one_view", "min_size",
                                           "min_extent") else vp
            v = getattr(src, name)
            if widget.value != v:
                widget.value = v
        self.widgets["plane"].disabled = vp.orthoplane

    def _data(self, change=None) -> None:
        lazy = self.state.data is not None and bool(self.state.data.meta.get("lazy"))
        if lazy:
            self.state.blockwise = True
        self.blockwise.disabled = lazy

    def _job(self, change=None) -> None:
        running = self.state.job.state == JobState.RUNNING
        self.run.disabled = running
        self.cancel.disabled = not running
        self.rerun.disabled = running or not all(p in self.state.stacks for p in PLANES)


class ProofreadPanel:
    """Proofreading tools (above the viewer) and the training set / fine-tuning row (below it).

    ``tools``: View, Delete (click an object), Merge (click two), Paint and Erase (drag; the
    brush radius in pixels), Undo, Discard. ``train``: add the visible slice to the training set,
    fine-tune for N minutes (progress, loss curve, Cancel), the before / after scores.
    """

    def __init__(self, state: AppState, session: Session, box_toggle=None):
        self.state, self.session = state, session
        self.mode = W.ToggleButtons(options=[("View", "view"), ("Delete", "delete"),
                                             ("Merge", "merge"), ("Paint", "paint"),
                                             ("Erase", "erase")], value=state.edit_mode,
                                    tooltips=["look only", "click an object to delete it",
                                              "click two objects to merge the second into the "
                                              "first", "drag to paint (starting on an object "
                                              "extends it, on background makes a new one)",
                                              "drag to erase"],
                                    style={"button_width": "62px"})
        self.brush = W.BoundedIntText(state.brush, min=1, max=30, description="Brush (px)",
                                      style={"description_width": "70px"},
                                      layout=_layout("140px"))
        self.undo = W.Button(description="Undo", icon="undo")
        self.discard = W.Button(description="Discard edits", icon="times")
        self.add = W.Button(description="Add slice to training set", icon="plus",
                            button_style="info")
        self.summary = W.HTML("")
        self.minutes = W.BoundedFloatText(3.0, min=0.5, max=60.0, step=0.5,
                                          description="Minutes", layout=_layout("150px"),
                                          style={"description_width": "56px"})
        self.tune = W.Button(description="Fine-tune", icon="graduation-cap",
                             button_style="primary")
        self.cancel = W.Button(description="Cancel", icon="stop", disabled=True)
        self.bar = W.FloatProgress(0.0, min=0.0, max=1.0, layout=_layout("160px"))
        self.curve = W.HTML("")
        self.scores = W.HTML("")
        _fit(self.undo, self.discard, self.add, self.tune, self.cancel)
        self.mode.observe(self._mode, names=["value"])
        self.brush.observe(lambda c: setattr(state, "brush", int(c.new)), names=["value"])
        self.undo.on_click(lambda _: session.undo_edit())
        self.discard.on_click(lambda _: session.discard_edits())
        self.add.on_click(lambda _: session.add_to_training())
        self.tune.on_click(lambda _: session.start_finetune(float(self.minutes.value)))
        self.cancel.on_click(lambda _: session.cancel_finetune())
        self.apply_thresholds = W.Button(description="Apply tuned thresholds", icon="check",
                                         tooltip="the thresholds that score best with the "
                                                 "tuned model on slices it did not train on",
                                         layout=W.Layout(width="auto", display="none"))
        self.apply_thresholds.on_click(lambda _: session.apply_tuned_thresholds())
        self.box_toggle = box_toggle
        self.tools = W.HBox([self.mode, self.brush, self.undo, self.discard],
                            layout=W.Layout(flex_flow="row wrap", align_items="center"))
        self.train = W.VBox([
            W.HBox([self.add, self.summary], layout=W.Layout(align_items="center")),
            W.HBox([self.minutes, self.tune, self.cancel, self.bar],
                   layout=W.Layout(align_items="center", flex_flow="row wrap")),
            self.curve, self.scores, self.apply_thresholds])
        state.observe(self._summary, names=["training"])
        state.observe(self._tuning, names=["tuning"])
        state.observe(self._scores, names=["tune_scores"])
        state.training = session.training_set().summary()
        self._summary()

    def _mode(self, change) -> None:
        self.state.edit_mode = change.new
        if change.new != "view" and self.box_toggle is not None:
            self.box_toggle.value = False  # one mouse tool at a time

    def _summary(self, change=None) -> None:
        self.summary.value = (f"&nbsp;training set: <b>{html.escape(self.state.training)}</b>"
                              if self.state.training else "")

    def _tuning(self, change=None) -> None:
        snap = self.state.tuning
        running = snap.state.value == "running"
        self.tune.disabled = running
        self.cancel.disabled = not running
        # a disabled orange button still looks clickable: coloured only while it can act
        self.cancel.button_style = "warning" if running else ""
        detail = snap.detail if isinstance(snap.detail, dict) else {}
        losses, minutes = detail.get("loss"), detail.get("minutes", 0.0)
        if running:
            limit = float(self.minutes.value)
            self.bar.value = min(1.0, minutes / limit) if limit else 0.0
        elif snap.finished:
            self.bar.value = 1.0 if snap.state.value == "done" else self.bar.value
        if losses:
            self.curve.value = loss_curve_svg(losses, minutes)

    def _scores(self, change=None) -> None:
        s = self.state.tune_scores
        if not s:
            self.scores.value = ""
            self.apply_thresholds.layout.display = "none"
            return
        rows = [("before, stored slices", s["before"]), ("after, stored slices", s["after"])]
        truth = s.get("truth")
        if truth:
            which = truth.get("which", f"{truth['slices']} other slices")
            rows += [(f"before, {which} vs ground truth", truth["before"]),
                     (f"after, {which} vs ground truth", truth["after"])]
        best = s.get("thresholds") or {}
        self.apply_thresholds.layout.display = \
            None if best and best["f1"] > best["current_f1"] + 1e-9 else "none"
        self.scores.value = (
            "<table class='nbapp-table' style='font-size:12px'><tr><th></th><th>F1@0.5</th>"
            "<th>precision</th><th>recall</th></tr>"
            + "".join(f"<tr><td>{k}</td><td>{v['f1']:.3f}</td><td>{v['precision']:.3f}</td>"
                      f"<td>{v['recall']:.3f}</td></tr>" for k, v in rows)
            + f"</table><small>{s['steps']} steps in "
              f"{s['minutes']:.1f} min; saved as {html.escape(s['config'])}</small>")


def line_svg(x, y, caption: str, css_class: str, width: int = 320, height: int = 90,
             lo: float | None = None, hi: float | None = None, marks: bool = False) -> str:
    """A small SVG line plot of ``y`` against ``x`` with its range and a caption."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if y.size < 2:
        x, y = np.repeat(x, 2) + np.array([0.0, 1.0])[: 2 * x.size], np.repeat(y, 2)
    lo = float(y.min()) if lo is None else lo
    hi = float(y.max()) if hi is None else hi
    span, xspan = (hi - lo) or 1.0, (x.max() - x.min()) or 1.0
    pad = 28
    xs = pad + (width - pad - 4) * (x - x.min()) / xspan
    ys = 4 + (height - 20) * (1 - (y - lo) / span)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys))
    dots = "".join(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2' fill='#0969da'/>"
                   for a, b in zip(xs, ys)) if marks else ""
    return (f"<svg width='{width}' height='{height}' class='{css_class}' "
            f"style='font:10px sans-serif'><polyline fill='none' stroke='#0969da' "
            f"stroke-width='1.5' points='{points}'/>{dots}"
            f"<line x1='{pad}' y1='{height - 16}' x2='{width - 4}' y2='{height - 16}' "
            f"stroke='#999'/><line x1='{pad}' y1='4' x2='{pad}' y2='{height - 16}' stroke='#999'/>"
            f"<text x='0' y='12'>{hi:.2f}</text><text x='0' y='{height - 18}'>{lo:.2f}</text>"
            f"<text x='{pad}' y='{height - 3}'>{html.escape(caption)}</text></svg>")


DOWNLOAD_LIMIT_MB = 50  # larger files stay on the server (a link carries the whole file)


def download_link(path, limit_mb: float = DOWNLOAD_LIMIT_MB) -> str:
    """HTML for an exported file: a link that downloads it to the browser's computer (the file
    inside the link), or why there is none (a .zarr folder, or over ``limit_mb``)."""
    import base64
    from pathlib import Path

    path = Path(path)
    name = html.escape(path.name)
    if path.is_dir():
        return (f"<small>{name} is a folder on the server (OME-Zarr): export a .tif to "
                "download it through the page</small>")
    size = path.stat().st_size
    if size > limit_mb * 1e6:
        return (f"<small>{name} ({size / 1e6:.0f} MB) is larger than the {limit_mb:g} MB the "
                f"page downloads; it is on the server at {html.escape(str(path))}</small>")
    kind = "text/csv" if path.suffix.lower() == ".csv" else "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<a class='nbapp-download' download='{name}' href='data:{kind};base64,{data}'>"
            f"&#x2B07; Download {name}</a> <small>({size / 1e3:.0f} kB) to this computer</small>")


def loss_curve_svg(losses: list, minutes: float = 0.0) -> str:
    """The training loss (a running mean over 10 steps) against the step."""
    y = np.convolve(np.asarray(losses, float), np.ones(10) / 10, mode="valid") \
        if len(losses) >= 10 else np.asarray(losses, float)
    return line_svg(np.arange(y.size), y, f"loss, {len(losses)} steps, {minutes:.1f} min",
                    "nbapp-loss")


def sweep_svg(sweep: dict) -> str:
    """F1@0.5 against the swept parameter (0 to 1), the current value named."""
    return line_svg(sweep["values"], sweep["f1"],
                    f"F1@0.5 vs {LABELS[sweep['param']]}, {sweep['values'][0]:g} to "
                    f"{sweep['values'][-1]:g} (now {sweep['current']:g})", "nbapp-sweep",
                    width=440, lo=0.0, hi=1.0, marks=True)
