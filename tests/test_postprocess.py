"""Post-processing: literal arrays, the label round trip, hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from models import data_path, disks
from hypothesis import given, settings
from hypothesis import strategies as st
from models import dense_labels, f1_score, ideal_heads
from scipy import ndimage as ndi

import nbapp.postprocess as pp
from nbapp import LabelOverflowError, SliceParams
from nbapp.heads import Heads

# ---------------------------------------------------------------- step by step, literal arrays


def test_semantic_threshold_is_inclusive_and_argmax_for_many_classes():
    p = np.array([[[0.49, 0.5, 0.51]]], np.float32)
    assert pp.semantic_classes(p, 0.5).tolist() == [[0, 1, 1]]
    multi = np.array([[[0.6, 0.1]], [[0.3, 0.2]], [[0.1, 0.7]]], np.float32)
    assert pp.semantic_classes(multi, 0.9).tolist() == [[0, 2]]


def test_semantic_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        pp.semantic_classes(np.zeros((4, 4)), 0.5)


def test_centre_threshold_is_strict():
    h = np.zeros((7, 7), np.float32)
    h[1, 1], h[5, 5] = 0.1, 0.1000001
    assert pp.find_centres(h, 0.1, 3).tolist() == [[5, 5]]


def test_nms_window_and_disabling():
    h = np.zeros((1, 9), np.float32)
    h[0, [1, 3, 7]] = [0.9, 0.8, 0.5]
    assert pp.find_centres(h, 0.1, 3).tolist() == [[0, 1], [0, 3], [0, 7]]
    assert pp.find_centres(h, 0.1, 5).tolist() == [[0, 1], [0, 7]]
    assert pp.find_centres(h, 0.1, 1).tolist() == [[0, 1], [0, 3], [0, 7]]
    # even windows work too (no shape errors): 4 covers columns x-2..x+1
    assert pp.find_centres(h, 0.1, 4).tolist() == [[0, 1], [0, 7]]


def test_no_centres_gives_no_instances():
    heads = Heads(np.ones((1, 8, 8), np.float32), np.zeros((2, 2), np.float32),
                  np.zeros((2, 2, 2), np.float32), 1, 4)
    assert not pp.segment_heads(heads, SliceParams()).any()


def test_grouping_nearest_centre_and_ties_go_to_lowest_index():
    off = np.zeros((2, 1, 5), np.float32)
    centres = np.array([[0, 0], [0, 4]])
    assert pp.group_pixels(centres, off, 1).tolist() == [[1, 1, 1, 2, 2]]  # x=2 is a tie -> 1
    off[1, 0, 2] = 1.5  # now x=2 points at 3.5: nearer the second centre
    assert pp.group_pixels(centres, off, 1).tolist() == [[1, 1, 2, 2, 2]]


def test_grouping_uses_grid_step_and_mask():
    off = np.zeros((2, 2, 2), np.float32)
    off[1, :, 1] = -4.0  # cells at column 1 (input x=4) point to x=0
    mask = np.array([[True, True], [False, True]])
    got = pp.group_pixels(np.array([[0, 0], [1, 1]]), off, grid_step=4, mask=mask)
    assert got.tolist() == [[1, 1], [0, 1]]


def test_cells_with_foreground_and_upsampling_round_trip():
    m = np.zeros((10, 13), bool)
    m[9, 12] = True
    m[0, 0] = True
    cells = pp.cells_with_foreground(m, (3, 4), 4)
    assert np.argwhere(cells).tolist() == [[0, 0], [2, 3]]
    up = pp.upsample_cells(np.arange(12).reshape(3, 4), (10, 13), 4)
    assert up.shape == (10, 13) and up[9, 12] == 11 and up[3, 3] == 0 and up[4, 4] == 5


def test_disconnected_instance_becomes_two_objects_in_raster_order():
    sem = np.array([[1, 1, 0, 1, 1]], np.uint8)
    inst = np.array([[3, 3, 0, 3, 3]])
    assert pp.panoptic_from_instances(sem, inst, (1,), 10).tolist() == [[11, 11, 0, 12, 12]]


def test_numbering_follows_first_pixel_not_centre_order():
    sem = np.ones((2, 3), np.uint8)
    inst = np.array([[2, 2, 1], [2, 2, 1]])
    assert pp.panoptic_from_instances(sem, inst, (1,), 1000).tolist() == [
        [1001, 1001, 1002], [1001, 1001, 1002]]


def test_label_divisor_zero_numbers_all_objects():
    sem = np.array([[1, 0, 2, 0, 1]], np.uint8)
    inst = np.array([[1, 0, 2, 0, 3]])
    assert pp.panoptic_from_instances(sem, inst, (1, 2), 0).tolist() == [[1, 0, 2, 0, 3]]


def test_instance_class_is_the_majority_and_stuff_needs_area():
    sem = np.zeros((10, 20), np.uint8)
    sem[:, :8] = 1
    sem[0, 7] = 2  # one pixel of class 2 inside the class-1 instance
    sem[:, 10:] = 3  # stuff, 100 px
    inst = np.zeros((10, 20), np.int32)
    inst[:, :8] = 1
    out = pp.panoptic_from_instances(sem, inst, (1, 2), 100)
    assert set(np.unique(out[:, :8])) == {101}
    assert set(np.unique(out[:, 10:])) == {300}
    small = sem.copy()
    small[:, 12:] = 0  # stuff region of 20 px < STUFF_AREA
    assert not pp.panoptic_from_instances(small, inst, (1, 2), 100)[:, 10:].any()


def test_label_overflow_names_class_count_and_divisor():
    sem = np.ones((1, 7), np.uint8)
    inst = np.array([[1, 0, 2, 0, 3, 0, 4]])
    sem[inst == 0] = 0
    with pytest.raises(LabelOverflowError, match=r"class 1 has 4 instances.*label_divisor.* is 4"):
        pp.panoptic_from_instances(sem, inst, (1,), 4)
    assert pp.panoptic_from_instances(sem, inst, (1,), 5).max() == 9


def test_int32_overflow_is_an_error():
    with pytest.raises(LabelOverflowError, match="int32"):
        pp.semantic_labels(np.array([[3]], np.uint8), 2**30)


def test_sliver_fragment_joins_the_instance_it_touches_most():
    # instance 2 owns a big block on the right and a thin sliver inside instance 1
    inst = np.zeros((8, 12), np.int32)
    inst[:, :6] = 1
    inst[:, 7:] = 2
    inst[2:6, 4] = 2  # sliver: touches only instance 1
    sem = (inst > 0).astype(np.uint8)
    out = pp.panoptic_from_instances(sem, inst, (1,), 100)
    assert len(np.unique(out[out > 0])) == 2
    assert (out[2:6, 4] == out[0, 0]).all()


def test_isolated_piece_stays_its_own_object():
    inst = np.zeros((8, 12), np.int32)
    inst[:, :4] = 1
    inst[0:2, 8:10] = 1  # far away, touches nothing: a real separate object
    sem = (inst > 0).astype(np.uint8)
    out = pp.panoptic_from_instances(sem, inst, (1,), 100)
    assert sorted(np.unique(out[out > 0])) == [101, 102]


def test_fill_holes_only_fills_background_of_the_instance():
    lab = np.zeros((9, 9), np.int32)
    lab[1:8, 1:8] = 5
    lab[3:6, 3:6] = 0  # hole
    lab[4, 4] = 7  # another object inside the hole keeps its label
    lab[0:3, 7:9] = 9  # a neighbour inside 5's bounding box is not relabelled (reference bug)
    out = pp.fill_instance_holes(lab)
    assert out[4, 4] == 7 and out[3, 3] == 5 and out[5, 5] == 5
    assert (out[0:3, 7:9] == 9).all() or (out[lab == 9] == 9).all()
    assert (out[lab == 9] == 9).all()
    assert pp.fill_instance_holes(np.zeros((3, 3), np.int32)).sum() == 0


def test_semantic_only_output():
    heads = ideal_heads(disks(), coarse=True)
    out = pp.segment_heads(heads, SliceParams(semantic_only=True, label_divisor=1000))
    assert set(np.unique(out)) == {0, 1000}
    out0 = pp.segment_heads(heads, SliceParams(semantic_only=True, label_divisor=0))
    assert set(np.unique(out0)) == {0, 1}


# ---------------------------------------------------------------- round trip: labels -> heads -> labels


@pytest.mark.parametrize("coarse", [False, True], ids=["fine", "coarse"])
def test_round_trip_synthetic_disks(coarse):
    lab = disks()
    out = pp.segment_heads(ideal_heads(lab, coarse), SliceParams(label_divisor=100))
    assert f1_score(out, lab, 0.9) == 1.0
    assert set(np.unique(out)) == {0, 101, 102, 103}


@pytest.mark.parametrize("coarse", [False, True], ids=["fine", "coarse"])
def test_round_trip_dense_touching_objects(coarse):
    scores = [f1_score(pp.segment_heads(ideal_heads(dense_labels(seed=s), coarse)), dense_labels(seed=s))
              for s in range(4)]
    assert np.mean(scores) >= (0.99 if not coarse else 0.95)


def test_coarse_sliver_fix_is_what_makes_dense_round_trip_work(monkeypatch):
    labs = [dense_labels(seed=s) for s in range(4)]
    fixed = np.mean([f1_score(pp.segment_heads(ideal_heads(lab, True)), lab) for lab in labs])
    monkeypatch.setattr(pp, "_fragment_merges", lambda comps, n, inst_of, min_area=0: np.arange(n + 1))
    raw = np.mean([f1_score(pp.segment_heads(ideal_heads(lab, True)), lab) for lab in labs])
    assert fixed > raw + 0.01


def _real_slices(path, zs):
    import tifffile
    from skimage.measure import label as cc

    vol = tifffile.imread(path)
    out = []
    for z in zs:
        lab = cc(vol[z], connectivity=1).astype(np.int32)
        h, w = (lab.shape[0] // 4) * 4, (lab.shape[1] // 4) * 4
        out.append(lab[:h, :w])
    return out


@pytest.mark.parametrize("name", ["urocell", "lucchi"])
@pytest.mark.parametrize("coarse", [False, True], ids=["fine", "coarse"])
def test_round_trip_real_labels(name, coarse):
    if name == "urocell":
        slices = _real_slices(data_path("urocell_mito_labels", "mito_instance_fib1-3-2-1.tif"),
                              range(20, 240, 40))
    else:
        slices = _real_slices(data_path("lucchi_pp_train", "train_mito_instances_3d_cc.tif"),
                              range(5, 165, 40))
    scores = [f1_score(pp.segment_heads(ideal_heads(lab, coarse)), lab) for lab in slices]
    assert np.mean(scores) >= (0.99 if not coarse else 0.95), scores


def test_downsampled_heads_map_back_to_original_size():
    lab = disks(shape=(96, 128))
    half = lab[::2, ::2]
    heads = ideal_heads(half, coarse=True)
    heads = Heads(np.kron(heads.sem, np.ones((1, 2, 2), np.float32)), heads.ctr, heads.offsets, 2, 4)
    out = pp.segment_heads(heads, SliceParams(downsampling=2))
    assert out.shape == lab.shape
    assert f1_score(out, lab, 0.8) == 1.0


# ---------------------------------------------------------------- properties


def _random_heads(seed: int, coarse: bool) -> Heads:
    rng = np.random.default_rng(seed)
    h, w = 32, 40
    sem = ndi.gaussian_filter(rng.random((h, w)), 2).astype(np.float32)
    sem = (sem - sem.min()) / (np.ptp(sem) + 1e-6)
    g = 4 if coarse else 1
    ctr = rng.random((h // g, w // g)).astype(np.float32)
    off = (rng.normal(0, 3, (2, h // g, w // g))).astype(np.float32)
    return Heads(sem[None], ctr, off, 1, g)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), coarse=st.booleans(), divisor=st.sampled_from([0, 2000, 10_000]),
       thr=st.floats(0.05, 0.9), dist=st.integers(1, 9))
def test_each_id_is_one_connected_object_in_its_class_range(seed, coarse, divisor, thr, dist):
    heads = _random_heads(seed, coarse)
    out = pp.segment_heads(heads, SliceParams(label_divisor=divisor, center_threshold=thr,
                                              min_distance=dist))
    ids = np.unique(out[out > 0])
    for i in ids:
        _, n = ndi.label(out == i, structure=np.ones((3, 3)))
        assert n == 1
    if divisor:
        assert ((ids > divisor) & (ids < 2 * divisor)).all()
    else:
        assert ids.tolist() == list(range(1, ids.size + 1))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t1=st.floats(0.1, 0.9), t2=st.floats(0.1, 0.9))
def test_foreground_area_is_monotone_in_seg_threshold(seed, t1, t2):
    heads = _random_heads(seed, True)
    lo, hi = sorted((t1, t2))
    a_lo = np.count_nonzero(pp.segment_heads(heads, SliceParams(seg_threshold=lo, semantic_only=True)))
    a_hi = np.count_nonzero(pp.segment_heads(heads, SliceParams(seg_threshold=hi, semantic_only=True)))
    assert a_hi <= a_lo


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), t1=st.floats(0.05, 0.9), t2=st.floats(0.05, 0.9))
def test_fewer_centres_with_higher_center_threshold(seed, t1, t2):
    ctr = _random_heads(seed, True).ctr
    lo, hi = sorted((t1, t2))
    assert len(pp.find_centres(ctr, hi, 3)) <= len(pp.find_centres(ctr, lo, 3))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_fill_holes_never_changes_labelled_pixels(seed):
    out = pp.segment_heads(_random_heads(seed, False), SliceParams())
    filled = pp.fill_instance_holes(out)
    assert (filled[out > 0] == out[out > 0]).all()
    assert np.count_nonzero(filled) >= np.count_nonzero(out)


def test_specks_below_the_grid_resolution_join_the_instance_they_touch():
    inst = np.zeros((20, 20), np.int32)
    inst[:, :12] = 1
    inst[5:9, 12:15] = 2  # a 12-pixel instance of its own, glued to instance 1
    inst[15:20, 16:20] = 3  # a 20-pixel instance touching nothing: a real small object
    sem = (inst > 0).astype(np.uint8)
    out = pp.panoptic_from_instances(sem, inst, (1,), 100, min_fragment=64)
    assert (out[5:9, 12:15] == out[0, 0]).all()
    assert len(np.unique(out[out > 0])) == 2
    kept = pp.panoptic_from_instances(sem, inst, (1,), 100, min_fragment=0)
    assert len(np.unique(kept[kept > 0])) == 3


def test_many_centres_use_the_kd_tree_with_the_same_answer():
    rng = np.random.default_rng(0)
    off = rng.normal(0, 2, (2, 30, 30)).astype(np.float32)
    centres = np.argwhere(rng.random((30, 30)) < 0.1)  # ~90 centres: the k-d tree path
    assert len(centres) > pp._KDTREE_MIN_CENTRES
    got = pp.group_pixels(centres, off, 4)
    ys, xs = np.indices((30, 30))
    py, px = ys * 4 + off[0], xs * 4 + off[1]
    d = (py[..., None] - centres[:, 0] * 4) ** 2 + (px[..., None] - centres[:, 1] * 4) ** 2
    np.testing.assert_array_equal(got, d.argmin(-1) + 1)
