"""Segmentation metrics for label images: foreground IoU and one-to-one instance matching.

Pure numpy/scipy. Works on 2D (Y, X) and 3D (Z, Y, X) label arrays of any integer dtype,
0 = background. Instances are matched one-to-one by IoU with the Hungarian algorithm (maximising
the summed IoU of pairs); a pair counts as a true positive when its IoU >= the threshold, as in
``stardist.matching``. Overlaps are counted with a sparse contingency table (``np.unique`` on
the paired ids), so the cost is O(pixels + pairs).

>>> import numpy as np
>>> gt = np.array([[1, 1, 0, 2, 2],
...                [1, 1, 0, 2, 2]])
>>> pred = np.array([[3, 3, 0, 0, 4],
...                  [3, 3, 0, 0, 4]])
>>> m = instance_metrics(pred, gt)
>>> m["tp"], m["fp"], m["fn"], m["f1"], round(m["pq"], 4)
(2, 0, 0, 1.0, 0.75)
>>> m75 = match_instances(pred, gt, thresh=0.75)
>>> m75.tp, m75.fp, m75.fn
(1, 1, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["per_slice_truth", "count_objects", "Matching", "iou_table", "match_instances",
           "instance_metrics", "fg_iou",
           "slice_metrics", "headline_scores"]


@dataclass(frozen=True)
class Matching:
    """Result of a one-to-one matching of predicted to ground-truth instances.

    Attributes
    ----------
    thresh : float
        IoU threshold a matched pair must reach to count.
    tp, fp, fn : int
        True positives (matched pairs), unmatched predictions, unmatched ground-truth objects.
    pred_ids, gt_ids : (tp,) int64
        Ids of the matched pairs.
    ious : (tp,) float64
        IoU of each matched pair.
    """

    thresh: float
    tp: int
    fp: int
    fn: int
    pred_ids: np.ndarray
    gt_ids: np.ndarray
    ious: np.ndarray

    @property
    def precision(self) -> float:
        """TP / (TP + FP), 0 when nothing was predicted."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN), 0 when there is no ground truth."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); 1 when both images are empty."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    @property
    def pq(self) -> float:
        """Panoptic quality: sum of matched IoUs / (TP + FP/2 + FN/2); 1 when both are empty."""
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return float(self.ious.sum()) / denom if denom else 1.0


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    for name, a in (("pred", pred), ("gt", gt)):
        if a.dtype.kind not in "iub":
            raise ValueError(f"{name} must be an integer label array, got dtype {a.dtype}")
        if a.dtype.kind == "i" and a.size and a.min() < 0:
            raise ValueError(f"{name} has negative labels (min {a.min()})")
    return pred, gt


def iou_table(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse IoU of every overlapping (pred, gt) instance pair.

    Parameters
    ----------
    pred, gt : (...) integer arrays of the same shape
        Label images, 0 = background.

    Returns
    -------
    pred_ids : (P,) int64
        Non-zero predicted ids, ascending (uint64 when the ids go beyond int64).
    gt_ids : (G,) int64
        Non-zero ground-truth ids, ascending (uint64 likewise).
    iou : (P, G) float64
        IoU of each pair (0 where they do not overlap).

    >>> p, g, iou = iou_table(np.array([[1, 1, 2]]), np.array([[5, 0, 5]]))
    >>> p.tolist(), g.tolist(), iou.round(3).tolist()
    ([1, 2], [5], [[0.333], [0.5]])
    """
    pred, gt = _check_pair(pred, gt)
    p, g = pred.ravel(), gt.ravel()
    pred_ids, p_area, p_lut = _compact(p)
    gt_ids, g_area, g_lut = _compact(g)
    both = (p != 0) & (g != 0)
    pi = p_lut(p[both])
    gi = g_lut(g[both])
    iou = np.zeros((pred_ids.size, gt_ids.size), np.float64)
    if pi.size:
        n_pairs = pred_ids.size * gt_ids.size
        if n_pairs <= 1 << 24:  # dense count table: O(pixels), no sort
            inter = np.bincount(pi * gt_ids.size + gi, minlength=n_pairs).reshape(pred_ids.size,
                                                                                   gt_ids.size)
            nz = np.nonzero(inter)
            pi, gi, inter = nz[0], nz[1], inter[nz]
        else:
            pairs, inter = np.unique(pi * gt_ids.size + gi, return_counts=True)
            pi, gi = np.divmod(pairs, gt_ids.size)
        iou[pi, gi] = inter / (p_area[pi] + g_area[gi] - inter)
    return pred_ids, gt_ids, iou


def _compact(labels: np.ndarray):
    """Non-zero ids (ascending), their areas, and a function mapping labels to 0..K-1.

    Ids up to 2**26 are counted over their range; larger ones (uint64 ids of 2**63 and
    beyond included, kept unsigned: as int64 they would turn negative) are sorted.

    >>> ids, area, lut = _compact(np.array([0, 2**63 + 5, 7, 2**63 + 5], np.uint64))
    >>> ids.tolist(), area.tolist(), lut(np.array([7, 2**63 + 5], np.uint64)).tolist()
    ([7, 9223372036854775813], [1, 2], [0, 1])
    """
    top = int(labels.max()) if labels.size else 0
    if top < 1 << 26:  # bincount over the id range: O(pixels)
        area = np.bincount(labels.astype(np.int64, copy=False).ravel(), minlength=top + 1)
        area[0] = 0
        ids = np.flatnonzero(area)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(ids.size)
        return ids.astype(np.int64), area[ids], lambda v: lut[v.astype(np.int64, copy=False)]
    # sorting the non-zero ids in their own dtype (only they are copied)
    lab = labels if labels.dtype.kind in "iu" else labels.astype(np.int64)
    ids, area = np.unique(lab[lab != 0], return_counts=True)
    if ids.dtype.kind == "i" or ids[-1] <= np.iinfo(np.int64).max:
        ids = ids.astype(np.int64)
    return ids, area, lambda v: np.searchsorted(ids, v)


def match_instances(pred: np.ndarray, gt: np.ndarray, thresh: float = 0.5) -> Matching:
    """Match predicted to ground-truth instances one-to-one by IoU.

    Parameters
    ----------
    pred, gt : (...) integer arrays of the same shape (2D (Y, X) or 3D (Z, Y, X))
        Label images, 0 = background.
    thresh : float
        A matched pair counts as a true positive when its IoU >= ``thresh``.

    Returns
    -------
    Matching
        Counts, matched ids and IoUs; ``precision``, ``recall``, ``f1`` and ``pq`` properties.

    >>> m = match_instances(np.array([[1, 1, 0]]), np.array([[0, 2, 2]]), thresh=0.3)
    >>> m.tp, m.fp, m.fn, round(m.f1, 3)
    (1, 0, 0, 1.0)
    """
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"thresh must be in (0, 1], got {thresh}")
    return _match(*iou_table(pred, gt), thresh)


def _match(pred_ids: np.ndarray, gt_ids: np.ndarray, iou: np.ndarray, thresh: float) -> Matching:
    empty = np.zeros(0, np.int64)
    if iou.size == 0:
        return Matching(thresh, 0, pred_ids.size, gt_ids.size, empty, empty, np.zeros(0))
    # Only pairs that can count are worth matching; this keeps the assignment optimal for TPs.
    score = np.where(iou >= thresh, iou, 0.0)
    rows, cols = linear_sum_assignment(score, maximize=True)
    ok = score[rows, cols] >= thresh
    rows, cols = rows[ok], cols[ok]
    tp = int(rows.size)
    return Matching(thresh, tp, pred_ids.size - tp, gt_ids.size - tp,
                    pred_ids[rows], gt_ids[cols], iou[rows, cols])


def fg_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of the foreground (non-zero) of two label or mask arrays; 1 when both are empty.

    >>> fg_iou(np.array([1, 1, 0, 0]), np.array([0, 3, 3, 0]))
    0.3333333333333333
    """
    pred, gt = _check_pair(pred, gt)
    a, b = pred != 0, gt != 0
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def _check_threshold(t: float) -> None:
    if not 0.0 < t <= 1.0:
        raise ValueError(f"thresholds must be in (0, 1], got {t}")


def _summarise(out: dict, m: Matching, first: bool) -> None:
    """Add one threshold's numbers to a metrics dict (unsuffixed keys for the first one)."""
    if first:
        out.update(tp=m.tp, fp=m.fp, fn=m.fn, precision=m.precision, recall=m.recall,
                   f1=m.f1, pq=m.pq)
    out[f"f1@{m.thresh:g}"] = m.f1


def instance_metrics(pred: np.ndarray, gt: np.ndarray,
                     thresholds: tuple[float, ...] = (0.5, 0.75)) -> dict:
    """Foreground IoU and instance metrics of ``pred`` against ``gt``.

    Parameters
    ----------
    pred, gt : (...) integer arrays of the same shape
        Label images, 0 = background.
    thresholds : tuple of float
        IoU thresholds; the first one gives the unsuffixed keys.

    Returns
    -------
    dict
        ``fg_iou``; for the first threshold ``tp``, ``fp``, ``fn``, ``precision``, ``recall``,
        ``f1``, ``pq`` (panoptic quality at that threshold); for every threshold ``t``
        ``f1@t`` (e.g. ``"f1@0.75"``).
    """
    out: dict = {"fg_iou": fg_iou(pred, gt)}
    table = iou_table(pred, gt)
    for i, t in enumerate(thresholds):
        _check_threshold(t)
        _summarise(out, _match(*table, t), i == 0)
    return out


def slice_metrics(pred, gt, thresholds: tuple[float, ...] = (0.5, 0.75)) -> dict:
    """2D metrics of a set of slices, pooled over the slices (a 2D benchmark's numbers).

    Each slice's objects are matched on their own; true positives, false positives, false
    negatives and matched IoUs are summed over slices before F1 and PQ are computed, and the
    foreground IoU is that of all slices together (so empty slices weigh nothing).

    Parameters
    ----------
    pred, gt : (N, H, W) integer arrays, or sequences of N 2D arrays (sizes may differ
        between slices; each pair must match)
        Label images per slice, 0 = background (ids need not be unique across slices).
    thresholds : tuple of float
        IoU thresholds; the first one gives the unsuffixed keys.

    Returns
    -------
    dict
        The keys of :func:`instance_metrics` plus ``pq@t`` for every threshold and ``slices``.

    >>> gt = np.array([[[1, 1, 0]], [[0, 2, 2]]])
    >>> pred = np.array([[[5, 5, 0]], [[0, 0, 0]]])
    >>> m = slice_metrics(pred, gt)
    >>> m["tp"], m["fn"], round(m["f1"], 3), round(m["fg_iou"], 3)
    (1, 1, 0.667, 0.5)
    >>> slice_metrics([np.ones((2, 3), int), np.ones((4, 1), int)],
    ...               [np.ones((2, 3), int), np.zeros((4, 1), int)])["fg_iou"]
    0.6
    """
    if len(pred) != len(gt):
        raise ValueError(f"pred has {len(pred)} slices and gt {len(gt)}; they must pair up")
    pairs = [_check_pair(p, g) for p, g in zip(pred, gt)]
    if any(p.ndim != 2 for p, _ in pairs):
        raise ValueError("slice_metrics needs (N, H, W) stacks or sequences of 2D slices, got "
                         f"slices of {sorted({p.ndim for p, _ in pairs})} dimensions")
    inter = sum(int(np.count_nonzero((p != 0) & (g != 0))) for p, g in pairs)
    union = sum(int(np.count_nonzero((p != 0) | (g != 0))) for p, g in pairs)
    out: dict = {"fg_iou": inter / union if union else 1.0, "slices": len(pairs)}
    tables = [iou_table(p, g) for p, g in pairs]
    empty = np.zeros(0, np.int64)
    for i, t in enumerate(thresholds):
        _check_threshold(t)
        ms = [_match(*table, t) for table in tables]
        pooled = Matching(t, sum(m.tp for m in ms), sum(m.fp for m in ms),
                          sum(m.fn for m in ms), empty, empty,
                          np.concatenate([m.ious for m in ms]) if ms else np.zeros(0))
        _summarise(out, pooled, i == 0)
        out[f"pq@{t:g}"] = pooled.pq
    return out


def headline_scores(pred: np.ndarray, gt: np.ndarray) -> dict:
    """F1@0.5, PQ and foreground IoU of :func:`instance_metrics` as plain floats (what the
    app shows live against ground truth).

    >>> headline_scores(np.array([[1, 1, 0]]), np.array([[2, 2, 0]]))
    {'f1': 1.0, 'pq': 1.0, 'fg_iou': 1.0}
    """
    m = instance_metrics(np.asarray(pred), np.asarray(gt))
    return {"f1": float(m["f1"]), "pq": float(m["pq"]), "fg_iou": float(m["fg_iou"])}


def per_slice_truth(gt: np.ndarray) -> str | None:
    """Why a 3D label stack looks like per-slice (2D) ground truth, or None.

    Per-slice labels (a batch of 2D images, or serial sections labelled slice by slice) score
    near zero in 3D: each 2D object is matched against 3D objects. They show in three ways:
    every object is one slice thick; each slice is numbered 1..n on its own (n varying from
    slice to slice, far fewer ids than objects); or an id marks unrelated objects in
    neighbouring slices (masks that barely overlap, where a 3D object's do).

    >>> one = np.zeros((3, 4, 4), int); one[0, :2, :2] = 1; one[1, 2:, 2:] = 2; one[2, :2, 2:] = 3
    >>> per_slice_truth(one)
    'every object is one slice thick'
    >>> restart = np.zeros((3, 8, 8), int)
    >>> restart[0, :2, :2] = 1; restart[1, 5:, 5:] = 1; restart[2, :2, 5:] = 1
    >>> per_slice_truth(restart)
    'ids restart in each slice (an id marks other objects from slice to slice)'
    >>> numbered = np.zeros((3, 8, 8), int); numbered[:, :3, :3] = 1; numbered[1:, 5:, 5:] = 2
    >>> per_slice_truth(numbered), per_slice_truth(numbered * 7)  # 1..n in each slice
    ('ids restart in each slice (an id marks other objects from slice to slice)', None)
    >>> ball = np.zeros((3, 8, 8), int); ball[:, 2:6, 2:6] = 1
    >>> per_slice_truth(ball) is None
    True
    """
    gt = np.asarray(gt)
    if gt.ndim != 3 or gt.shape[0] < 2:
        return None
    ids_per_slice = [np.unique(z[z != 0]) for z in gt]
    counts = np.unique(np.concatenate(ids_per_slice), return_counts=True)[1] \
        if any(i.size for i in ids_per_slice) else np.zeros(0)
    if counts.size and counts.max() == 1:
        return "every object is one slice thick"
    restart = "ids restart in each slice (an id marks other objects from slice to slice)"
    # per-slice numbering (connected components slice by slice): each slice's ids are 1..n,
    # n varying with the slice, far fewer ids than objects over the slices
    sizes = [i.size for i in ids_per_slice if i.size]
    numbered = sum(bool(i.size) and i[0] == 1 and i[-1] == i.size for i in ids_per_slice)
    if (sizes and numbered >= 0.8 * len(sizes) and len(set(sizes)) > 1
            and sum(sizes) >= 1.5 * counts.size):
        return restart
    # ids in two neighbouring slices whose masks barely overlap: unrelated objects
    ious = []
    for a, b in zip(gt[:-1], gt[1:]):
        shared = np.intersect1d(np.unique(a[a != 0]), np.unique(b[b != 0]))
        for i in shared[:200]:  # a sample is enough
            ma, mb = a == i, b == i
            ious.append(np.count_nonzero(ma & mb) / np.count_nonzero(ma | mb))
    if len(ious) >= 2 and float(np.median(ious)) < 0.1:
        return restart
    return None


def count_objects(gt: np.ndarray, per_slice: bool = False) -> int:
    """Objects a score counts: distinct non-zero ids, or (``per_slice``) their sum over slices.

    >>> count_objects(np.array([[[1, 2]], [[1, 0]]])), count_objects(np.array([[[1, 2]], [[1, 0]]]), True)
    (2, 3)
    """
    gt = np.asarray(gt)
    if per_slice:
        return int(sum(np.count_nonzero(np.unique(z)) for z in gt))
    return int(np.count_nonzero(np.unique(gt)))
