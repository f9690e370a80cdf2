"""The network outputs of one 2D image, as numpy arrays (the engine's product, post-processing's input)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Heads"]


@dataclass(frozen=True, eq=False)
class Heads:
    """Network outputs for one (H, W) image, cropped to the image (padding removed).

    Attributes
    ----------
    sem : (C, H, W) float32
        Semantic probabilities at the ORIGINAL image resolution: sigmoid of the logits when
        C = 1, softmax over classes when C > 1 (channel 0 = background).
    ctr : (h, w) float32
        Raw centre heat-map on the grouping grid.
    offsets : (2, h, w) float32
        (dy, dx) from each grid cell to its object centre, in pixels of the model input (the
        image after downsampling).
    downsampling : int or float
        Factor the image was reduced by before the model (0.5, 0.25: enlarged 2x, 4x; the
        grid then stays coarse, so ``downsampling * grid_step`` is a whole number of pixels).
    grid_step : int
        Model-input pixels per grid cell: 4 for the coarse 1/4 grid, 1 for fine boundaries.
    meta : dict
        Normalisation and timing notes (not used by post-processing).
    """

    sem: np.ndarray
    ctr: np.ndarray
    offsets: np.ndarray
    downsampling: int = 1
    grid_step: int = 4
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """The (H, W) of the original image."""
        return self.sem.shape[1], self.sem.shape[2]

    @property
    def num_classes(self) -> int:
        return self.sem.shape[0]

    @property
    def nbytes(self) -> int:
        return self.sem.nbytes + self.ctr.nbytes + self.offsets.nbytes
