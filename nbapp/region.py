"""Big slices in the page: which region of the slice to segment for the view the user has zoomed
to, and how coarse an overview of the whole slice to show (issue 29 item 2; empanada-napari 1.2
calls it ROI inference). Pure arithmetic on shapes: no image, no widget, no model.

A slice is *big* when its model input (after Image Downsampling) has more than
:data:`REGION_MAX_PIXELS` pixels: the live sliders would wait seconds to minutes for the network
on all of it. The page then shows the whole slice coarsely and segments the visible region, at
most :data:`REGION_MAX_PIXELS` model-input pixels around the view's centre; every zoom or pan
segments the new region. The whole slice is segmented exactly (in tiles) by ``nbapp segment``
and the API.

>>> is_big((20000, 20000), 2), is_big((2048, 2048), 1)
(True, False)
>>> region_for_view((99.5, 599.5, 199.5, 899.5), (20000, 20000), downsampling=1)
(100, 600, 200, 900)
>>> overview_step((20000, 20000))
10
"""

from __future__ import annotations

import math

__all__ = ["REGION_MAX_PIXELS", "OVERVIEW_MAX_SIDE", "is_big", "region_for_view",
           "overview_step", "region_text"]

#: Model-input pixels of the largest region the page segments at once (about 1.5 s of the
#: default model on 2 CPU cores; bench/bench_2d.py gives 0.45 s for 768 x 1024).
REGION_MAX_PIXELS = 2048 * 2048
#: The overview of a big slice has at most this many pixels a side.
OVERVIEW_MAX_SIDE = 2048


def _model_pixels(height: float, width: float, downsampling: float) -> float:
    return math.ceil(height / downsampling) * math.ceil(width / downsampling)


def is_big(shape: tuple, downsampling: float = 1, max_pixels: int | None = None) -> bool:
    """Whether a (H, W) slice is segmented region by region in the page (more model-input
    pixels than ``max_pixels``, default :data:`REGION_MAX_PIXELS`)."""
    limit = REGION_MAX_PIXELS if max_pixels is None else max_pixels
    return _model_pixels(shape[0], shape[1], downsampling) > limit


def region_for_view(view, shape: tuple, downsampling: float = 1, min_side: int = 32,
                    max_pixels: int | None = None) -> tuple[int, int, int, int]:
    """The (y0, y1, x0, x1) region of a (H, W) slice to segment for a view.

    ``view`` is the visible (y0, y1, x0, x1) in pixel coordinates (matplotlib's limits, any
    order, possibly beyond the slice), or None for the whole slice. The region is the view
    clipped to the slice and rounded out to whole pixels; if its model input would exceed
    ``max_pixels`` it shrinks about the view's centre, keeping the view's shape; it grows to
    at least ``min_side`` model-input pixels a side (the model's smallest input).

    >>> region_for_view(None, (20000, 20000), 1)
    (8976, 11024, 8976, 11024)
    >>> region_for_view((-50, 10, 3.2, 30.7), (500, 400), 1)  # grown to 32 px a side
    (0, 32, 2, 34)
    >>> region_for_view((-0.5, 7999.5, -0.5, 1999.5), (20000, 20000), 4)
    (0, 8000, 0, 2000)
    >>> region_for_view((-0.5, 7999.5, -0.5, 1999.5), (20000, 20000), 1)  # shrunk about its centre
    (1952, 6048, 488, 1512)
    """
    max_pixels = REGION_MAX_PIXELS if max_pixels is None else max_pixels
    h, w = int(shape[0]), int(shape[1])
    if view is None:
        y0, y1, x0, x1 = 0, h, 0, w
    else:  # pixel i spans i - 0.5 .. i + 0.5: the pixels the view shows any of
        a, b, c, d = (float(v) for v in view)
        y0 = min(max(math.floor(min(a, b) + 0.5), 0), h - 1)
        y1 = max(min(math.ceil(max(a, b) + 0.5), h), y0 + 1)
        x0 = min(max(math.floor(min(c, d) + 0.5), 0), w - 1)
        x1 = max(min(math.ceil(max(c, d) + 0.5), w), x0 + 1)
    least = min(min_side * max(downsampling, 1), h, w)
    if (_model_pixels(y1 - y0, x1 - x0, downsampling) <= max_pixels
            and min(y1 - y0, x1 - x0) >= least):
        return y0, y1, x0, x1
    rh, rw = float(y1 - y0), float(x1 - x0)
    scale = math.sqrt(max_pixels / _model_pixels(rh, rw, downsampling))
    if scale < 1:
        rh, rw = rh * scale, rw * scale
    rh, rw = max(rh, least), max(rw, least)

    def span(centre: float, size: float, limit: int) -> tuple[int, int]:
        size = max(1, min(limit, int(math.floor(size))))
        start = min(max(int(round(centre - size / 2)), 0), limit - size)
        return start, start + size

    return (*span((y0 + y1) / 2, rh, h), *span((x0 + x1) / 2, rw, w))


def overview_step(shape: tuple, max_side: int | None = None) -> int:
    """Every how many pixels the overview of a (H, W) slice samples (1: the slice itself) for
    at most ``max_side`` (default :data:`OVERVIEW_MAX_SIDE`) pixels a side."""
    side = OVERVIEW_MAX_SIDE if max_side is None else max_side
    return max(1, math.ceil(max(int(shape[0]), int(shape[1])) / side))


def region_text(region: tuple, shape: tuple) -> str:
    """What the status line says about a region of a big slice.

    >>> region_text((0, 2048, 100, 2148), (20000, 20000))
    'region y 0-2048, x 100-2148 of the 20000 x 20000 slice (zoom or pan to segment another)'
    """
    y0, y1, x0, x1 = region
    return (f"region y {y0}-{y1}, x {x0}-{x1} of the {shape[0]} x {shape[1]} slice "
            "(zoom or pan to segment another)")
