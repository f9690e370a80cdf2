"""Proofreading a 2D label image, and the training set the corrected slices go into. Pure numpy
(no widgets, no torch): the app's 2D viewer drives :class:`LabelEditor` with mouse events and
stores slices with :class:`TrainingSet`; :func:`nbapp.finetune` trains on them.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbapp.errors import InputError
from nbapp.io import write_small

__all__ = ["LabelEditor", "TrainingSet", "TrainingSlice", "TRAINING_FOLDER"]

#: The folder beside the data (inside the app's data root) that holds the training set.
TRAINING_FOLDER = "nbapp-training"


def _disk(radius: float) -> np.ndarray:
    r = max(0, int(np.ceil(radius)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return yy * yy + xx * xx <= radius * radius + 1e-9


def _line(p0, p1) -> list[tuple[int, int]]:
    """Integer points from ``p0`` to ``p1`` (inclusive), one per pixel step."""
    (y0, x0), (y1, x1) = p0, p1
    n = int(max(abs(y1 - y0), abs(x1 - x0))) + 1
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    return list(zip(ys.tolist(), xs.tolist()))


class LabelEditor:
    """Edit a 2D label image: delete, merge, paint, erase, with undo.

    Every edit keeps ids unique and 0 as background; :attr:`labels` is a new array after each
    edit (the old one is kept for :meth:`undo`). Coordinates are (row, column) in pixels.

    >>> ed = LabelEditor(np.array([[1, 1, 0, 2]]))
    >>> ed.delete(0, 3).tolist(), ed.undo().tolist()
    ([[1, 1, 0, 0]], [[1, 1, 0, 2]])
    """

    def __init__(self, labels: np.ndarray, max_undo: int = 50):
        labels = np.asarray(labels)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"proofreading needs a 2D integer label image, got "
                             f"{labels.ndim}D {labels.dtype}")
        self.original = labels.copy()
        self.labels = labels.astype(np.int32, copy=True)
        self.max_undo = max_undo
        self._history: list[np.ndarray] = []
        self.edits = 0
        self.stored = False  # the app marks an editor whose slice is in the training set

    # -- helpers
    def _push(self) -> None:
        self._history.append(self.labels.copy())
        del self._history[:-self.max_undo]

    def _done(self, new: np.ndarray) -> np.ndarray:
        self._push()
        self.labels = new
        self.edits += 1
        return new

    def id_at(self, y: float, x: float) -> int:
        """The id under (y, x); 0 for background or outside the image."""
        r, c = int(round(y)), int(round(x))
        if 0 <= r < self.labels.shape[0] and 0 <= c < self.labels.shape[1]:
            return int(self.labels[r, c])
        return 0

    def new_id(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.size else 1

    # -- edits
    def delete(self, y: float, x: float) -> np.ndarray:
        """Remove the object under (y, x) (no change on background)."""
        i = self.id_at(y, x)
        if i == 0:
            return self.labels
        return self._done(np.where(self.labels == i, 0, self.labels).astype(np.int32))

    def merge(self, a: tuple, b: tuple) -> np.ndarray:
        """Give the object under point ``b`` the id of the object under point ``a``."""
        ia, ib = self.id_at(*a), self.id_at(*b)
        if ia == 0 or ib == 0 or ia == ib:
            return self.labels
        return self._done(np.where(self.labels == ib, ia, self.labels).astype(np.int32))

    def gap(self, a: tuple, b: tuple) -> float:
        """The shortest distance in pixels between the objects under points ``a`` and ``b``
        (1 where they touch; ``inf`` if either point is on background).

        >>> lab = np.zeros((5, 9), np.int32); lab[1:4, 1:3] = 1; lab[1:4, 3:5] = 2; lab[2, 7] = 3
        >>> ed = LabelEditor(lab)
        >>> ed.gap((2, 1), (2, 4)), ed.gap((2, 1), (2, 7))
        (1.0, 5.0)
        """
        from scipy import ndimage

        ia, ib = self.id_at(*a), self.id_at(*b)
        if ia == 0 or ib == 0:
            return float("inf")
        dist = ndimage.distance_transform_edt(self.labels != ia)
        return float(dist[self.labels == ib].min())

    def paint(self, points: list, radius: float, label: int | None = None) -> np.ndarray:
        """Paint a brush stroke through ``points`` with ``label``: by default the object under
        the first point (extend it), or a new object when it starts on background. Painting
        never overwrites another object."""
        if not points:
            return self.labels
        if label is None:
            label = self.id_at(*points[0]) or self.new_id()
        mask = self._stroke(points, radius)
        new = self.labels.copy()
        new[mask & (new == 0)] = label
        return self._done(new)

    def erase(self, points: list, radius: float) -> np.ndarray:
        """Set a brush stroke through ``points`` to background."""
        if not points:
            return self.labels
        new = self.labels.copy()
        new[self._stroke(points, radius)] = 0
        return self._done(new)

    def _stroke(self, points: list, radius: float) -> np.ndarray:
        h, w = self.labels.shape
        mask = np.zeros((h, w), bool)
        disk = _disk(radius)
        r = disk.shape[0] // 2
        pts = [(int(round(y)), int(round(x))) for y, x in points]
        path = pts[:1] + [q for a, b in zip(pts, pts[1:]) for q in _line(a, b)[1:]]
        for y, x in path:
            y0, y1, x0, x1 = y - r, y + r + 1, x - r, x + r + 1
            cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
            if cy0 >= cy1 or cx0 >= cx1:
                continue
            mask[cy0:cy1, cx0:cx1] |= disk[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        return mask

    def undo(self) -> np.ndarray:
        """Take the last edit back (no-op when there is none)."""
        if self._history:
            self.labels = self._history.pop()
            self.edits = max(0, self.edits - 1)
        return self.labels

    @property
    def changed(self) -> bool:
        return bool(np.any(self.labels != self.original))


@dataclass(frozen=True)
class TrainingSlice:
    """One stored slice: image, corrected labels, the model's labels before correction."""

    path: Path
    image: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    meta: dict

    @property
    def objects(self) -> int:
        return int(np.count_nonzero(np.unique(self.labels)))


class TrainingSet:
    """Corrected slices in a folder (one ``.npz`` each, written atomically), for fine-tuning.

    ``add`` stores (image, labels, predicted) with where it came from (data name, plane, index,
    downsampling, model); adding the same slice again replaces it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @staticmethod
    def _key(meta: dict) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(meta.get("data", "data")))[:60]
        return f"{name}_{meta.get('plane', 'xy')}_{int(meta.get('index', 0)):05d}"

    def add(self, image: np.ndarray, labels: np.ndarray, predicted: np.ndarray | None = None,
            **meta) -> Path:
        image, labels = np.asarray(image), np.asarray(labels)
        if image.ndim != 2 or image.shape != labels.shape:
            raise InputError(f"a training slice needs a 2D image and labels of one shape, got "
                             f"{image.shape} and {labels.shape}")
        predicted = labels if predicted is None else np.asarray(predicted)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the training folder {self.folder}: "
                             f"{exc.strerror or exc}") from None
        meta = {**meta, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        target = self.folder / f"{self._key(meta)}.npz"
        write_small(target, lambda f: np.savez_compressed(
            f, image=image, labels=labels.astype(np.int32), predicted=predicted.astype(np.int32),
            meta=np.array(json.dumps(meta))))
        return target

    def slices(self) -> list[TrainingSlice]:
        """Every stored slice (unreadable files are skipped)."""
        out = []
        if not self.folder.is_dir():
            return out
        for p in sorted(self.folder.glob("*.npz")):
            try:
                with np.load(p, allow_pickle=False) as z:
                    out.append(TrainingSlice(p, z["image"], z["labels"], z["predicted"],
                                             json.loads(str(z["meta"]))))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def remove(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.parent.resolve() != self.folder.resolve():
            raise InputError(f"{p} is not in the training set {self.folder}")
        p.unlink(missing_ok=True)

    def clear(self) -> None:
        for p in self.folder.glob("*.npz"):
            p.unlink(missing_ok=True)

    def summary(self) -> str:
        s = self.slices()
        if not s:
            return "no slices stored"
        return f"{len(s)} slice(s), {sum(t.objects for t in s)} objects"
