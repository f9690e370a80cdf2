"""Figure helpers shared by the 2D and 3D views: an ipympl figure without pyplot, the label
colour map, and images updated in place (``set_data``, never rebuilt)."""

from __future__ import annotations

import warnings

import numpy as np
from matplotlib.colors import ListedColormap, hsv_to_rgb
from matplotlib.figure import Figure

__all__ = ["figure_widget", "label_cmap", "label_display", "setup_image_axes", "show_image",
           "place_image", "image_clim", "NEAREST"]

_N_COLOURS = 255


def figure_widget(figsize=(5, 5), toolbar: bool = True, **kw) -> Figure:
    """A matplotlib Figure whose canvas is an ipympl widget, made without pyplot (no global
    figure registry). ``toolbar``: the zoom / pan toolbar, which shows over the figure's top
    left corner on hover (off for rows of small panels, where it covered the first one)."""
    from ipympl.backend_nbagg import Canvas, FigureManager

    fig = Figure(figsize=figsize, **kw)
    canvas = Canvas(fig)
    with warnings.catch_warnings():
        # ipympl 0.10's Toolbar passes the canvas on to traitlets' HasTraits.__init__
        warnings.filterwarnings(
            "ignore", message=r"Passing unrecognized arguments to super\(Toolbar\)",
            category=DeprecationWarning)
        canvas.manager = FigureManager(canvas, 0)
    canvas.header_visible = False
    canvas.footer_visible = False
    canvas.resizable = False
    canvas.toolbar_visible = bool(toolbar)
    return fig


def label_cmap(seed: int = 0) -> ListedColormap:
    """255 shuffled bright colours after a transparent 0."""
    rng = np.random.default_rng(seed)
    hues = rng.permutation(_N_COLOURS) / _N_COLOURS
    sat = rng.uniform(0.6, 1.0, _N_COLOURS)
    val = rng.uniform(0.75, 1.0, _N_COLOURS)
    rgb = hsv_to_rgb(np.stack([hues, sat, val], axis=1))
    colours = np.concatenate([[[0, 0, 0, 0]], np.concatenate([rgb, np.ones((_N_COLOURS, 1))], 1)])
    return ListedColormap(colours, name="nbapp-labels")


def label_display(labels: np.ndarray) -> np.ndarray:
    """Label ids -> colour indices 0..255 (0 stays 0; neighbouring ids get different colours).

    >>> label_display(np.array([[0, 1, 10001, 255]])).tolist()
    [[0, 1, 56, 255]]
    """
    lab = np.asarray(labels).astype(np.int64, copy=False)
    out = (lab - 1) % _N_COLOURS + 1
    out[lab == 0] = 0
    return out.astype(np.uint8)


# Nearest-neighbour images are resampled to screen pixels BEFORE colour mapping ("data"
# stage): the same picture as mapping all 1024x1024 values to RGBA first (matplotlib's "auto"
# when downsampling), 6x less drawing time (bench/bench_viewer_draw.py).
NEAREST = {"interpolation": "nearest", "interpolation_stage": "data"}


def setup_image_axes(ax, shape=(2, 2), cmap=None, overlay=True, opacity=0.5):
    """A grey image and (optionally) a label overlay on ``ax``, ready for :func:`show_image`."""
    ax.set_axis_off()
    base = ax.imshow(np.zeros(shape, np.float32), cmap="gray", vmin=0, vmax=1, **NEAREST)
    over = None
    if overlay:
        over = ax.imshow(np.zeros(shape, np.uint8), cmap=cmap or label_cmap(), vmin=0,
                         vmax=_N_COLOURS, alpha=opacity, **NEAREST)
    return base, over


def show_image(image_artist, array, clim=None) -> None:
    """Put ``array`` into an existing AxesImage, fitting extent and limits to its shape."""
    h, w = array.shape[:2]
    old = image_artist.get_array().shape[:2]
    image_artist.set_data(array)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    if tuple(image_artist.get_extent()) != extent:
        image_artist.set_extent(extent)
    if clim is not None:
        image_artist.set_clim(*clim)
    if old != (h, w):
        image_artist.axes.set_xlim(-0.5, w - 0.5)
        image_artist.axes.set_ylim(h - 0.5, -0.5)


def place_image(image_artist, array, origin=(0, 0), step: int = 1, clim=None) -> None:
    """Put ``array`` into an existing AxesImage at ``origin`` (row, column) of a larger slice,
    each of its pixels ``step`` slice pixels a side; the axes' limits (the user's zoom) stay."""
    h, w = array.shape[:2]
    y0, x0 = origin
    image_artist.set_data(array)
    image_artist.set_extent((x0 - 0.5, x0 + w * step - 0.5, y0 + h * step - 0.5, y0 - 0.5))
    if clim is not None:
        image_artist.set_clim(*clim)


def image_clim(img: np.ndarray) -> tuple:
    """Grey-level limits of an image shown: its 0.5 and 99.5 percentiles."""
    lo, hi = np.percentile(img, (0.5, 99.5)) if img.size else (0, 1)
    return (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
