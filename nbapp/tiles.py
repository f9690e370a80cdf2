"""Tiles of a large 2D image for the network: cores that cover the image once, each seen with a
halo of context around it, and the blending window for models whose tiled outputs only
approximate the whole image's (issue 29 item 2). Pure geometry: no torch, no model.

Coordinates are model-input pixels of the padded image (its sides are multiples of ``align``,
the model's padding factor), so every box a tile gives the network is a valid input and every
grid the network downsamples to lines up with the whole image's grid.

>>> [t.core for t in tile_grid((64, 96), core=64, halo=32)]
[(0, 64, 0, 64), (0, 64, 64, 96)]
>>> [t.box for t in tile_grid((64, 96), core=64, halo=32)]
[(0, 64, 0, 96), (0, 64, 32, 96)]
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from nbapp.errors import ParameterError

__all__ = ["Tile", "tile_grid", "tile_window"]


@dataclass(frozen=True)
class Tile:
    """One tile: ``box`` (y0, y1, x0, x1) is what the network sees, ``core`` (inside it) the
    part of the output the tile owns. Cores of a grid cover the image once."""

    box: tuple[int, int, int, int]
    core: tuple[int, int, int, int]

    def scaled(self, scale) -> "Tile":
        """The tile on an output grid ``scale`` times as fine (0.25: the 1/4 grid, 2: the
        semantic map rendered at twice the input resolution); every edge must fall on it."""
        f = Fraction(scale)

        def conv(edges):
            out = [e * f for e in edges]
            if any(v.denominator != 1 for v in out):
                raise ValueError(f"tile edges {edges} do not fall on a grid of scale {scale}")
            return tuple(int(v) for v in out)

        return Tile(conv(self.box), conv(self.core))

    @property
    def inner(self) -> tuple[int, int, int, int]:
        """The core in the box's own coordinates (what to crop from the tile's output)."""
        by, _, bx, _ = self.box
        y0, y1, x0, x1 = self.core
        return y0 - by, y1 - by, x0 - bx, x1 - bx


def tile_grid(shape: tuple, core: int, halo: int, align: int = 32) -> list[Tile]:
    """Tiles over a padded (H, W) image, row by row: cores of ``core`` x ``core`` pixels (the
    last in a row or column smaller), each box the core grown by ``halo`` on every side, clipped
    to the image. ``core`` and ``halo`` must be multiples of ``align`` (the padding factor), and
    H and W too.

    >>> len(tile_grid((96, 96), core=32, halo=0))
    9
    >>> tile_grid((96, 96), core=32, halo=32)[4]
    Tile(box=(0, 96, 0, 96), core=(32, 64, 32, 64))
    """
    h, w = (int(s) for s in shape)
    for name, value, least in (("core", core, align), ("halo", halo, 0)):
        if not isinstance(value, (int, np.integer)) or value < least or value % align:
            raise ParameterError(f"tile {name} must be a multiple of the model's padding factor "
                                 f"{align} (at least {least}), got {value!r}")
    if h % align or w % align or h < 1 or w < 1:
        raise ValueError(f"the padded image {h}x{w} must have sides that are positive multiples "
                         f"of {align}")
    tiles = []
    for y0 in range(0, h, core):
        y1 = min(y0 + core, h)
        for x0 in range(0, w, core):
            x1 = min(x0 + core, w)
            box = (max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo))
            tiles.append(Tile(box, (y0, y1, x0, x1)))
    return tiles


def _ramp(before: int, inside: int, after: int) -> np.ndarray:
    """Weights along one axis of a box: 0 over the outer half of the ``before`` halo pixels
    (where the network saw the box's edge, not the image), rising linearly through the inner
    half, 1 over the core, and the mirror image through the ``after`` ones."""

    def up(n: int) -> np.ndarray:
        dead = n // 2
        return np.clip((np.arange(n, dtype=np.float32) - dead + 1) / np.float32(n - dead + 1),
                       0, 1).astype(np.float32)

    return np.concatenate([up(before), np.ones(inside, np.float32), up(after)[::-1]])


def tile_window(tile: Tile) -> np.ndarray:
    """Blending weights over ``tile.box``: 1 on the core, falling linearly through the inner
    half of the halo to 0 over its outer half, on the sides where the box ends inside the image
    (an image edge is not faded). Overlapping tiles' outputs, weighted by these and divided by
    the summed weights (every pixel is in one core), join without seams, and the outputs a
    network makes near a box's edge, where it saw no context, are not used.

    >>> [round(float(v), 2) for v in tile_window(Tile((0, 6, 0, 3), (0, 2, 0, 3)))[:, 0]]
    [1.0, 1.0, 0.67, 0.33, 0.0, 0.0]
    """
    y0, y1, x0, x1 = tile.core
    by0, by1, bx0, bx1 = tile.box
    ry = _ramp(y0 - by0, y1 - y0, by1 - y1)
    rx = _ramp(x0 - bx0, x1 - x0, bx1 - x1)
    return ry[:, None] * rx[None, :]
