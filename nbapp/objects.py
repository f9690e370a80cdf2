"""Measurements of a label volume, and filter settings suggested from the data: the object
table (the app's table, ``nbapp segment --table``), Min Size / Min Box Extent from a box drawn
around the smallest object, and the Median Filter Size from the voxel size. Pure numpy.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nbapp.errors import InputError
from nbapp.io import write_small

__all__ = ["object_table", "write_table", "TABLE_COLUMNS", "suggest_filters", "suggest_median",
           "class_name", "class_counts", "suggest_downsampling", "plane_pixel_size",
           "suggest_from_object", "suggest_from_mask", "per_class_note"]

#: The columns of :func:`write_table` (start inclusive, stop exclusive; (Z, Y, X) order).
TABLE_COLUMNS = ("id", "class", "voxels", "z0", "y0", "x0", "z1", "y1", "x1", "centroid_z",
                 "centroid_y", "centroid_x", "extent_z", "extent_y", "extent_x")


def class_name(label: int, label_divisor: int = 0, class_names: dict | None = None) -> str:
    """The class of a label id: ``id // label_divisor`` (panoptic ids) named by
    ``class_names``; with one class, or ids numbered 1..N of a one-class model, that class;
    "" when it cannot be known (ids 1..N of a multi-class model).

    >>> class_name(2003, 1000, {1: "mito", 2: "er"}), class_name(7, 0, {1: "mito"})
    ('er', 'mito')
    """
    if not class_names:
        return ""
    if label_divisor and label >= label_divisor:
        c = int(label) // int(label_divisor)
        return str(class_names.get(c, c))
    if len(class_names) == 1:
        return str(next(iter(class_names.values())))
    return ""


def class_counts(labels: np.ndarray, label_divisor: int = 0,
                 class_names: dict | None = None) -> dict:
    """Objects per class name of a label image or volume ({"": n} when classes are unknown).

    >>> class_counts(np.array([[0, 1001, 1002, 2001]]), 1000, {1: "mito", 2: "er"})
    {'mito': 2, 'er': 1}
    """
    ids = np.unique(np.asarray(labels))
    counts: dict = {}
    for i in ids[ids > 0]:
        name = class_name(int(i), label_divisor, class_names)
        counts[name] = counts.get(name, 0) + 1
    return counts


def suggest_filters(height: float, width: float) -> dict:
    """Min Size and Min Box Extent suggested by a 2D box drawn around the smallest object to
    keep, when its thickness is unknown (no 3D result to measure it in).

    The third side is taken as a quarter of the smaller drawn side (objects are rarely flatter:
    on the demo volume the flattest is a quarter as thick as wide), an ellipsoid fills about
    half of its box, and 20 % more is taken off: Min Size = 0.8 x h x w x (min(h, w) / 4) / 2;
    Min Box Extent is that third side minus 2. With a 3D result,
    :func:`suggest_from_object` measures the object instead.

    >>> suggest_filters(20, 30)
    {'min_size': 1200, 'min_extent': 3}
    """
    h, w = abs(float(height)), abs(float(width))
    third = min(h, w) / 4
    volume = h * w * third
    return {"min_size": int(min(1_000_000, math.floor(volume / 2 * 0.8))),
            "min_extent": int(max(0, min(1000, math.floor(min(h, w, third)) - 2)))}


def suggest_from_mask(mask: np.ndarray) -> dict:
    """Min Size and Min Box Extent from one object's 2D mask (its pixels on a slice) when its
    thickness is unknown: an ellipsoid with that cross-section, as thick as a quarter of its
    minor axis (the rule of :func:`suggest_filters`), less 20 %. Unlike a drawn box, this does
    not grow when the box is loose or the object lies diagonally (a box around the demo's long,
    diagonal object suggested more voxels than any object had).

    >>> yy, xx = np.mgrid[:40, :60]
    >>> suggest_from_mask(((yy - 20) / 10) ** 2 + ((xx - 30) / 20) ** 2 <= 1)
    {'min_size': 1744, 'min_extent': 3}
    """
    ys, xs = np.nonzero(np.asarray(mask))
    if ys.size == 0:
        raise InputError("the object to measure has no pixels")
    cov = np.cov(np.stack([ys, xs]).astype(float)) if ys.size > 1 else np.zeros((2, 2))
    minor = 4.0 * math.sqrt(max(float(np.linalg.eigvalsh(cov)[0]), 0.0)) + 1.0
    third = minor / 4
    volume = 2.0 / 3.0 * ys.size * third
    return {"min_size": int(min(1_000_000, math.floor(0.8 * volume))),
            "min_extent": int(max(0, min(1000, math.floor(third) - 2)))}


def suggest_from_object(labels: np.ndarray, label: int) -> dict:
    """Min Size and Min Box Extent that keep object ``label`` of a 3D label volume with a 20 %
    margin: 0.8 x its voxels, and its smallest bounding-box side minus 2.

    >>> lab = np.zeros((4, 10, 10), np.int32); lab[1:3, 2:8, 3:6] = 7
    >>> suggest_from_object(lab, 7)
    {'min_size': 28, 'min_extent': 0}
    """
    mask = np.asarray(labels) == label
    n = int(mask.sum())
    if n == 0:
        raise InputError(f"there is no object {label} to measure")
    sl = ndi.find_objects(mask.astype(np.uint8))[0]
    extent = min(s.stop - s.start for s in sl)
    return {"min_size": int(math.floor(0.8 * n)), "min_extent": int(max(0, extent - 2))}


def plane_pixel_size(voxel_size, plane: str = "xy") -> float | None:
    """The pixel size (nm) of a plane's slices: the mean of its two in-plane spacings.

    >>> plane_pixel_size((40, 5, 5)), plane_pixel_size((40, 5, 5), "xz")
    (5.0, 22.5)
    """
    if not voxel_size or len(voxel_size) < 2:
        return None
    vs = [float(v) for v in voxel_size]
    if len(vs) == 2:
        pair = vs
    else:
        pair = {"xy": (vs[1], vs[2]), "xz": (vs[0], vs[2]), "yz": (vs[0], vs[1])}[plane]
    if not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return (pair[0] + pair[1]) / 2


def suggest_downsampling(pixel_nm: float | None, model_pixel_nm: float | None) -> int | float | None:
    """The Image Downsampling that brings data with ``pixel_nm`` pixels closest (in log scale)
    to the model's ``model_pixel_nm``: above 1 when the data's pixels are finer, 0.5 or 0.25
    (enlarging) when they are coarser; None when either size is unknown.

    >>> [suggest_downsampling(p, 5) for p in (5, 4.6, 2.5, 1.2, 10, 20, 80)]
    [1, 1, 2, 4, 0.5, 0.25, 0.25]
    """
    if not pixel_nm or not model_pixel_nm or pixel_nm <= 0 or model_pixel_nm <= 0:
        return None
    from nbapp.params import DOWNSAMPLING_FACTORS

    ratio = math.log2(float(model_pixel_nm) / float(pixel_nm))
    usable = [f for f in DOWNSAMPLING_FACTORS if f <= 8]
    return min(usable, key=lambda f: (abs(math.log2(f) - ratio), f))


def suggest_median(voxel_size) -> int | None:
    """Median Filter Size for a voxel size in nm (the spacing along Z, the xy stacking axis):
    3 above 20 nm, 5 from 10 to 20 nm, 7 below 10 nm, 9 below 5 nm.

    >>> [suggest_median((s, 5, 5)) for s in (30, 15, 8, 4)]
    [3, 5, 7, 9]
    """
    if not voxel_size:
        return None
    z = float(voxel_size[0])
    if not math.isfinite(z) or z <= 0:
        return None
    if z >= 20:
        return 3
    if z >= 10:
        return 5
    if z >= 5:
        return 7
    return 9


def per_class_note(labels: np.ndarray, label_divisor: int, class_names: dict) -> str:
    """" (mito 10, er 2)": objects per class, for a model with several classes; "" else.

    >>> per_class_note(np.array([[1001, 2001]]), 1000, {1: "mito", 2: "er"})
    ' (mito 1, er 1)'
    """
    if len(class_names or {}) < 2:
        return ""
    counts = class_counts(labels, label_divisor, class_names)
    return " (" + ", ".join(f"{k or '?'} {v}" for k, v in counts.items()) + ")"


def object_table(labels: np.ndarray, label_divisor: int = 0,
                 class_names: dict | None = None) -> list[dict]:
    """One row per object of a (Z, Y, X) label volume: id, class (:func:`class_name`), voxels,
    bounding box (start inclusive, stop exclusive), centroid and extent (Z, Y, X).

    >>> lab = np.zeros((2, 3, 4), np.int32); lab[0, 1:3, 1:4] = 5
    >>> object_table(lab)[0]["bbox"], object_table(lab)[0]["voxels"]
    ((0, 1, 1, 1, 3, 4), 6)
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return []
    objs = ndi.find_objects(labels.astype(np.int64, copy=False), max_label=int(ids.max()))
    rows = []
    for i in ids:
        sl = objs[int(i) - 1]
        mask = labels[sl] == i
        coords = np.nonzero(mask)
        n = int(coords[0].size)
        centroid = tuple(round(float(c.mean()) + s.start, 1) for c, s in zip(coords, sl))
        starts = tuple(int(s.start) for s in sl)
        stops = tuple(int(s.stop) for s in sl)
        rows.append({"id": int(i), "class": class_name(int(i), label_divisor, class_names),
                     "voxels": n, "bbox": starts + stops, "centroid": centroid,
                     "extent": tuple(b - a for a, b in zip(starts, stops))})
    return rows


def write_table(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write :func:`object_table` rows to a CSV file (under a temporary name, renamed when
    complete).

    Raises
    ------
    InputError
        Not a ``.csv`` name, a missing folder, or the write failed.
    """
    target = Path(path)
    if target.suffix.lower() != ".csv":
        raise InputError(f"the table is written as CSV: give a .csv name, not {target.name!r}")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    def write(f) -> None:
        w = csv.writer(f)
        w.writerow(TABLE_COLUMNS)
        for r in rows:
            w.writerow([r["id"], r.get("class", ""), r["voxels"], *r["bbox"], *r["centroid"],
                        *r["extent"]])

    write_small(target, write, "w", newline="")
    return target
