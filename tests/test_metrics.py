"""Tests of nbapp.metrics on literal label arrays with hand-computed answers."""

import numpy as np
import pytest

from nbapp.metrics import fg_iou, instance_metrics, iou_table, match_instances


def test_identical_labels_are_perfect():
    lab = np.array([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 0], [3, 3, 3, 0]])
    m = instance_metrics(lab * 7, lab)  # ids differ, objects identical
    assert m["tp"] == 3 and m["fp"] == 0 and m["fn"] == 0
    assert m["f1"] == m["f1@0.75"] == m["pq"] == m["fg_iou"] == 1.0


def test_hand_computed_pair():
    gt = np.array([[1, 1, 1, 1, 0, 2, 2]])
    pred = np.array([[5, 5, 5, 0, 0, 6, 0]])
    # 5-1: 3/4 = 0.75; 6-2: 1/2 = 0.5
    p, g, iou = iou_table(pred, gt)
    assert p.tolist() == [5, 6] and g.tolist() == [1, 2]
    np.testing.assert_allclose(iou, [[0.75, 0.0], [0.0, 0.5]])
    m = instance_metrics(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["pq"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["f1@0.75"] == pytest.approx(0.5)
    assert m["fg_iou"] == pytest.approx(4 / 6)


def test_one_to_one_split_and_merge():
    gt = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    merged = np.array([[9, 9, 9, 9, 9, 9, 9, 9]])  # one prediction over two objects: IoU 0.5 each
    m = match_instances(merged, gt, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert m.precision == 1.0 and m.recall == 0.5 and m.f1 == pytest.approx(2 / 3)
    m = match_instances(merged, gt, 0.6)
    assert (m.tp, m.fp, m.fn) == (0, 1, 2) and m.f1 == 0.0


def test_hungarian_beats_greedy():
    # pred 1 covers 6 px of gt 1 and 3 px of gt 2; pred 2 covers the other 4 px of gt 1.
    # IoU(1, 1) = 6/13, IoU(1, 2) = 3/16, IoU(2, 1) = 4/10. Greedy takes (1, 1) and leaves
    # pred 2 unmatched; the optimal one-to-one assignment at thresh 0.15 finds two pairs.
    gt = np.array([[1] * 10 + [2] * 10])
    pred = np.array([[2] * 4 + [1] * 9 + [0] * 7])
    m = match_instances(pred, gt, 0.15)
    assert m.tp == 2
    assert sorted(zip(m.pred_ids.tolist(), m.gt_ids.tolist())) == [(1, 2), (2, 1)]
    np.testing.assert_allclose(sorted(m.ious), [3 / 16, 4 / 10])
    assert match_instances(pred, gt, 0.5).tp == 0


def test_3d_and_empty():
    gt = np.zeros((2, 3, 3), np.uint16)
    gt[:, :2, :2] = 4
    pred = np.zeros((2, 3, 3), np.int64)
    pred[0, :2, :2] = 1
    m = instance_metrics(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0) and m["pq"] == pytest.approx(0.5)
    empty = np.zeros((2, 3, 3), np.int32)
    assert match_instances(empty, empty).f1 == 1.0
    assert fg_iou(empty, empty) == 1.0
    m = match_instances(empty, gt)
    assert (m.tp, m.fp, m.fn, m.f1) == (0, 0, 1, 0.0)


def test_agrees_with_brute_force_on_random_labels():
    rng = np.random.default_rng(0)
    for _ in range(5):
        gt = rng.integers(0, 5, (12, 12))
        pred = rng.integers(0, 4, (12, 12))
        _, _, iou = iou_table(pred, gt)
        for i, a in enumerate(np.unique(pred[pred > 0])):
            for j, b in enumerate(np.unique(gt[gt > 0])):
                inter = np.sum((pred == a) & (gt == b))
                union = np.sum((pred == a) | (gt == b))
                assert iou[i, j] == pytest.approx(inter / union)


@pytest.mark.parametrize(
    "pred, gt, thresh, match",
    [
        (np.zeros((2, 2)), np.zeros((2, 2), int), 0.5, "integer label"),
        (np.zeros((2, 2), int), np.zeros((3, 2), int), 0.5, "same shape"),
        (-np.ones((2, 2), int), np.zeros((2, 2), int), 0.5, "negative"),
        (np.zeros((2, 2), int), np.zeros((2, 2), int), 0.0, "thresh"),
    ],
)
def test_validation_errors(pred, gt, thresh, match):
    with pytest.raises(ValueError, match=match):
        match_instances(pred, gt, thresh)


@pytest.mark.parametrize("seed", range(6))
def test_against_stardist(seed):
    """Counts, F1 and panoptic quality equal stardist.matching's (a maintained reference),
    2D and 3D, on overlapping random label images."""
    matching = pytest.importorskip("stardist.matching")
    from nbapp.metrics import instance_metrics

    rng = np.random.default_rng(seed)
    shape = (6, 6) if seed % 2 else (3, 5, 5)
    gt = np.kron(rng.integers(0, 9, shape), np.ones((4,) * len(shape), int))
    pred = np.roll(gt, int(rng.integers(1, 3)), axis=-1) * (rng.random(gt.shape) > 0.1)
    pred[pred == 3] = 0  # a missed object
    for t in (0.5, 0.75):
        ref = matching.matching(gt, pred, thresh=t)
        m = match_instances(pred, gt, t)
        assert (m.tp, m.fp, m.fn) == (ref.tp, ref.fp, ref.fn)
        assert m.f1 == pytest.approx(ref.f1)
        assert m.pq == pytest.approx(ref.panoptic_quality)
        res = instance_metrics(pred, gt, thresholds=(t,))
        assert res["f1"] == pytest.approx(ref.f1) and res["pq"] == pytest.approx(ref.panoptic_quality)
        assert (res["precision"], res["recall"]) == pytest.approx((ref.precision, ref.recall))


def test_bad_thresholds_in_instance_metrics():
    from nbapp.metrics import instance_metrics

    a = np.array([[1, 0]])
    with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
        instance_metrics(a, a, thresholds=(0.5, 0.0))


def test_large_ids_use_the_sparse_path():
    from nbapp.metrics import instance_metrics

    a = np.array([[2**40, 0, 7]], np.int64)
    b = np.array([[3, 0, 2**41]], np.int64)
    m = instance_metrics(a, b)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)


def test_slice_metrics_pools_counts_and_ious_over_slices():
    from nbapp.metrics import slice_metrics

    rng = np.random.default_rng(3)
    gt = np.stack([np.kron(rng.integers(0, 5, (4, 4)), np.ones((3, 3), int)) for _ in range(3)])
    pred = np.roll(gt, 1, axis=-1) * (rng.random(gt.shape) > 0.05)
    res = slice_metrics(pred, gt)
    for t in (0.5, 0.75):
        ms = [match_instances(p, g, t) for p, g in zip(pred, gt)]
        tp, fp, fn = (sum(getattr(m, k) for m in ms) for k in ("tp", "fp", "fn"))
        ious = sum(float(m.ious.sum()) for m in ms)
        assert res[f"f1@{t:g}"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert res[f"pq@{t:g}"] == pytest.approx(ious / (tp + 0.5 * (fp + fn)))
        if t == 0.5:
            assert (res["tp"], res["fp"], res["fn"]) == (tp, fp, fn)
            assert res["recall"] == pytest.approx(tp / (tp + fn))
    assert res["fg_iou"] == pytest.approx(np.mean((pred > 0) & (gt > 0)) / np.mean((pred > 0) | (gt > 0)))
    assert res["slices"] == 3
    # a list of slices of different sizes gives the same as pooling them by hand
    sizes = slice_metrics([pred[0], pred[1][:5]], [gt[0], gt[1][:5]])
    assert sizes["slices"] == 2 and 0 < sizes["f1"] <= 1


@pytest.mark.parametrize("pred, gt, match", [
    (np.zeros((2, 3, 3), int), np.zeros((3, 3, 3), int), "must pair up"),
    (np.zeros((3, 3), int), np.zeros((3, 3), int), "2D slices"),
    (np.zeros((2, 3, 3), int), np.zeros((2, 3, 4), int), "shape"),
])
def test_slice_metrics_errors(pred, gt, match):
    from nbapp.metrics import slice_metrics

    with pytest.raises(ValueError, match=match):
        slice_metrics(pred, gt)


def test_slice_metrics_rejects_bad_thresholds():
    from nbapp.metrics import slice_metrics

    with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
        slice_metrics(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), thresholds=(1.5,))


BIG = 2**63
#: uint64 labels with ids of 2**63 and beyond (as int64 they were negative: a raw ValueError).
#: gt: A = BIG+1 (4 px), B = BIG+2 (4 px), C = BIG+3 (2 px). pred: 2**64-1 is A exactly,
#: 7 covers half of B (IoU 0.5), BIG+9 overlaps nothing; C is missed.
GT64 = np.array([[BIG + 1, BIG + 1, 0, BIG + 2, BIG + 2],
                 [BIG + 1, BIG + 1, 0, BIG + 2, BIG + 2],
                 [0, 0, 0, 0, 0],
                 [BIG + 3, BIG + 3, 0, 0, 0]], np.uint64)
PRED64 = np.array([[2**64 - 1, 2**64 - 1, 0, 0, 0],
                   [2**64 - 1, 2**64 - 1, 0, 7, 7],
                   [0, 0, 0, 0, 0],
                   [0, 0, 0, 0, BIG + 9]], np.uint64)


def test_uint64_ids_beyond_int64_are_scored():
    m = instance_metrics(PRED64, GT64)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["f1"] == pytest.approx(4 / 6) and m["f1@0.75"] == pytest.approx(2 / 6)
    assert m["pq"] == pytest.approx((1.0 + 0.5) / 3)
    assert m["fg_iou"] == pytest.approx(6 / 11)
    # the same objects under small ids score the same
    small = {int(v): i for i, v in enumerate(np.unique(np.concatenate([GT64, PRED64])))}
    relabel = np.vectorize(lambda v: small[int(v)])
    assert instance_metrics(relabel(PRED64), relabel(GT64)) == m
    # and the matched ids are the real ones
    match = match_instances(PRED64, GT64)
    assert sorted(zip(match.pred_ids.tolist(), match.gt_ids.tolist())) == [
        (7, BIG + 2), (2**64 - 1, BIG + 1)]


@pytest.mark.parametrize("parts, expect", [
    (("vnc_sstem", "mito_instances_2d_cc.tif"), "one slice thick"),
    (("sbem_cdeep3m_train", "mito_instances_2d_cc.tif"), "ids restart"),
    (("urocell_mito_labels", "mito_instance_fib1-0-0-0.tif"), None),
])
def test_per_slice_truth_on_real_labels(parts, expect):
    """Issue 30 item 5 on three labs' labels: per-slice components of two serial-section
    stacks, and true 3D instances."""
    import tifffile

    from models import data_path
    from nbapp.metrics import per_slice_truth

    why = per_slice_truth(tifffile.imread(data_path(*parts)))
    assert (why is None) if expect is None else (expect in why)
