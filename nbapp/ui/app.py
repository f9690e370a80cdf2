"""The app: data & model, 2D parameter testing, 3D job and results, status and log.

>>> from nbapp.ui import App                    # doctest: +SKIP
>>> App()          # displays in a notebook      # doctest: +SKIP
"""

from __future__ import annotations

import ipywidgets as W

from nbapp.ui.controls import (Controls2D, Controls3D, DataPanel, ModelPanel, ProofreadPanel,
                               StatusArea)
from nbapp.ui.session import Session, available_device_names
from nbapp.ui.state import AppState
from nbapp.ui.threads import add_error_sink, remove_error_sink
from nbapp.ui.viewer2d import CompareView, HeadsView, Viewer2D, viewer_inches_for
from nbapp.ui.viewer3d import LabelsView3D, ObjectTable, StacksView
from nbapp.ui.window import WindowSize

__all__ = ["App", "app"]


class App(W.VBox):
    """The nbapp widget app (display it in a notebook, or serve it with Voila).

    Parameters
    ----------
    volume : array or str, optional
        A 2D image or 3D stack / volume (numpy array) or a path to read; default: the bundled
        demo volume.
    model : str, Model or torch.nn.Module, optional
        ``"default"`` (default), a YAML config, a TorchScript file or a loaded model.
    device : str, optional
        ``cpu``, ``cuda:N`` or ``mps``; default: the first GPU, else the CPU.
    data_root : path, optional
        Typed paths (data, models, exports) must stay inside this folder.
    workspace : nbapp.workspace.Workspace, optional
        Where this user reads, writes and loads models from; a served page's visitor gets
        theirs from the server (:meth:`App.served`). Default: the owner's, on ``data_root``.
    upload_limit_mb : float
        Largest accepted upload.
    synchronous : bool
        Run 2D work and 3D jobs in the caller's thread (tests, scripts).
    debounce_s : float
        Slider changes closer than this are coalesced into one computation.

    Attributes
    ----------
    state : AppState
        The observable state (what the views show).
    session : Session
        The actions (load, segment, run, export), usable without the widgets.
    """

    def __init__(self, volume=None, model=None, device=None, data_root=None,
                 upload_limit_mb: float = 200.0, synchronous: bool = False,
                 debounce_s: float = 0.025, workspace=None, **kwargs):
        super().__init__(**kwargs)
        self.add_class("nbapp-app")
        self.state = state = AppState()
        try:
            devices = available_device_names()
        except Exception:  # noqa: BLE001 - torch problems are reported when a model loads
            devices = ["cpu"]
        state.devices = devices
        state.device = device or (devices[1] if len(devices) > 1 else "cpu")
        self.session = session = Session(state, data_root, upload_limit_mb, synchronous, debounce_s,
                                         workspace=workspace)
        self.status = StatusArea(state)
        add_error_sink(self._ui_error)

        self.data_panel = DataPanel(state, session)
        self.model_panel = ModelPanel(state, session, devices)
        self.viewer2d = Viewer2D(state, on_box=session.suggest_from_box,
                                 on_click=session.edit_click, on_stroke=session.edit_stroke)
        self.controls2d = Controls2D(state, session, on_box_mode=self.viewer2d.set_box_mode)
        self.proofread = ProofreadPanel(state, session, box_toggle=self.controls2d.box)
        self.controls2d.box.observe(
            lambda c: setattr(self.proofread.mode, "value", "view") if c.new else None,
            names=["value"])
        self.heads_view = HeadsView(state)
        self.compare_view = CompareView(state)
        self.controls3d = Controls3D(state, session)
        self.stacks_view = StacksView(state)
        self.view3d = LabelsView3D(state)
        self.table = ObjectTable(state)

        tab_data = W.VBox([self.data_panel.widget, self.model_panel.widget])
        viewer = W.VBox([W.HBox([self.proofread.tools, self.viewer2d.size],
                                layout=W.Layout(align_items="center", flex_flow="row wrap")),
                         self.viewer2d.widget, self.proofread.train])
        tab_2d = W.VBox([W.HBox([self.controls2d.widget, viewer]),
                         self.heads_view.widget, self.compare_view.widget])
        results = W.VBox([self.stacks_view.widget,
                          W.HBox([self.view3d.widget, self.table.widget]),
                          self.controls3d.export_widget])
        tab_3d = W.VBox([self.controls3d.widget, results])
        self.tabs = W.Tab(children=[tab_data, tab_2d, tab_3d],
                          titles=("Data & model", "2D parameter testing", "3D inference"))
        # the 3D view (ipyvolume) is built when the 3D tab is first opened, not at page load
        self.tabs.observe(lambda c: self.view3d.ensure_figure() if c.new == 2 else None,
                          names=["selected_index"])
        # the status line sits above the tabs and stays in view when the page scrolls, so that
        # what a button did (or why it could not) shows where the user is looking
        self.status.line.add_class("nbapp-statusbar")
        # results that appear below the fold (at 1366x768) are scrolled into view when they
        # come, so that their buttons do not seem to do nothing
        self.scroller = Scroller()
        self.heads_view.widget.add_class("nbapp-heads")
        self.compare_view.widget.add_class("nbapp-compare")
        state.observe(lambda c: self.scroller.show("nbapp-heads") if c.new else None,
                      names=["show_heads"])
        state.observe(lambda c: self.scroller.show("nbapp-compare") if c.new else None,
                      names=["compare"])
        # the viewer's size from the browser window, once, unless the user chose one first
        self.window = WindowSize(self._window_size)
        self._default_inches = state.viewer_inches
        self.children = [W.HTML(_CSS + "<h3 style='margin:4px 0'>nbapp: mitochondria "
                                "segmentation</h3>"),
                         self.status.line, self.tabs, self.status.log_box,
                         self.scroller.widget, self.window.widget]
        self.window.measure()

        if isinstance(volume, str):
            session.load_path(volume)
        elif volume is not None:
            session.set_volume(volume, "array")
        else:
            session.load_demo()
        # the model last, so that a model problem is what the status line shows
        ready = session.load_model("default" if model is None else model, device or state.device)
        if ready and state.data is not None and state.status_level != "error":
            self.tabs.selected_index = 1  # data and model ready: straight to the 2D viewer
        if model is not None and not isinstance(model, str):
            state.model_spec = "(in-memory model)"
            self.model_panel.spec.value = state.model_spec


    @classmethod
    def served(cls, **kwargs) -> "App":
        """The app of a page served by ``nbapp app``: the visitor's workspace comes from the
        server (:func:`nbapp.workspace.from_environment`); elsewhere, the owner's."""
        from nbapp.workspace import from_environment

        return cls(workspace=from_environment(), **kwargs)

    def _window_size(self, width: int, height: int) -> None:
        """The page's window is ``width`` x ``height``: a viewer that fits it (issue 30 item
        10), unless the size was chosen already."""
        st = self.state
        if st.viewer_inches == self._default_inches and not getattr(self, "_sized", False):
            st.viewer_inches = viewer_inches_for(width, height)
        self._sized = True

    def _ui_error(self, text: str) -> None:
        self.state.say("a view update failed (see the log)", "error", text)

    @property
    def widget(self) -> "App":
        """The widget to display (the app itself)."""
        return self

    def close(self) -> None:
        """Stop jobs and threads, remove uploads, close the widgets."""
        remove_error_sink(self._ui_error)
        self.session.close()
        todo, seen = [self], set()
        while todo:  # every widget of the tree (figures' canvases and toolbars included)
            w = todo.pop()
            if id(w) in seen:
                continue
            seen.add(id(w))
            todo.extend(getattr(w, "children", ()) or ())
            toolbar = getattr(w, "toolbar", None)
            if isinstance(toolbar, W.Widget):
                todo.append(toolbar)
            if w is not self:
                w.close()
        super().close()


class Scroller:
    """Scrolls the page to a widget (by CSS class) when its content arrives: a hidden output
    area that runs one line of JavaScript in the page (Jupyter and Voila run the JavaScript
    outputs of the kernel's own widgets). ``requests`` records what was asked."""

    def __init__(self):
        self.widget = W.Output(layout=W.Layout(display="none"))
        self.requests: list[str] = []

    def show(self, css_class: str) -> None:
        from IPython.display import Javascript

        self.requests.append(css_class)
        # set as the widget's state, not captured with ``with``: that routes by the kernel's
        # current request, which a result delivered from a worker thread does not belong to
        self.widget.outputs = ()
        # after the next frame and a moment: the widget is shown and drawn by then
        self.widget.append_display_data(Javascript(
            "requestAnimationFrame(() => setTimeout(() => { const e = document.querySelector"
            f"('.{css_class}'); if (e) e.scrollIntoView({{behavior: 'smooth', "
            "block: 'center'}); }, 300));"))


_CSS = """<style>
.nbapp-statusbar { position: sticky; top: 0; z-index: 1000; background: #fff;
                   padding: 2px 0; border-bottom: 1px solid #eee;
                   box-shadow: 0 -16px 0 #fff; }
/* (above the viewer's toolbar, z-index 100, and covering the page's top padding, where the
   canvas showed when scrolled: issue 30 item 10) */
.nbapp-app { overflow: visible !important; }
/* the notebook output areas around the app would each be the sticky line's scroll box */
.jp-OutputArea:has(.nbapp-app), .jp-OutputArea-child:has(.nbapp-app),
.jp-OutputArea-output:has(.nbapp-app) { overflow: visible !important; }
/* the log opens (and stays) scrolled to its end: the newest entry in view */
.nbapp-log { display: flex !important; flex-direction: column-reverse !important; }
.nbapp-log > .jp-OutputArea { flex-shrink: 0; overflow: visible !important; }
</style>"""


def app(volume=None, model=None, device=None, data_root=None, upload_limit_mb: float = 200.0,
        **kwargs) -> App:
    """Build the app (a widget: make it the last expression of a cell to show it)."""
    return App(volume=volume, model=model, device=device, data_root=data_root,
               upload_limit_mb=upload_limit_mb, **kwargs)
