"""2D views: the slice with its label overlay, the network outputs, the downsampling comparison.

Figures are built once (matplotlib ``Figure`` on an ipympl canvas, which is the widget) and
updated in place: ``set_data`` / ``set_extent`` / ``draw_idle``, never rebuilt.
"""

from __future__ import annotations

import contextlib
import html

import numpy as np
import ipywidgets as W
from matplotlib.colors import hsv_to_rgb
from matplotlib.patches import Rectangle
from matplotlib.widgets import RectangleSelector

from nbapp.objects import per_class_note
from nbapp.region import region_text
from nbapp.ui.figures import (NEAREST, figure_widget, image_clim, label_cmap, label_display,
                              place_image, setup_image_axes, show_image)
from nbapp.ui.state import AppState

__all__ = ["Viewer2D", "HeadsView", "CompareView", "viewer_inches_for"]

#: Sides (inches; 100 pixels each) the viewer can take: the default fits the 2D tab beside its
#: controls at 1366x768; "projector" fills the height of a 1920x1080 screen.
#: Inches (at the canvas's 100 px per inch) left of the image for ipympl's toolbar (36 px).
TOOLBAR_STRIP_IN = 0.42
VIEWER_SIZES = (("compact (1366x768)", 4.0), ("small", 4.5), ("medium", 5.5),
                ("large (1920 wide)", 7.0), ("projector (1920x1080)", 8.5))
#: What the 2D tab needs besides the viewer's side, in CSS pixels, measured in Chromium at
#: 1366x768 (tests/e2e: the title, status line, tabs and tool row above the canvas; the count,
#: training set and fine-tune rows below it; the controls column left of it).
ABOVE_VIEWER_PX, BELOW_VIEWER_PX, LEFT_OF_VIEWER_PX = 215, 135, 540


def viewer_inches_for(width: float, height: float) -> float:
    """The largest viewer side (:data:`VIEWER_SIZES`) with which the 2D tab, down to its
    fine-tune row, fits a browser window of ``width`` x ``height`` CSS pixels, or the smallest
    (issue 30 item 10: at 1366x768 the default pushed the score line below the fold).

    >>> viewer_inches_for(1366, 768), viewer_inches_for(1920, 1080), viewer_inches_for(800, 600)
    (4.0, 7.0, 4.0)
    """
    fits = [side for _, side in VIEWER_SIZES
            if ABOVE_VIEWER_PX + 100 * side + BELOW_VIEWER_PX <= height
            and LEFT_OF_VIEWER_PX + 100 * (side + TOOLBAR_STRIP_IN) <= width]
    return max(fits) if fits else min(side for _, side in VIEWER_SIZES)


class Viewer2D:
    """The slice, its labels (opacity), the count and timings, and a box tool."""

    def __init__(self, state: AppState, on_box=None, on_click=None, on_stroke=None):
        self.state = state
        self.on_box = on_box
        self.on_click = on_click  # (y, x) in the delete and merge tools
        self.on_stroke = on_stroke  # [(y, x), ...] in the paint and erase tools
        self._stroke: list | None = None
        # the zoom / pan toolbar shows at the canvas's left edge: the image starts right of it,
        # so that no control sits over the image (issue 30 item 2)
        self.figure = figure_widget((state.viewer_inches + TOOLBAR_STRIP_IN, state.viewer_inches))
        self.ax = self.figure.add_axes(self._axes_box(state.viewer_inches))
        self.image, self.overlay = setup_image_axes(self.ax, opacity=state.opacity)
        # a big slice (nbapp.region): ``image`` holds its overview, ``detail`` the segmented
        # region at full resolution, outlined by ``frame``
        self.detail = self.ax.imshow(np.zeros((2, 2), np.float32), cmap="gray", vmin=0, vmax=1,
                                     visible=False, zorder=0.5, **NEAREST)
        self.overlay.set_zorder(1)
        self.frame = self.ax.add_patch(Rectangle((0, 0), 1, 1, fill=False, lw=1.2, ls="--",
                                                 ec="#ffd400", visible=False, zorder=2))
        self._last_overview = None
        self._big_shape: tuple | None = None  # (H, W) of the big slice shown
        self._clim = (0.0, 1.0)
        self._placing = False  # limits set by the viewer itself, not a zoom
        self.ax.callbacks.connect("xlim_changed", self._view_changed)
        self.ax.callbacks.connect("ylim_changed", self._view_changed)
        self.canvas = self.figure.canvas
        self.info = W.HTML("")
        self.selector = RectangleSelector(self.ax, self._selected, useblit=False, interactive=True,
                                          button=[1], minspanx=1, minspany=1, spancoords="data")
        self.selector.set_active(False)
        self.size = W.Dropdown(options=VIEWER_SIZES, value=state.viewer_inches,
                               description="Viewer", layout=W.Layout(width="245px"),
                               style={"description_width": "48px"},
                               tooltip="size of the viewer: larger on a large screen or a "
                                       "projector")
        W.link((self.size, "value"), (state, "viewer_inches"))
        self.widget = W.VBox([self.canvas, self.info])  # (the app puts ``size`` above it)
        state.observe(self._resize, names=["viewer_inches"])
        state.observe(self._result, names=["result2d", "edited", "score2d"])
        self.trail, = self.ax.plot([], [], "-", color="#ffd400", lw=2, alpha=0.8)
        self.canvas.mpl_connect("button_press_event", self._press)
        self.canvas.mpl_connect("motion_notify_event", self._move)
        self.canvas.mpl_connect("button_release_event", self._release)
        state.observe(self._opacity, names=["opacity"])
        state.observe(self._busy, names=["busy2d"])
        self.draws = 0
        self._last_heads = None

    @staticmethod
    def _axes_box(side: float) -> tuple:
        """The image's place in the figure: right of the toolbar's strip, the rest square."""
        width = side + TOOLBAR_STRIP_IN
        return (TOOLBAR_STRIP_IN / width, 0, side / width, 1)

    def _resize(self, change=None) -> None:
        side = float(self.state.viewer_inches)
        self.figure.set_size_inches(side + TOOLBAR_STRIP_IN, side, forward=True)
        self.ax.set_position(self._axes_box(side))
        self.canvas.draw_idle()

    def set_box_mode(self, on: bool) -> None:
        self.selector.set_active(bool(on))
        if not on:
            self.selector.set_visible(False)
            self.canvas.draw_idle()

    def _selected(self, eclick, erelease) -> None:
        x0, x1, y0, y1 = self.selector.extents
        if self.on_box is not None:
            self.on_box(y1 - y0, x1 - x0, centre=self._local((y0 + y1) / 2, (x0 + x1) / 2))

    # -- proofreading tools (state.edit_mode)
    def _press(self, event) -> None:
        mode = self.state.edit_mode
        if mode == "view" or event.inaxes is not self.ax or event.button != 1 \
                or event.xdata is None:
            return
        y, x = float(event.ydata), float(event.xdata)
        if mode in ("delete", "merge"):
            if self.on_click is not None:
                self.on_click(*self._local(y, x))
            return
        self._stroke = [(y, x)]
        self.trail.set_data([x], [y])
        self.trail.set_linewidth(max(1.0, 2.0 * self.state.brush * self._pixel_points()))
        self.canvas.draw_idle()

    def _move(self, event) -> None:
        if self._stroke is None or event.inaxes is not self.ax or event.xdata is None:
            return
        self._stroke.append((float(event.ydata), float(event.xdata)))
        ys, xs = zip(*self._stroke)
        self.trail.set_data(xs, ys)
        self.canvas.draw_idle()

    def _release(self, event) -> None:
        if self._stroke is None:
            return
        points, self._stroke = self._stroke, None
        self.trail.set_data([], [])
        if self.on_stroke is not None:
            self.on_stroke([self._local(y, x) for y, x in points])
        self.canvas.draw_idle()

    def _local(self, y: float, x: float) -> tuple[float, float]:
        """Slice coordinates -> the shown result's (a big slice's region starts elsewhere)."""
        r = self.state.result2d
        if r is None or r.region is None:
            return y, x
        return y - r.region[0], x - r.region[2]

    def _view_changed(self, ax=None) -> None:
        """A zoom or pan over a big slice: ask for the region now in view."""
        r = self.state.result2d
        if self._placing or r is None or r.region is None:
            return
        (x0, x1), (y0, y1) = self.ax.get_xlim(), self.ax.get_ylim()
        self.state.view = (y0, y1, x0, x1)

    def _pixel_points(self) -> float:
        """Line width (points) of one image pixel on the canvas."""
        bbox = self.ax.get_window_extent()
        x0, x1 = self.ax.get_xlim()
        return bbox.width / max(abs(x1 - x0), 1.0) * 72.0 / self.figure.dpi

    def _busy(self, change) -> None:
        self.info.value = self._text(self.state.result2d, busy=bool(change.new))

    def _text(self, r, busy=False) -> str:
        if r is None:
            return "<i>computing ...</i>" if busy else "<i>no result yet</i>"
        net = "cached" if r.cached else f"{1000 * r.network_s:.0f} ms"
        sc = self.state.score2d
        score = (f" &middot; {sc.get('of', 'result')} vs ground truth F1@0.5 "
                 f"<b>{sc['f1']:.3f}</b>, PQ {sc['pq']:.3f}, FG IoU {sc['fg_iou']:.3f}"
                 if sc else "")
        shown = self.state.shown_labels()
        edits = shown is not None and shown is not r.labels
        # the count is of what is shown: the edited labels when there are edits
        count = int(np.count_nonzero(np.unique(shown))) if edits else r.count
        txt = (f"<b>{count}</b> instances{self._per_class(shown if edits else r.labels)}"
               f"{score} &middot; network {net} &middot; post-processing "
               f"{1000 * r.postprocess_s:.0f} ms &middot; {r.plane} slice {r.index}")
        if edits:
            txt += " &middot; <b>showing your edits</b>"
        if r.region is not None:
            txt += " &middot; " + html.escape(region_text(r.region, r.full_shape))
        return txt + (" &middot; <i>updating ...</i>" if busy else "")

    def _per_class(self, labels) -> str:
        cfg = getattr(self.state.model, "config", None)
        if cfg is None:
            return ""
        return html.escape(per_class_note(labels, self.state.slice_params.label_divisor,
                                          cfg.class_names))

    def _result(self, change=None) -> None:
        r = self.state.result2d
        if r is None:
            self.info.value = self._text(None)
            return
        labels = self.state.shown_labels()
        if r.region is not None:
            self._show_region(r, labels)
        else:
            if self._last_overview is not None:  # back from a big slice
                self._last_overview, self._big_shape = None, None
                self.detail.set_visible(False)
                self.frame.set_visible(False)
                self._last_heads = None
            if r.heads is None or r.heads is not self._last_heads:  # same outputs: same image
                with self._self_placing():
                    show_image(self.image, r.image, image_clim(r.image))
                self._last_heads = r.heads
            with self._self_placing():
                show_image(self.overlay, label_display(labels))
        self.info.value = self._text(r)
        self.draws += 1
        self.canvas.draw_idle()

    @contextlib.contextmanager
    def _self_placing(self):
        """Limit changes inside are the viewer's own, not a zoom to segment."""
        self._placing = True
        try:
            yield
        finally:
            self._placing = False

    def _show_region(self, r, labels) -> None:
        """A big slice: its overview, the region at full resolution, its labels, its frame."""
        h, w = r.full_shape
        y0, y1, x0, x1 = r.region
        if r.overview is not self._last_overview:
            self._clim = image_clim(r.overview)
            with self._self_placing():
                place_image(self.image, r.overview, (0, 0), r.overview_step, self._clim)
                if self._big_shape != (h, w):  # another big slice: show all of it at first
                    self.ax.set_xlim(-0.5, w - 0.5)
                    self.ax.set_ylim(h - 0.5, -0.5)
            self._last_overview, self._big_shape = r.overview, (h, w)
        if r.heads is not self._last_heads:
            place_image(self.detail, r.image, (y0, x0), 1, self._clim)
            self._last_heads = r.heads
        self.detail.set_visible(True)
        place_image(self.overlay, label_display(labels), (y0, x0))
        self.frame.set_bounds(x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0)
        self.frame.set_visible(True)

    def _opacity(self, change) -> None:
        self.overlay.set_alpha(float(change.new))
        self.canvas.draw_idle()


def offsets_to_rgb(offsets: np.ndarray) -> np.ndarray:
    """(2, h, w) (dy, dx) -> (h, w, 3) colour wheel: hue = direction, value = length."""
    dy, dx = offsets
    ang = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi)
    mag = np.hypot(dy, dx)
    val = mag / (np.percentile(mag, 99) + 1e-6)
    hsv = np.stack([ang, np.ones_like(ang), np.clip(val, 0, 1)], axis=-1)
    return hsv_to_rgb(hsv).astype(np.float32)


class HeadsView:
    """What the network predicts, for teaching: semantic probability, centre heat-map with the
    detected centres, offset field (colour wheel: hue = direction, brightness = length)."""

    def __init__(self, state: AppState):
        self.state = state
        self.figure = figure_widget((9, 3.2), toolbar=False)
        axes = self.figure.subplots(1, 3)
        self.axes = axes
        titles = ("semantic probability", "centre heat-map + centres", "offsets (direction)")
        self.images = []
        for ax, t in zip(axes, titles):
            ax.set_axis_off()
            ax.set_title(t, fontsize=9)
        self.images.append(axes[0].imshow(np.zeros((2, 2)), cmap="magma", vmin=0, vmax=1,
                                          **NEAREST))
        self.images.append(axes[1].imshow(np.zeros((2, 2)), cmap="viridis", **NEAREST))
        self.images.append(axes[2].imshow(np.zeros((2, 2, 3)), **NEAREST))
        (self.centres,) = axes[1].plot([], [], "r+", markersize=8, markeredgewidth=1.5)
        self.figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.05)
        self.canvas = self.figure.canvas
        self.widget = W.VBox([self.canvas])
        self.widget.layout.display = "none"
        state.observe(self._update, names=["result2d"])
        state.observe(self._toggle, names=["show_heads"])

    def _toggle(self, change) -> None:
        self.widget.layout.display = None if change.new else "none"
        if change.new:
            self._update()

    def _update(self, change=None) -> None:
        r = self.state.result2d
        if r is None or not self.state.show_heads:
            return
        h = r.heads
        H, Wd = h.shape
        sem = h.sem[0] if h.sem.shape[0] == 1 else 1.0 - h.sem[0]
        show_image(self.images[0], sem)
        ctr = h.ctr
        for img, arr in ((self.images[1], ctr), (self.images[2], offsets_to_rgb(h.offsets))):
            show_image(img, arr)
            img.set_extent((-0.5, Wd - 0.5, H - 0.5, -0.5))
            img.axes.set_xlim(-0.5, Wd - 0.5)
            img.axes.set_ylim(H - 0.5, -0.5)
        self.images[1].set_clim(float(ctr.min()), float(max(ctr.max(), ctr.min() + 1e-6)))
        g, ds = h.grid_step, h.downsampling
        c = np.asarray(r.centres, float).reshape(-1, 2)
        ys = (c[:, 0] * g + (g - 1) / 2 + 0.5) * ds - 0.5
        xs = (c[:, 1] * g + (g - 1) / 2 + 0.5) * ds - 0.5
        self.centres.set_data(xs, ys)
        # more objects than centres: a centre's pixels can form several pieces (issue 30 item 14)
        self.axes[1].set_title(f"centre heat-map + {len(c)} centres -> {r.count} objects\n"
                               "(a centre's pixels may form several pieces)", fontsize=8)
        self.canvas.draw_idle()


class CompareView:
    """Up to five panels: the current slice at each compared downsampling, with counts, times
    and F1@0.5 against the ground truth where there is one."""

    def __init__(self, state: AppState, n: int = 5):
        self.state = state
        self.figure = figure_widget((10, 2.9), toolbar=False)
        self.axes = list(self.figure.subplots(1, n))
        cmap = label_cmap()
        self.panels = [setup_image_axes(ax, cmap=cmap, opacity=state.opacity) for ax in self.axes]
        for ax in self.axes:
            ax.set_title("", fontsize=9)
        self.figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.05)
        self.canvas = self.figure.canvas
        self.widget = W.VBox([self.canvas])
        self.widget.layout.display = "none"
        state.observe(self._update, names=["compare"])
        state.observe(self._opacity, names=["opacity"])

    def _opacity(self, change) -> None:
        for _, over in self.panels:
            over.set_alpha(float(change.new))
        self.canvas.draw_idle()

    def _update(self, change=None) -> None:
        results = self.state.compare
        if not results:
            self.widget.layout.display = "none"
            return
        self.widget.layout.display = None
        for ax in self.axes[len(results):]:
            ax.set_visible(False)
        for (base, over), ax, c in zip(self.panels, self.axes, results):
            ax.set_visible(True)
            show_image(base, c.image, image_clim(c.image))
            if c.labels is None:
                show_image(over, np.zeros(c.image.shape, np.uint8))
                ax.set_title(f"ds {c.downsampling:g}: too small", fontsize=8)
            else:
                show_image(over, label_display(c.labels))
                ms = 1000 * (c.network_s + c.postprocess_s)  # (no network time when cached)
                score = "" if c.f1 is None else f", F1 {c.f1:.2f}"
                ax.set_title(f"ds {c.downsampling:g}: {c.count} objects{score}\n{ms:.0f} ms",
                             fontsize=8)
        self.canvas.draw_idle()
