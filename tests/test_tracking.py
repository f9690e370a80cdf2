"""Tracking and 3D filters: literal stacks, error paths, hypothesis properties, real 3D labels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from models import data_path
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from nbapp.errors import InputError, ParameterError
from nbapp.tracking import (
    filter_objects,
    match_to_previous,
    relabel_by_first_appearance,
    track_and_filter,
    track_stack,
    track_stack_steps,
)


def _stack(*slices) -> np.ndarray:
    return np.array(slices, dtype=np.int32)


def _partition(labels: np.ndarray) -> set:
    """The objects of a label array as a set of frozensets of flat voxel indices."""
    flat = labels.ravel()
    return {frozenset(np.flatnonzero(flat == i).tolist()) for i in np.unique(flat) if i != 0}


def _distinct_labels(labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.unique(labels)))


# ---------------------------------------------------------------------- one step, literal slices


def test_continuing_object_takes_previous_label_and_new_objects_count_up():
    prev = np.array([[5, 5, 5, 0, 0, 0]])
    curr = np.array([[1, 1, 0, 0, 2, 2]])
    lab, nxt = match_to_previous(prev, curr, next_label=9)
    assert lab.tolist() == [[5, 5, 0, 0, 9, 9]] and nxt == 10
    assert lab.dtype == np.int64


def test_new_labels_follow_ascending_current_ids():
    lab, nxt = match_to_previous(np.zeros((1, 4), int), np.array([[30, 0, 10, 20]]), 1)
    assert lab.tolist() == [[3, 0, 1, 2]] and nxt == 4


def test_without_new_labels_unmatched_objects_keep_their_ids():
    prev = np.array([[5, 5, 0, 0]])
    curr = np.array([[1, 1, 0, 7]])
    lab, nxt = match_to_previous(prev, curr, 100, allow_new=False)
    assert lab.tolist() == [[5, 5, 0, 7]] and nxt == 100


def test_iou_exactly_at_threshold_matches():
    prev = np.array([[5, 5, 0, 0]])
    curr = np.array([[0, 7, 7, 7]])  # intersection 1, union 4: IoU 0.25; IoA 1/3
    # ioa_threshold 1 switches the merge rule off here, so only the IoU rule can match
    lab, _ = match_to_previous(prev, curr, 9, iou_threshold=0.25, ioa_threshold=1.0)
    assert lab.tolist() == [[0, 5, 5, 5]]
    lab, _ = match_to_previous(prev, curr, 9, iou_threshold=0.26, ioa_threshold=1.0)
    assert lab.tolist() == [[0, 9, 9, 9]]


def test_ioa_exactly_at_threshold_merges():
    prev = np.array([[3, 3, 3, 3, 5, 0, 0, 0]])
    curr = np.array([[8, 8, 8, 8, 0, 0, 0, 0]])  # this one matches 3 (IoU 1)
    curr[0, 4:] = 6  # intersection with 5 covers 1 of its 4 pixels: IoA 0.25, IoU 0.25
    lab, _ = match_to_previous(prev, curr, 9, iou_threshold=1.0, ioa_threshold=0.25)
    assert lab.tolist() == [[3, 3, 3, 3, 5, 5, 5, 5]]
    lab, _ = match_to_previous(prev, curr, 9, iou_threshold=1.0, ioa_threshold=0.26)
    assert lab.tolist() == [[3, 3, 3, 3, 9, 9, 9, 9]]


def test_merge_rule_takes_the_largest_overlap_and_lowest_label_on_ties():
    prev = np.array([[4, 4, 4, 4, 2, 2, 3, 3]])
    curr = np.array([[1, 1, 1, 1, 7, 7, 7, 7]])  # 1 matches 4; 7 overlaps 2 and 3 equally
    lab, _ = match_to_previous(prev, curr, 9, iou_threshold=0.6)
    assert lab.tolist() == [[4, 4, 4, 4, 2, 2, 2, 2]]
    prev[0, 5] = 3  # now 3 overlaps 7 more than 2 does
    lab, _ = match_to_previous(prev, curr, 9, iou_threshold=0.6)
    assert lab.tolist() == [[4, 4, 4, 4, 3, 3, 3, 3]]


def test_hungarian_finds_the_global_best_pairing_where_greedy_would_not():
    # prev A = 0..9, B = 10..15; curr Y = 0..3, X = 4..13
    # IoU(A, X) = 6/14 = .43 is the single best pair, but A-Y (.40) + B-X (4/12 = .33) is
    # the best assignment: greedy would give X label A and leave Y without a match.
    prev = np.zeros((1, 16), int)
    prev[0, :10], prev[0, 10:] = 1, 2
    curr = np.zeros((1, 16), int)
    curr[0, :4], curr[0, 4:14] = 10, 20
    lab, nxt = match_to_previous(prev, curr, 3, ioa_threshold=1.0)
    assert lab[0, :4].tolist() == [1] * 4  # Y -> A
    assert lab[0, 4:14].tolist() == [2] * 10  # X -> B
    assert nxt == 3


def test_hungarian_on_several_overlap_groups_at_once():
    # two copies of the greedy trap side by side plus one isolated object
    prev = np.zeros((1, 40), int)
    curr = np.zeros((1, 40), int)
    for base, (a, b) in ((0, (1, 2)), (18, (3, 4))):
        prev[0, base : base + 10], prev[0, base + 10 : base + 16] = a, b
        curr[0, base : base + 4], curr[0, base + 4 : base + 14] = 10 + a, 20 + a
    prev[0, 36:39], curr[0, 36:40] = 5, 99
    lab, _ = match_to_previous(prev, curr, 6, ioa_threshold=1.0)
    assert lab[0, [0, 4, 18, 22, 36]].tolist() == [1, 2, 3, 4, 5]


def test_objects_that_do_not_overlap_never_match():
    prev = np.array([[1, 1, 0, 0, 0, 0]])
    curr = np.array([[0, 0, 0, 0, 4, 4]])
    lab, _ = match_to_previous(prev, curr, 2, iou_threshold=1e-9, ioa_threshold=1e-9)
    assert lab.tolist() == [[0, 0, 0, 0, 2, 2]]


def test_empty_slices():
    z = np.zeros((3, 4), int)
    lab, nxt = match_to_previous(z, z, 5)
    assert not lab.any() and nxt == 5
    lab, nxt = match_to_previous(np.ones((3, 4), int), z, 5)
    assert not lab.any() and nxt == 5


def test_bool_slices_are_one_object_each():
    lab, nxt = match_to_previous(np.ones((2, 2), bool), np.ones((2, 2), bool), 2)
    assert lab.tolist() == [[1, 1], [1, 1]] and nxt == 2


# ---------------------------------------------------------------------- stacks, literal shapes


def test_straight_object_keeps_one_label():
    block = np.zeros((6, 6), np.int32)
    block[1:4, 1:4] = 1
    stack = np.stack([block * (100 + z) for z in range(5)])
    stack[2, 1:4, 1:3] = 0  # a 3 x 1 strip in the middle: IoU 1/3 with its neighbours
    out = track_stack(stack)
    assert out.dtype == np.int32 and out.shape == stack.shape
    assert set(np.unique(out).tolist()) == {0, 1}
    assert np.array_equal(out > 0, stack > 0)


def test_object_missing_for_a_slice_comes_back_with_a_new_label():
    a = np.zeros((6, 6), np.int32)
    a[2:5, 2:5] = 7
    out = track_stack(np.stack([a, a, np.zeros_like(a), a]))
    assert [int(out[z].max()) for z in range(4)] == [1, 1, 0, 2]


def test_split_smaller_part_merges_when_inside_and_is_new_when_mostly_outside():
    whole = np.zeros((6, 6), np.int32)
    whole[1:5, 0:4] = 1  # 4 x 4
    split = np.zeros((6, 6), np.int32)
    split[1:5, 0:3] = 1  # 4 x 3: IoU 12/16 with the whole, keeps the label by IoU
    split[1:5, 3] = 2  # 4 x 1, entirely inside the previous object: IoA 1, merges
    out = track_stack(np.stack([whole, split]))
    assert set(np.unique(out).tolist()) == {0, 1}

    split[1:5, 3:6] = 2  # 4 x 3 but only 4 of its 12 pixels under the object: IoA 1/3 merges
    out = track_stack(np.stack([whole, split]))
    assert set(np.unique(out).tolist()) == {0, 1}

    split[:] = 0
    split[1:5, 0:3] = 1  # IoU 12/16: keeps the label
    split[0:6, 3:6] = 2  # 18 pixels, 4 of them under the object: IoA 4/18 < 0.25, IoU 4/30
    out = track_stack(np.stack([whole, split]))
    assert out[1, 1, 0] == 1 and out[1, 0, 5] == 2  # a new object
    assert out[0, 1, 0] == 1  # and the backward pass keeps the first slice with the left part


def test_y_shape_branches_end_with_one_label():
    # two branches for three slices, joined for the last two; forward gives them two labels
    stack = np.zeros((5, 6, 6), np.int32)
    stack[:3, 1:5, 0:2] = 11
    stack[:3, 1:5, 4:6] = 12
    stack[3:, 1:5, 0:6] = 21
    out = track_stack(stack)
    assert set(np.unique(out).tolist()) == {0, out[4, 1, 1]}
    assert np.array_equal(out > 0, stack > 0)


def test_y_shape_forward_pass_alone_keeps_two_labels():
    stack = np.zeros((5, 6, 6), np.int32)
    stack[:3, 1:5, 0:2] = 11
    stack[:3, 1:5, 4:6] = 12
    stack[3:, 1:5, 0:6] = 21
    labels = np.zeros_like(stack, dtype=np.int64)
    nxt = 1
    for z in range(5):
        labels[z], nxt = match_to_previous(labels[z - 1] if z else np.zeros((6, 6), int),
                                           stack[z], nxt)
    assert _distinct_labels(labels) == 2
    assert _distinct_labels(track_stack(stack)) == 1


def test_backward_merge_reaches_the_first_slice_through_a_long_branch():
    # branch B (right) lives in slices 0-5 and only touches A in slice 6
    stack = np.zeros((8, 6, 8), np.int32)
    stack[:, 1:5, 0:2] = 1
    stack[:6, 1:5, 5:8] = 2
    stack[6:, 1:5, 0:8] = 3
    out = track_stack(stack)
    assert _distinct_labels(out) == 1
    assert (out[0, 1:5, 5:8] == out[7, 2, 2]).all()


def test_backward_merge_of_a_later_join_inside_a_longer_object():
    # A runs through all slices; B appears at slice 2, joins A at slice 4; C stays apart
    stack = np.zeros((6, 6, 9), np.int32)
    stack[:, 0:3, 0:3] = 5
    stack[2:4, 0:3, 4:6] = 6
    stack[4:, 0:3, 0:6] = 7
    stack[:, 4:6, 7:9] = 8
    out = track_stack(stack)
    assert _distinct_labels(out) == 2
    assert out[2, 1, 5] == out[0, 1, 1] == out[5, 1, 4]
    assert out[0, 5, 8] != out[0, 1, 1]


def test_parallel_objects_keep_distinct_labels():
    stack = np.zeros((4, 6, 6), np.int32)
    stack[:, 0:2, 0:6] = 101
    stack[:, 4:6, 0:6] = 102
    stack[1] = np.where(stack[1] == 101, 202, np.where(stack[1] == 102, 201, 0))  # other ids
    out = track_stack(stack)
    assert _distinct_labels(out) == 2
    assert (out[:, 0, 0] == out[0, 0, 0]).all() and (out[:, 5, 5] == out[0, 5, 5]).all()


def test_progress_steps_and_result():
    stack = np.ones((3, 2, 2), np.int32)
    gen = track_stack_steps(stack)
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert steps == [("forward", 0, 3), ("forward", 1, 3), ("forward", 2, 3),
                     ("backward", 2, 3), ("backward", 1, 3), ("backward", 0, 3)]
    assert np.array_equal(result, track_stack(stack))


def test_empty_and_blank_stacks():
    out = track_stack(np.zeros((0, 4, 4), np.uint16))
    assert out.shape == (0, 4, 4) and out.dtype == np.int32
    assert list(track_stack_steps(np.zeros((0, 4, 4), np.uint16))) == []
    assert not track_stack(np.zeros((3, 4, 4), np.uint16)).any()
    assert track_and_filter(np.zeros((3, 4, 4), np.uint16), 0, 0).shape == (3, 4, 4)


def test_input_is_not_modified_and_any_integer_dtype_works():
    stack = np.zeros((3, 4, 4), np.uint16)
    stack[:, 1:3, 1:3] = [[[60001]], [[60002]], [[60003]]]
    before = stack.copy()
    out = track_stack(stack)
    assert np.array_equal(stack, before)
    assert set(np.unique(out).tolist()) == {0, 1}
    assert np.array_equal(track_stack(stack.astype(np.int64) * 2**40), out)


# ---------------------------------------------------------------------- filters and numbering


def _box_object(shape, z, y, x, value=1):
    lab = np.zeros(shape, np.int32)
    lab[z, y, x] = value
    return lab


def test_min_size_is_inclusive():
    lab = _box_object((4, 6, 6), slice(0, 2), slice(0, 2), slice(0, 2))  # 8 voxels
    assert filter_objects(lab, min_size=8, min_extent=0).sum() == 8
    assert not filter_objects(lab, min_size=9, min_extent=0).any()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_min_extent_deletes_objects_thin_along_any_one_axis(axis):
    box = [slice(0, 4)] * 3
    box[axis] = slice(1, 2)  # one voxel thick along this axis only
    far = slice(4, 6)
    lab = _box_object((6, 6, 6), *box, value=3) + _box_object((6, 6, 6), far, far, far, value=4)
    out = filter_objects(lab, min_size=0, min_extent=2)
    assert set(np.unique(out).tolist()) == {0, 4}
    assert np.array_equal(filter_objects(lab, min_size=0, min_extent=1), lab)


def test_min_extent_is_inclusive_and_size_comes_first():
    lab = _box_object((6, 6, 6), slice(0, 3), slice(0, 3), slice(0, 3), value=2)  # 27 voxels
    assert np.array_equal(filter_objects(lab, min_size=27, min_extent=3), lab)
    assert not filter_objects(lab, min_size=0, min_extent=4).any()
    assert not filter_objects(lab, min_size=28, min_extent=0).any()


def test_zero_filters_keep_everything_and_return_a_copy():
    lab = np.array([[[0, 5, 9]], [[2, 0, 9]]], np.uint16)
    out = filter_objects(lab, 0, 0)
    assert np.array_equal(out, lab) and out is not lab and out.dtype == lab.dtype
    out[0, 0, 1] = 0
    assert lab[0, 0, 1] == 5


def test_filter_keeps_ids_and_dtype_and_handles_disconnected_ids():
    lab = np.zeros((4, 4, 8), np.int64)
    lab[:, :, 0:2] = 2**40  # large id, 32 voxels
    lab[0, 0, 7] = 2**40  # same id, far away: one object with a wide box
    lab[:, :2, 4:6] = 7  # 16 voxels
    out = filter_objects(lab, min_size=20, min_extent=0)
    assert out.dtype == np.int64 and set(np.unique(out).tolist()) == {0, 2**40}
    assert out[0, 0, 7] == 2**40
    assert np.array_equal(filter_objects(lab, min_size=0, min_extent=2), lab)  # boxes, sparse ids
    out = filter_objects(lab, min_size=0, min_extent=3)  # 7 is 2 voxels tall
    assert set(np.unique(out).tolist()) == {0, 2**40}


@pytest.mark.parametrize("wide", [False, True])
def test_filter_deletes_inside_boxes_or_in_one_pass(wide):
    lab = np.zeros((4, 6, 6), np.int32)
    lab[1:3, 1:4, 1:4] = 9  # 18 voxels, extents (2, 3, 3)
    lab[0, 5, 0] = 5
    if wide:  # 5 is two far corners: its box is the whole volume, so one full pass is cheaper
        lab[3, 5, 5] = 5
    out = filter_objects(lab, min_size=3, min_extent=2)
    assert np.array_equal(out, np.where(lab == 9, 9, 0))


def test_relabel_orders_by_first_voxel_in_raster_order():
    lab = np.zeros((2, 3, 3), np.int64)
    lab[1, 0, 0] = 5
    lab[0, 2, 2] = 9
    lab[0, 1, 1:] = 2**35
    lab[1, 2, :] = 9
    out = relabel_by_first_appearance(lab)
    assert out.dtype == np.int32 and out.shape == lab.shape
    assert out[0, 1, 1] == 1 and out[0, 2, 2] == 2 and out[1, 0, 0] == 3
    assert (out[1, 2] == 2).all()


def test_relabel_edge_cases():
    assert relabel_by_first_appearance(np.zeros((0, 3, 3), np.uint8)).shape == (0, 3, 3)
    assert not relabel_by_first_appearance(np.zeros((2, 3, 3), np.uint8)).any()
    assert relabel_by_first_appearance(np.full((1, 1, 2), 4, np.uint8)).tolist() == [[[1, 1]]]
    one = np.array([[[1, 2], [3, 0]]])
    out = relabel_by_first_appearance(one)
    assert out.dtype == np.int32 and out.tolist() == one.tolist()


def test_relabel_of_a_non_contiguous_view():
    lab = np.zeros((3, 4, 5), np.int32)
    lab[0, 0, 4], lab[2, 3, 0] = 8, 6
    view = np.moveaxis(lab, 2, 0)  # (X, Z, Y)
    out = relabel_by_first_appearance(view)
    assert out[0, 2, 3] == 1 and out[4, 0, 0] == 2


def test_track_and_filter_recipe():
    stack = np.zeros((4, 6, 6), np.int32)
    stack[:, 0:3, 0:3] = [[[11]], [[21]], [[31]], [[41]]]  # 36 voxels
    stack[:, 4:6, 4:6] = [[[12]], [[22]], [[32]], [[42]]]  # 16 voxels, listed later
    stack[0, 3, 5] = 13  # a speck
    out = track_and_filter(stack, min_size=10, min_extent=2)
    assert out.dtype == np.int32
    assert out[0, 0, 0] == 1 and out[0, 5, 5] == 2 and out[0, 3, 5] == 0
    out = track_and_filter(stack, min_size=20, min_extent=2)
    assert set(np.unique(out).tolist()) == {0, 1}
    # the speck appears before the small square: numbering follows first appearance
    out = track_and_filter(stack, min_size=0, min_extent=0)
    assert out[0, 3, 5] == 2 and out[0, 5, 5] == 3


# ---------------------------------------------------------------------- errors


_Z2 = np.zeros((2, 2), int)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: match_to_previous(np.zeros((2, 2)), _Z2, 1), InputError,
         "prev must be an integer label array, got dtype float64"),
        (lambda: match_to_previous(_Z2, np.zeros((2, 3), int), 1), InputError,
         r"same shape, got \(2, 2\) and \(2, 3\)"),
        (lambda: match_to_previous(np.zeros((2, 2, 2), int), _Z2, 1), InputError,
         r"prev must be \(Y, X\), got shape \(2, 2, 2\)"),
        (lambda: match_to_previous(_Z2, -np.ones((2, 2), int), 1), InputError,
         r"curr has negative labels \(min -1\)"),
        (lambda: match_to_previous(_Z2, _Z2, 0), ParameterError, "next_label must be"),
        (lambda: match_to_previous(_Z2, _Z2, 1.5), ParameterError, "next_label must be"),
        (lambda: track_stack(_Z2), InputError, r"stack must be \(Z, Y, X\), got shape \(2, 2\)"),
        (lambda: track_stack(np.zeros((2, 2, 2), np.float32)), InputError, "integer label array"),
        (lambda: track_stack(np.full((1, 1, 1), 2**63, np.uint64)), InputError, "above 2"),
        (lambda: filter_objects(np.zeros((2, 2, 2), int), min_size=-1), ParameterError, "min_size"),
        (lambda: filter_objects(np.zeros((2, 2, 2), int), min_extent=2.5), ParameterError,
         "min_extent"),
        (lambda: filter_objects(np.zeros((2, 2, 2), int), min_extent=True), ParameterError,
         "min_extent"),
        (lambda: relabel_by_first_appearance(np.zeros((2, 2), complex)), InputError,
         "labels must be an integer label array"),
    ],
)
def test_bad_inputs_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name", ["iou_threshold", "ioa_threshold"])
@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_thresholds_must_be_fractions(name, value):
    z = np.zeros((2, 2), int)
    with pytest.raises(ParameterError, match=name):
        match_to_previous(z, z, 1, **{name: value})
    with pytest.raises(ParameterError, match=name):
        track_stack(z[None], **{name: value})


# ---------------------------------------------------------------------- properties

_slices = arrays(np.int32, st.tuples(st.integers(1, 6), st.integers(1, 6)),
                 elements=st.integers(0, 5))
_stacks = arrays(np.int32, st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)),
                 elements=st.integers(0, 4))


@settings(max_examples=60, deadline=None)
@given(_stacks)
def test_tracking_keeps_the_foreground_and_never_splits_a_slice_object(stack):
    out = track_stack(stack)
    assert np.array_equal(out > 0, stack > 0)
    n_objects = sum(_distinct_labels(s) for s in stack)
    assert _distinct_labels(out) <= n_objects
    for s, o in zip(stack, out):
        pairs = np.unique(np.stack([s.ravel(), o.ravel()]), axis=1)
        assert np.unique(pairs[0]).size == pairs.shape[1]  # each slice id -> one label


@settings(max_examples=40, deadline=None)
@given(_slices, st.integers(1, 5), st.permutations(range(1, 6)))
def test_identical_slices_give_one_label_per_object(slc, depth, perm):
    renamed = np.where(slc > 0, np.array([0, *perm])[slc] + 1000, 0)
    stack = np.stack([slc if z % 2 else renamed for z in range(depth)])
    out = track_stack(stack)
    assert _distinct_labels(out) == _distinct_labels(slc)
    assert all(np.array_equal(o, out[0]) for o in out)
    assert _partition(out[0]) == _partition(slc)


@settings(max_examples=40, deadline=None)
@given(_slices, st.permutations(range(1, 6)))
def test_matching_a_renamed_copy_restores_the_ids(prev, perm):
    curr = np.where(prev > 0, np.array([0, *perm])[prev] + 50, 0)
    lab, nxt = match_to_previous(prev, curr, 100)
    assert np.array_equal(lab, prev) and nxt == 100


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
              elements=st.sampled_from([0, 0, 1, 2, 7, 2**33])))
def test_relabel_is_idempotent_and_keeps_the_partition(lab):
    out = relabel_by_first_appearance(lab)
    assert out.dtype == np.int32
    assert _partition(out) == _partition(lab)
    assert np.array_equal(relabel_by_first_appearance(out), out)
    n = _distinct_labels(out)
    assert set(np.unique(out).tolist()) - {0} == set(range(1, n + 1))
    firsts = [np.flatnonzero(out.ravel() == k)[0] for k in range(1, n + 1)]
    assert firsts == sorted(firsts)


@settings(max_examples=60, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
              elements=st.integers(0, 4)),
       st.integers(0, 12), st.integers(0, 5))
def test_filter_matches_a_per_object_oracle(lab, min_size, min_extent):
    out = filter_objects(lab, min_size, min_extent)
    for i in np.unique(lab[lab > 0]):
        where = np.argwhere(lab == i)
        extent = where.max(axis=0) - where.min(axis=0) + 1
        keep = len(where) >= min_size and (extent >= min_extent).all()
        assert (out[lab == i] == (i if keep else 0)).all()
    assert not out[lab == 0].any()


# ---------------------------------------------------------------------- real 3D labels


def _per_slice_components(volume: np.ndarray) -> np.ndarray:
    """Split a 3D instance volume into 2D connected components numbered per slice (10001...)."""
    from skimage.measure import label

    stack = np.zeros(volume.shape, np.int32)
    for z, plane in enumerate(volume):
        cc = label(plane, background=0, connectivity=2)
        stack[z] = np.where(cc > 0, cc + 10000, 0)
    return stack


def _f1(pred: np.ndarray, gt: np.ndarray, thresh: float = 0.5) -> float:
    """One-to-one IoU matching F1 on a sparse contingency table."""
    fg = (pred > 0) | (gt > 0)
    p, g = pred[fg].astype(np.int64), gt[fg].astype(np.int64)
    p_area, g_area = np.bincount(p), np.bincount(g)
    both = (p > 0) & (g > 0)
    keys, inter = np.unique(p[both] * (g.max() + 1) + g[both], return_counts=True)
    pi, gi = np.divmod(keys, g.max() + 1)
    iou = inter / (p_area[pi] + g_area[gi] - inter)
    p_ids, g_ids = np.flatnonzero(p_area[1:]) + 1, np.flatnonzero(g_area[1:]) + 1
    score = np.zeros((p_ids.size, g_ids.size))
    score[np.searchsorted(p_ids, pi), np.searchsorted(g_ids, gi)] = np.where(iou >= thresh, iou, 0)
    rows, cols = linear_sum_assignment(score, maximize=True)
    tp = int((score[rows, cols] >= thresh).sum())
    return 2 * tp / (p_ids.size + g_ids.size) if p_ids.size + g_ids.size else 1.0


def test_f1_helper():
    gt = np.array([[1, 1, 0, 2, 2]])
    assert _f1(np.array([[3, 3, 0, 0, 4]]), gt) == 1.0
    assert _f1(np.array([[3, 3, 3, 0, 0]]), gt) == pytest.approx(2 / 3)  # IoU 2/3; 2 unmatched
    assert _f1(np.array([[3, 3, 3, 3, 3]]), gt) == 0.0  # IoU 2/5 with each: below 0.5


def test_real_3d_instances_are_recovered_from_their_slices():
    import tifffile

    truth = tifffile.imread(data_path("urocell_mito_labels", "mito_instance_fib1-3-2-1.tif"))
    out = track_and_filter(_per_slice_components(truth), min_size=0, min_extent=0)
    assert out.dtype == np.int32 and out.shape == truth.shape
    assert np.array_equal(out > 0, truth > 0)
    assert _f1(out, truth) >= 0.95


@pytest.mark.slow
def test_lucchi_sized_stack_tracks_fast():
    import tifffile

    truth = tifffile.imread(data_path("lucchi_pp_train", "train_mito_instances_3d_cc.tif"))
    stack = _per_slice_components(truth)
    t0 = time.perf_counter()
    tracked = track_stack(stack)
    t1 = time.perf_counter()
    kept = filter_objects(tracked, min_size=500, min_extent=5)
    t2 = time.perf_counter()
    out = relabel_by_first_appearance(kept)
    t3 = time.perf_counter()
    print(f"\ntracking {stack.shape}: track_stack {t1 - t0:.2f} s, filter_objects {t2 - t1:.2f} s, "
          f"relabel {t3 - t2:.2f} s")
    assert _f1(relabel_by_first_appearance(tracked), truth) >= 0.95
    assert out.max() <= tracked.max()


def test_progress_generator_validates_before_it_is_iterated():
    with pytest.raises(InputError, match="stack must be"):
        track_stack_steps(np.zeros((2, 2), int))
