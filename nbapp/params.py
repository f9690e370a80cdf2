"""Frozen, validated parameter sets shared by the API, the CLI, the app and the tests.

Names, defaults and ranges follow SPEC.md (the empanada-napari widget's meanings). Objects are
immutable, hashable (usable as cache keys, safe to hand to threads) and changed with
:func:`dataclasses.replace`.

>>> p = SliceParams(seg_threshold=0.6)
>>> p.center_threshold
0.1
>>> import dataclasses
>>> dataclasses.replace(p, min_distance=5).min_distance
5
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from nbapp.errors import ParameterError

__all__ = [
    "SliceParams", "ConsensusParams", "VolumeParams", "DOWNSAMPLING_FACTORS", "NETWORK_FIELDS",
    "LABELS", "PLANES", "MEDIAN_SIZES", "ENLARGING_FACTORS", "as_factor",
]

DOWNSAMPLING_FACTORS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
#: Factors below 1 enlarge the image before the model (data with pixels coarser than the
#: model's): 0.5 doubles each side.
ENLARGING_FACTORS = (0.25, 0.5)
PLANES = ("xy", "xz", "yz")
MEDIAN_SIZES = (1, 3, 5, 7, 9, 11)

#: Fields of SliceParams that change what the network sees (a change re-runs the model).
NETWORK_FIELDS = ("downsampling", "fine_boundaries")

#: The visible label of each parameter (empanada-napari's widget wording).
LABELS = {
    "downsampling": "Image Downsampling",
    "seg_threshold": "Segmentation Confidence Threshold",
    "center_threshold": "Center Confidence Threshold",
    "min_distance": "Centers Minimum Distance",
    "fine_boundaries": "Fine boundaries",
    "label_divisor": "Max objects per class",
    "semantic_only": "Semantic only",
    "fill_holes": "Fill holes in segmentation",
    "batch_mode": "Batch mode",
    "plane": "Inference plane",
    "orthoplane": "Run ortho-plane",
    "median_size": "Median Filter Size",
    "min_size": "Min Size",
    "min_extent": "Min Box Extent",
    "vote_threshold": "Voxel Vote Threshold Out of 3",
    "allow_one_view": "Permit detections found in 1 stack into consensus",
    "return_stacks": "Return xy, xz, yz stacks",
}


def _check_range(name: str, value, lo, hi, kind=float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        kind is int and not float(value).is_integer()
    ):
        raise ParameterError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        )
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ParameterError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ParameterError(f"{name} must be True or False, got {value!r}")


def as_factor(value) -> int | float:
    """A downsampling factor as its canonical number: int from 1 up, float below 1.

    >>> as_factor(2.0), as_factor(0.5)
    (2, 0.5)
    """
    value = float(value)
    return int(value) if value >= 1 else value


@dataclass(frozen=True)
class SliceParams:
    """Parameters of 2D inference (one image or one slice), SPEC.md section 2.

    Parameters
    ----------
    downsampling : int or float
        The image is resized by 1/downsampling before the model; one of 1, 2, 4, ..., 64, or
        0.5 and 0.25 to enlarge it 2x or 4x (pixels coarser than the model's); below 1 the
        centres and offsets are always on the coarse grid (fine boundaries add nothing there).
    seg_threshold : float
        Segmentation Confidence Threshold, 0.1-0.9: sigmoid probability >= threshold is
        foreground (ignored by multi-class models, which use argmax).
    center_threshold : float
        Center Confidence Threshold, 0.05-0.9: a centre must have heat-map value > threshold.
    min_distance : int
        Centers Minimum Distance, 1-35: NMS window on the heat-map grid (1 disables NMS).
    fine_boundaries : bool
        Group pixels at full input resolution instead of the 1/4 grid.
    label_divisor : int
        Max objects per class: panoptic id = class * label_divisor + instance. 0 numbers all
        objects 1..N.
    semantic_only : bool
        Skip instances: every foreground pixel gets its class id.
    fill_holes : bool
        Fill holes inside each instance (using only that instance's mask).
    batch_mode : bool
        Treat a stack as unrelated 2D images, each inferred on its own.
    """

    downsampling: int = 1
    seg_threshold: float = 0.5
    center_threshold: float = 0.1
    min_distance: int = 3
    fine_boundaries: bool = False
    label_divisor: int = 10000
    semantic_only: bool = False
    fill_holes: bool = False
    batch_mode: bool = False

    def __post_init__(self) -> None:
        if self.downsampling not in DOWNSAMPLING_FACTORS or isinstance(self.downsampling, bool):
            raise ParameterError(
                f"downsampling must be one of {DOWNSAMPLING_FACTORS}, got {self.downsampling!r}"
            )
        _check_range("seg_threshold", self.seg_threshold, 0.1, 0.9)
        _check_range("center_threshold", self.center_threshold, 0.05, 0.9)
        _check_range("min_distance", self.min_distance, 1, 35, int)
        _check_range("label_divisor", self.label_divisor, 0, 2**31 - 1, int)
        for name in ("fine_boundaries", "semantic_only", "fill_holes", "batch_mode"):
            _check_bool(name, getattr(self, name))
        # Normalise numeric types so that equal values give equal cache keys.
        object.__setattr__(self, "downsampling", as_factor(self.downsampling))
        object.__setattr__(self, "min_distance", int(self.min_distance))
        object.__setattr__(self, "label_divisor", int(self.label_divisor))
        object.__setattr__(self, "seg_threshold", float(self.seg_threshold))
        object.__setattr__(self, "center_threshold", float(self.center_threshold))

    @property
    def network_key(self) -> tuple:
        """The part of the parameters that the network outputs depend on."""
        return (self.downsampling, self.fine_boundaries)

    def replace(self, **changes) -> "SliceParams":
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ConsensusParams:
    """Parameters of the ortho-plane consensus and of the 3D object filters (SPEC section 3).

    They can be changed after a 3D job: :func:`nbapp.consensus` re-runs from stored stacks.

    Parameters
    ----------
    vote_threshold : int
        Voxel Vote Threshold Out of 3 (1-3): voxels of a consensus object must be covered by
        this many detections.
    allow_one_view : bool
        Permit detections found in 1 stack into consensus.
    min_size : int
        Min Size: delete 3D objects with fewer voxels (0-1e6).
    min_extent : int
        Min Box Extent: delete 3D objects whose bounding box is thinner than this along any
        axis (0-1000).
    """

    vote_threshold: int = 2
    allow_one_view: bool = False
    min_size: int = 500
    min_extent: int = 5

    def __post_init__(self) -> None:
        _check_range("vote_threshold", self.vote_threshold, 1, 3, int)
        _check_bool("allow_one_view", self.allow_one_view)
        _check_range("min_size", self.min_size, 0, 1_000_000, int)
        _check_range("min_extent", self.min_extent, 0, 1000, int)
        for name in ("vote_threshold", "min_size", "min_extent"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def replace(self, **changes) -> "ConsensusParams":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class VolumeParams:
    """Parameters of 3D inference: the 2D ones per slice plus stacking, tracking and consensus.

    >>> VolumeParams().orthoplane, VolumeParams().median_size, VolumeParams().slice.seg_threshold
    (True, 3, 0.5)
    """

    slice: SliceParams = SliceParams()
    plane: str = "xy"
    orthoplane: bool = True
    median_size: int = 3
    consensus: ConsensusParams = ConsensusParams()
    return_stacks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.slice, SliceParams):
            raise ParameterError(f"slice must be SliceParams, got {type(self.slice).__name__}")
        if not isinstance(self.consensus, ConsensusParams):
            raise ParameterError(f"consensus must be ConsensusParams, got {type(self.consensus).__name__}")
        if self.plane not in PLANES:
            raise ParameterError(f"plane must be one of {PLANES}, got {self.plane!r}")
        _check_bool("orthoplane", self.orthoplane)
        _check_bool("return_stacks", self.return_stacks)
        if isinstance(self.median_size, bool) or self.median_size not in MEDIAN_SIZES:
            raise ParameterError(f"median_size must be an odd number in {MEDIAN_SIZES}, "
                                 f"got {self.median_size!r}")
        object.__setattr__(self, "median_size", int(self.median_size))

    @property
    def planes(self) -> tuple:
        """The planes a job runs: all three for ortho-plane, else the chosen one."""
        return PLANES if self.orthoplane else (self.plane,)

    def replace(self, **changes) -> "VolumeParams":
        return dataclasses.replace(self, **changes)
