"""Intensity range of images and volumes (SPEC step 2, with the FIX for non-uint8 data). Pure numpy.

uint8 data uses the range 0-255; float data already in [0, 1] is taken as it is; anything else
(uint16 with 12-bit content, int32, floats outside [0, 1]) is rescaled from robust percentiles
(0.1 %, 99.9 %) of the data to [0, 1], so that the model sees the contrast it was trained on.

>>> intensity_range(np.array([[0, 255]], np.uint8))
(0.0, 255.0, 'uint8: fixed range 0-255')
>>> lo, hi, note = intensity_range(np.arange(4096, dtype=np.uint16).reshape(64, 64))
>>> round(lo), round(hi), note.split(':')[0]
(4, 4091, 'uint16')
"""

from __future__ import annotations

import numpy as np

from nbapp.errors import InputError

__all__ = ["intensity_range", "to_unit", "check_image_values", "PERCENTILES"]

PERCENTILES = (0.1, 99.9)
_SAMPLE = 1 << 22


def check_image_values(image: np.ndarray, what: str = "image") -> None:
    """Raise :class:`InputError` for dtypes and values no model can use."""
    if image.dtype == bool:
        raise InputError(f"{what} has dtype bool (a mask?); give the grey-level EM image")
    if np.iscomplexobj(image):
        raise InputError(f"{what} has complex dtype {image.dtype}; give real grey levels")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise InputError(f"{what} has dtype {image.dtype}; expected integer or float grey levels")
    if image.size == 0:
        raise InputError(f"{what} is empty (shape {image.shape})")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError(f"{what} contains NaN or infinite values; replace them first "
                         "(for example with numpy.nan_to_num)")


def _sample(data: np.ndarray) -> np.ndarray:
    flat = np.asarray(data).reshape(-1)
    if flat.size <= _SAMPLE:
        return flat
    return flat[:: flat.size // _SAMPLE + 1]


def intensity_range(data: np.ndarray) -> tuple[float, float, str]:
    """Return ``(lo, hi, note)``: grey values mapped to 0 and 1, and how they were chosen.

    Large arrays are subsampled (every k-th voxel) for the percentiles, so a whole volume can
    share one range: slices of a volume must not be normalised one by one.
    """
    data = np.asarray(data)
    if data.dtype == np.uint8:
        return 0.0, 255.0, "uint8: fixed range 0-255"
    sample = _sample(data)
    if np.issubdtype(data.dtype, np.floating):
        smin, smax = float(np.min(sample)), float(np.max(sample))
        if smin >= 0.0 and smax <= 1.0:
            return 0.0, 1.0, "float in [0, 1]: taken as it is"
    lo, hi = (float(v) for v in np.percentile(sample.astype(np.float64), PERCENTILES))
    if hi <= lo:
        lo, hi = float(np.min(sample)), float(np.max(sample))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, (f"{data.dtype}: rescaled from percentiles {PERCENTILES[0]}-{PERCENTILES[1]} % "
                    f"({lo:g}-{hi:g}) to 0-1")


def to_unit(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map grey values so that ``lo`` -> 0 and ``hi`` -> 1, clipped, as float32."""
    out = (np.asarray(image, np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    if lo != 0.0 or hi not in (1.0, 255.0):
        np.clip(out, 0.0, 1.0, out=out)
    return out
