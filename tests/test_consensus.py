"""Ortho-plane consensus: literal volumes, every raise path, hypothesis invariants, real labels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from models import data_path
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

import nbapp.consensus as cs
from nbapp import InputError, ParameterError
from nbapp.params import ConsensusParams, VolumeParams

NO_FILTER = ConsensusParams(min_size=0, min_extent=0)


def box(shape=(6, 6, 6), *objects) -> np.ndarray:
    """uint16 labels; ``objects`` are (label, (z0, z1), (y0, y1), (x0, x1)), later ones on top."""
    lab = np.zeros(shape, np.uint16)
    for label, (z0, z1), (y0, y1), (x0, x1) in objects:
        lab[z0:z1, y0:y1, x0:x1] = label
    return lab


def run(xy, xz, yz, vote=2, allow=False, min_size=0, min_extent=0) -> np.ndarray:
    p = ConsensusParams(vote_threshold=vote, allow_one_view=allow, min_size=min_size,
                        min_extent=min_extent)
    out = cs.orthoplane_consensus(xy, xz, yz, p)
    assert out.dtype == np.int32 and out.shape == xy.shape
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b hold the same objects under some renaming of ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.stack([a[fg], b[fg]]).astype(np.int64), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def objects_of(lab: np.ndarray) -> list[frozenset]:
    """Each object's voxels as a set of flat indices, sorted by first voxel."""
    flat = lab.ravel()
    return [frozenset(np.flatnonzero(flat == i).tolist()) for i in range(1, int(lab.max()) + 1)]


CUBE = box((6, 6, 6), (1, (1, 5), (1, 5), (1, 5)))

# ---------------------------------------------------------------- consensus on literal volumes


@pytest.mark.parametrize("vote", [1, 2, 3])
@pytest.mark.parametrize("allow", [False, True])
def test_object_seen_identically_in_three_views_is_kept_as_is(vote, allow):
    out = run(CUBE, CUBE, CUBE, vote, allow)
    assert np.array_equal(out, CUBE.astype(np.int32))


def test_object_seen_in_two_views_is_kept_with_vote_2():
    empty = np.zeros_like(CUBE)
    for views in [(CUBE, CUBE, empty), (CUBE, empty, CUBE), (empty, CUBE, CUBE)]:
        assert np.array_equal(run(*views, vote=2, allow=False), CUBE)
        assert np.array_equal(run(*views, vote=1, allow=False), CUBE)
        assert not run(*views, vote=3).any()  # two votes cannot reach three


@pytest.mark.parametrize("vote, allow, kept", [
    (1, True, True), (1, False, False), (2, True, False), (2, False, False), (3, True, False),
])
def test_object_seen_in_one_view_needs_allow_one_view_and_vote_1(vote, allow, kept):
    empty = np.zeros_like(CUBE)
    out = run(empty, CUBE, empty, vote, allow)
    assert np.array_equal(out, CUBE) if kept else not out.any()


# three shifted boxes: votes 1 on the x ends, 2 next to them, 3 in the middle
SHIFTED = [box((6, 6, 6), (1, (1, 5), (1, 5), (x, x + 4))) for x in (0, 1, 2)]
VOTES = sum((v > 0).astype(int) for v in SHIFTED)


@pytest.mark.parametrize("vote", [1, 2, 3])
@pytest.mark.parametrize("allow", [False, True])
def test_vote_threshold_keeps_voxels_with_enough_votes(vote, allow):
    # vote 1 = union, vote 3 = intersection of the three detections
    out = run(*SHIFTED, vote=vote, allow=allow)
    assert np.array_equal(out, (VOTES >= vote).astype(np.int32))


def test_filters_apply_to_the_consensus_object_not_to_the_views():
    # each view's object has 64 voxels; the vote-3 intersection has 32, the union 96
    assert not run(*SHIFTED, vote=3, min_size=33).any()
    assert run(*SHIFTED, vote=3, min_size=32).sum() == 32
    assert run(*SHIFTED, vote=1, min_size=96).sum() == 96
    # extents: intersection is 4 x 4 x 2 (x from 2 to 4), union 4 x 4 x 6
    assert not run(*SHIFTED, vote=3, min_extent=3).any()
    assert run(*SHIFTED, vote=3, min_extent=2).sum() == 32
    assert run(*SHIFTED, vote=1, min_extent=4).sum() == 96
    assert not run(*SHIFTED, vote=1, min_extent=5).any()


def test_min_size_and_min_extent_filters():
    lab = box((6, 8, 8), (1, (0, 4), (0, 4), (0, 4)), (2, (5, 6), (0, 5), (3, 8)),
              (3, (0, 2), (6, 8), (6, 8)))
    assert int(run(lab, lab, lab).max()) == 3
    kept = run(lab, lab, lab, min_size=9)  # the 2x2x2 cube (8 voxels) goes
    assert same_partition(kept, np.where(lab == 3, 0, lab))
    kept = run(lab, lab, lab, min_extent=2)  # the one-plane pancake goes
    assert same_partition(kept, np.where(lab == 2, 0, lab))
    assert objects_of(run(lab, lab, lab, min_extent=4)) == objects_of(np.where(lab == 1, 1, 0))
    assert not run(lab, lab, lab, min_extent=5).any()


def test_distinct_objects_stay_distinct_even_when_touching():
    lab = box((6, 6, 6), (1, (0, 6), (0, 6), (0, 3)), (2, (0, 6), (0, 6), (3, 6)))
    far = box((6, 6, 6), (1, (0, 2), (0, 2), (0, 2)), (2, (4, 6), (4, 6), (4, 6)))
    for v in (lab, far):
        for vote in (1, 2, 3):
            assert same_partition(run(v, v, v, vote), v)


def test_object_split_in_one_view_gives_one_object():
    whole = box((6, 6, 6), (1, (1, 5), (1, 5), (0, 6)))
    split = box((6, 6, 6), (1, (1, 5), (1, 5), (0, 3)), (2, (1, 5), (1, 5), (3, 6)))  # yz slices X
    for vote in (1, 2, 3):
        assert np.array_equal(run(whole, whole, split, vote), whole)
    assert np.array_equal(run(split, whole, whole, 2, True), whole)


def test_objects_merged_in_one_view_stay_apart_with_vote_2():
    two = box((6, 6, 6), (1, (0, 6), (0, 6), (0, 3)), (2, (0, 6), (0, 6), (3, 6)))
    merged = (two > 0).astype(np.uint16)
    # the merged detection overlaps each half with IoU 0.5: it is shared out to both clusters
    assert same_partition(run(two, two, merged, vote=2), two)
    assert same_partition(run(two, two, merged, vote=3), two)
    # vote 1 without allow_one_view merges maximally: the connected component is one object
    assert same_partition(run(two, two, merged, vote=1), merged)


def test_overlapping_consensus_objects_are_unioned():
    two = box((6, 6, 6), (1, (0, 6), (0, 6), (0, 3)), (2, (0, 6), (0, 6), (3, 6)))
    merged = (two > 0).astype(np.uint16)
    # vote 1 with allow_one_view: each half's cluster takes the merged detection whole, the two
    # results coincide (IoU 1) and are unioned
    assert same_partition(run(two, two, merged, vote=1, allow=True), merged)


def test_trivially_overlapping_objects_stay_apart_and_the_smaller_keeps_shared_voxels():
    big = box((12, 12, 12), (1, (0, 10), (0, 10), (0, 10)))  # 1000 voxels
    small = box((12, 12, 12), (1, (9, 10), (9, 10), (9, 12)))  # 3 voxels, 1 inside big
    out = run(big, small, np.zeros_like(big), vote=1, allow=True)
    assert int(out.max()) == 2
    small_id = out[9, 9, 11]
    assert np.array_equal(out == small_id, small > 0)
    assert (out == out[0, 0, 0]).sum() == 999


def test_ids_follow_first_appearance_in_c_order():
    lab = box((6, 6, 6), (1, (4, 6), (0, 2), (0, 2)), (2, (0, 2), (3, 5), (0, 2)),
              (3, (0, 2), (0, 2), (4, 6)))
    out = run(lab, lab, lab)
    assert out[0, 0, 4] == 1 and out[0, 3, 0] == 2 and out[4, 0, 0] == 3
    assert same_partition(out, lab)


def test_ids_need_not_be_consecutive_and_dtype_and_layout_do_not_matter():
    lab = box((6, 6, 6), (1, (0, 2), (0, 6), (0, 6)), (2, (3, 6), (0, 3), (0, 3)),
              (3, (3, 6), (4, 6), (4, 6)))
    xz = np.where(lab == 3, 0, lab)
    want = run(lab, xz, lab)
    sparse = (lab.astype(np.int64) * 1000).astype(np.int32)  # ids 1000, 2000, 3000
    assert np.array_equal(run(sparse, xz.astype(np.uint8), lab.astype(np.int64)), want)
    huge = np.where(lab > 0, lab.astype(np.uint64) + 2**40, 0)  # compacted first
    assert np.array_equal(run(huge, xz, huge), want)
    fortran = np.asfortranarray(lab)
    transposed = np.ascontiguousarray(lab.transpose(2, 1, 0)).transpose(2, 1, 0)
    assert np.array_equal(run(fortran, xz, transposed), want)


def test_empty_and_zero_size_volumes():
    empty = np.zeros((3, 4, 5), np.uint16)
    assert not run(empty, empty, empty, vote=1, allow=True).any()
    nothing = np.zeros((0, 4, 5), np.int32)
    assert run(nothing, nothing, nothing).shape == (0, 4, 5)


def test_inputs_are_not_modified():
    views = [v.copy() for v in SHIFTED]
    run(*views, vote=2)
    assert all(np.array_equal(a, b) for a, b in zip(views, SHIFTED))


def test_default_params_filter_small_objects():
    out = cs.orthoplane_consensus(CUBE, CUBE, CUBE)  # 64 voxels < min_size 500
    assert not out.any()


# ------------------------------------------------------------------------------- step by step


def test_detection_graph_nodes_edges_and_iou():
    a = box((1, 2, 6), (1, (0, 1), (0, 2), (0, 3)), (2, (0, 1), (0, 2), (3, 6)))
    b = box((1, 2, 6), (7, (0, 1), (0, 2), (1, 5)))
    g = cs.detection_graph([a, b, np.zeros_like(a)])
    assert g.n == 3 and g.view.tolist() == [0, 0, 1] and g.label.tolist() == [1, 2, 7]
    assert g.size.tolist() == [6, 6, 8]
    assert g.pairs.tolist() == [[0, 2], [1, 2]] and g.overlap.tolist() == [4, 4]
    np.testing.assert_allclose(g.iou, [4 / 10, 4 / 10])


def test_pair_counting_with_large_tables_uses_unique():
    keys = np.array([5, 3, 5, 10**9], np.int64)
    for table in (11, 10**10):
        k, c = cs._count_keys(keys[:3], table)
        assert k.tolist() == [3, 5] and c.tolist() == [1, 2]
    k, c = cs._count_keys(keys, 10**10)
    assert k.tolist() == [3, 5, 10**9] and c.tolist() == [1, 2, 1]


def test_cluster_links_use_mean_over_all_pairs():
    # clusters {0, 1} and {2}: one edge of IoU 0.03 -> mean 0.015 > 0.01; 0.015 -> 0.0075 no link
    def graph(iou, overlap):
        return cs.DetectionGraph(np.array([0, 1, 2]), np.array([1, 1, 1]), np.array([10**4] * 3),
                                 [None] * 3, np.array([[0, 1], [1, 2]]), np.array([9000, overlap]),
                                 np.array([0.9, iou]))
    assert len(cs.cluster_detections(graph(0.03, 10), 0.75)) == 1
    assert len(cs.cluster_detections(graph(0.015, 10), 0.75)) == 2
    assert len(cs.cluster_detections(graph(0.015, 202), 0.75)) == 1  # mean overlap 101 > 100
    assert len(cs.cluster_detections(graph(0.015, 200), 0.75)) == 2  # mean overlap 100: not > 100
    assert len(cs.cluster_detections(graph(0.015, 10), 0.0)) == 1  # maximal: components


def test_merge_clusters_hub_rule():
    m = [np.array([0, 1]), np.array([2]), np.array([3, 4])]
    # unlinked clusters pass through
    unlinked = cs.merge_clusters(m, np.zeros((0, 2), int))
    assert [c.tolist() for c in unlinked] == [[0, 1], [2], [3, 4]]
    # a larger hub absorbs, an equal-size neighbour does not push it away
    m = [np.array([0, 1]), np.array([2, 3])]
    assert [c.tolist() for c in cs.merge_clusters(m, np.array([[0, 1]]))] == [[0, 1, 2, 3]]
    # merging reaches one hop: in the chain 0-1-2-3 the first hub (1, ties to the lower index)
    # absorbs 0 and 2, and 3 loses its link
    m = [np.array([i]) for i in range(4)]
    chain = np.array([[0, 1], [1, 2], [2, 3]])
    assert [c.tolist() for c in cs.merge_clusters(m, chain)] == [[0, 1, 2], [3]]


def test_union_and_separation_of_object_masks():
    def obj(x0, x1):
        box_ = (slice(0, 1), slice(0, 1), slice(x0, x1))
        return cs.ObjectMask(box_, np.ones((1, 1, x1 - x0), bool))
    assert cs.union_overlapping([]) == [] and len(cs.union_overlapping([obj(0, 2)])) == 1
    assert [o.size for o in cs.union_overlapping([obj(0, 2), obj(2, 4)])] == [2, 2]  # touching only
    a, b = obj(0, 10), obj(8, 9)  # b lies inside a: b keeps its voxel, a loses it
    sep = cs.separate_shared_voxels([a, b])
    assert [o.size for o in sep] == [9, 1] and sep[0].mask.tolist() == [[[1] * 8 + [0, 1]]]
    assert [o.size for o in cs.separate_shared_voxels([obj(0, 2), obj(0, 2)])] == [2]  # tie: later


def test_vote_cluster_counts_views_only_inside_the_boxes():
    g = cs.detection_graph(SHIFTED)
    assert cs.vote_cluster(SHIFTED, g, np.array([0, 1]), 3) is None  # two views cannot give 3
    obj = cs.vote_cluster(SHIFTED, g, np.array([0, 1, 2]), 3)
    assert obj.box == (slice(1, 5), slice(1, 5), slice(2, 4)) and obj.mask.all()


# ----------------------------------------------------------------------------- semantic vote


def test_semantic_vote_thresholds_and_integer_masks():
    a = np.array([[[1, 1, 1, 0]]], np.uint8)
    b = np.array([[[2, 2, 0, 0]]], np.int32)  # any non-zero value votes
    c = np.array([[[True, False, False, False]]])
    assert cs.semantic_vote([a, b, c], 1).tolist() == [[[True, True, True, False]]]
    assert cs.semantic_vote((a, b, c), 2).tolist() == [[[True, True, False, False]]]
    assert cs.semantic_vote([a, b, c], np.int64(3)).tolist() == [[[True, False, False, False]]]


@pytest.mark.parametrize("masks, vote, error, match", [
    ([], 1, InputError, "at least one mask"),
    ([np.zeros((2, 2, 2), np.float32)] * 3, 1, InputError, "mask 0 must be bool or integer.*float"),
    ([np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool)], 1, InputError,
     r"one shape.*\(2, 2, 2\), \(2, 2, 3\)"),
    ([np.zeros((2, 2, 2), bool)] * 3, 0, ParameterError, r"vote_threshold.*\[1, 3\].*0"),
    ([np.zeros((2, 2, 2), bool)] * 3, 4, ParameterError, r"vote_threshold.*\[1, 3\].*4"),
    ([np.zeros((2, 2, 2), bool)] * 3, True, ParameterError, "vote_threshold.*True"),
    ([np.zeros((2, 2, 2), bool)] * 3, 2.0, ParameterError, "vote_threshold.*2.0"),
])
def test_semantic_vote_errors(masks, vote, error, match):
    with pytest.raises(error, match=match):
        cs.semantic_vote(masks, vote)


# ------------------------------------------------------------------------------ input errors


GOOD = np.zeros((2, 3, 4), np.uint16)


@pytest.mark.parametrize("views, match", [
    ((GOOD, GOOD, GOOD[:, :, :3]),
     r"same \(Z, Y, X\) shape.*xy \(2, 3, 4\), xz \(2, 3, 4\), yz \(2, 3, 3\)"),
    ((GOOD[0], GOOD, GOOD), r"xy must be a 3D \(Z, Y, X\) label volume, got shape \(3, 4\)"),
    ((GOOD, GOOD[None], GOOD), r"xz must be a 3D .*shape \(1, 2, 3, 4\)"),
    ((GOOD, GOOD, GOOD.astype(np.float32)), "yz must hold integer labels, got dtype float32"),
    ((GOOD.astype(bool), GOOD, GOOD), "xy must hold integer labels, got dtype bool.*semantic_vote"),
    ((GOOD, np.full((2, 3, 4), -1, np.int16), GOOD), r"xz has negative labels \(min -1\)"),
])
def test_consensus_input_errors(views, match):
    with pytest.raises(InputError, match=match):
        cs.orthoplane_consensus(*views, NO_FILTER)


def test_consensus_params_must_be_consensus_params():
    with pytest.raises(ParameterError, match="params must be ConsensusParams, got dict"):
        cs.orthoplane_consensus(GOOD, GOOD, GOOD, {"vote_threshold": 2})


# ------------------------------------------------------------------------- hypothesis properties

small_labels = arrays(np.uint8, st.tuples(*[st.integers(1, 5)] * 3), elements=st.integers(0, 4))


def boxes_volume(rng: np.random.Generator, shape=(8, 8, 8), n=4) -> np.ndarray:
    """Random overlapping boxes painted in turn (later ones on top), ids 1..n."""
    lab = np.zeros(shape, np.uint8)
    for i in range(1, n + 1):
        lo = rng.integers(0, np.array(shape) - 1)
        hi = lo + rng.integers(1, 5, size=3)
        lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = i
    return lab


def perturbed_views(seed: int) -> list[np.ndarray]:
    """Three views of one box volume, each with its own random changes (drops, shifts, extras)."""
    rng = np.random.default_rng(seed)
    base = boxes_volume(rng)
    views = []
    for _ in range(3):
        v = base.copy()
        if rng.random() < 0.5:
            v = np.roll(v, rng.integers(-1, 2), axis=int(rng.integers(3)))
        if rng.random() < 0.3:
            v[v == rng.integers(1, 5)] = 0
        if rng.random() < 0.3:
            extra = boxes_volume(rng, n=1)
            v[(extra > 0) & (v == 0)] = 9
        views.append(v)
    return views


@settings(max_examples=60, deadline=None)
@given(lab=small_labels, vote=st.integers(1, 3), allow=st.booleans())
def test_three_identical_views_return_the_input_partition(lab, vote, allow):
    assert same_partition(run(lab, lab, lab, vote, allow), lab)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), allow=st.booleans())
def test_higher_vote_gives_a_subset_of_the_foreground(seed, allow):
    # with filters off: vote 3 and 2 cluster alike and vote on the same clusters; vote 1 takes
    # the union of whole components (or of every cluster with allow_one_view)
    views = perturbed_views(seed)
    fg = [run(*views, vote=v, allow=allow) > 0 for v in (1, 2, 3)]
    assert not (fg[2] & ~fg[1]).any() and not (fg[1] & ~fg[0]).any()
    assert not (fg[0] & ~np.any([v > 0 for v in views], axis=0)).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), min_size=st.integers(0, 40), min_extent=st.integers(0, 4))
def test_vote_2_is_inside_vote_1_even_with_filters(seed, min_size, min_extent):
    # every vote-2 object lies inside one vote-1 object (its component), which passes any
    # filter the smaller object passes
    views = perturbed_views(seed)
    fg2 = run(*views, 2, False, min_size, min_extent) > 0
    fg1 = run(*views, 1, False, min_size, min_extent) > 0
    assert not (fg2 & ~fg1).any()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vote=st.integers(1, 3), allow=st.booleans(),
       min_size=st.integers(0, 30), min_extent=st.integers(0, 3))
def test_output_ids_order_and_filters(seed, vote, allow, min_size, min_extent):
    out = run(*perturbed_views(seed), vote, allow, min_size, min_extent)
    n = int(out.max())
    flat = out.ravel()
    firsts = [np.argmax(flat == i) for i in range(1, n + 1)]
    assert firsts == sorted(firsts) and np.unique(out).tolist() == list(range(n + 1))
    for sl in ndi.find_objects(out):
        assert min(s.stop - s.start for s in sl) >= min_extent
    assert np.bincount(flat)[1:].min(initial=min_size) >= min_size


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), vote=st.integers(1, 3), allow=st.booleans())
def test_order_preserving_relabelling_does_not_change_the_result(seed, vote, allow):
    views = perturbed_views(seed)
    want = run(*views, vote, allow)
    spread = [np.where(v > 0, v.astype(np.int64) * 37 + 5, 0) for v in views]
    assert np.array_equal(run(*spread, vote, allow), want)


# ---------------------------------------------------------------------------------- real data


def simulate_views(gt: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Three imperfect views of true 3D instances: object boundaries off by one voxel, objects
    missing from one view, one object split in two along each view's slicing axis."""
    ids = np.unique(gt)[1:]
    boxes = ndi.find_objects(gt)
    largest = ids[np.argsort(-np.bincount(gt.ravel())[ids], kind="stable")][:3]
    others = np.setdiff1d(ids, largest)
    views = []
    for axis in range(3):  # xy slices Z, xz slices Y, yz slices X
        v = gt.copy()
        for i in rng.choice(ids, size=6, replace=False):
            sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[i - 1])
            own = gt[sl] == i
            block = v[sl]
            if rng.random() < 0.5:
                block[own & ~ndi.binary_erosion(own)] = 0
            else:
                block[ndi.binary_dilation(own) & (block == 0)] = i
        if axis == 1:
            for i in rng.choice(others, size=3, replace=False):
                v[v == i] = 0
        i = largest[axis]  # a different object split in each view
        own = v == i
        cut = int(np.median(np.nonzero(own)[axis]))
        index = [slice(None)] * 3
        index[axis] = slice(cut, None)
        half = np.zeros_like(own)
        half[tuple(index)] = own[tuple(index)]
        v[half] = gt.max() + 1
        views.append(v)
    return views


def f1_at(pred: np.ndarray, gt: np.ndarray, thresh: float) -> float:
    """F1 of instances matched at IoU > ``thresh`` >= 0.5, where a match is necessarily unique.

    Equal to ``nbapp.metrics.instance_metrics(pred, gt)["f1"]`` (which matches at IoU >= 0.5)
    except for pairs with IoU exactly 0.5, and fast on big volumes: the overlaps come from
    :func:`nbapp.consensus.detection_graph` (per-object boxes, no full-volume sort).
    """
    g = cs.detection_graph([pred, gt])
    tp = int(np.count_nonzero(g.iou > thresh))
    denom = g.n  # predicted + true objects
    return 2 * tp / denom if denom else 1.0


def urocell_views() -> tuple[np.ndarray, list[np.ndarray]]:
    files = sorted(data_path("urocell_mito_labels").glob("*.tif"))
    if not files:
        pytest.skip("no UroCell label volumes found")
    tifffile = pytest.importorskip("tifffile")
    gt = tifffile.imread(files[0])
    return gt, simulate_views(gt, np.random.default_rng(0))


def test_consensus_recovers_true_instances_from_noisy_views():
    gt, views = urocell_views()
    for v in views:
        assert f1_at(v, gt, 0.75) < 1.0  # each view alone is imperfect
    out = cs.orthoplane_consensus(*views, ConsensusParams(min_size=0))
    assert f1_at(out, gt, 0.5) >= 0.95
    assert f1_at(out, gt, 0.75) >= 0.95


@pytest.mark.slow
def test_consensus_recovers_true_instances_by_instance_metrics():
    # the same check scored by nbapp.metrics (slow on 256^3: it sorts every voxel's ids)
    from nbapp.metrics import instance_metrics

    gt, views = urocell_views()
    out = cs.orthoplane_consensus(*views, ConsensusParams(min_size=0))
    m = instance_metrics(out, gt, thresholds=(0.5,))
    assert m["f1"] >= 0.95, m
    assert m["f1"] == pytest.approx(f1_at(out, gt, 0.5))


@pytest.mark.slow
def test_consensus_time_on_a_lucchi_sized_volume():
    tifffile = pytest.importorskip("tifffile")
    gt = tifffile.imread(data_path("lucchi_pp_train", "train_mito_instances_3d_cc.tif"))
    xz = gt.copy()
    xz[::11] = 0  # a few missed slices in one view
    yz = ndi.grey_erosion(gt, size=(1, 1, 2))  # boundaries off by one voxel in another
    times = {}
    for vote in (1, 2, 3):
        t = time.perf_counter()
        out = cs.orthoplane_consensus(gt, xz, yz, ConsensusParams(vote_threshold=vote))
        times[vote] = time.perf_counter() - t
        assert f1_at(out, gt, 0.5) >= 0.9
    report = ", ".join(f"vote {v}: {s:.2f} s" for v, s in times.items())
    print(f"\nconsensus on {gt.shape} {gt.dtype}: {report}")


# ------------------------------------------------------- the consensus decided from counts


def via_counts(xy, xz, yz, params: ConsensusParams) -> np.ndarray:
    """consensus_of_counts on the whole volume, painted, filtered and numbered."""
    from nbapp.tracking import filter_objects, relabel_by_first_appearance

    keys, counts = cs.combination_counts(xy, xz, yz)
    owner = cs.consensus_of_counts(keys, counts, params)
    flat = np.stack([np.asarray(v, np.int64).reshape(-1) for v in (xy, xz, yz)], axis=1)
    out = np.zeros(flat.shape[0], np.int32)
    fg = flat.any(axis=1)
    if keys.size:
        row = np.unique(flat[fg], axis=0, return_inverse=True)[1].reshape(-1)
        out[fg] = owner[row] + 1
    out = filter_objects(out.reshape(xy.shape), params.min_size, params.min_extent)
    return relabel_by_first_appearance(out)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), vote=st.integers(1, 3), allow=st.booleans(),
       min_size=st.integers(0, 30), min_extent=st.integers(0, 3))
def test_the_consensus_from_counts_is_the_consensus(seed, vote, allow, min_size, min_extent):
    """Issue 29: every decision of the consensus depends on the voxels only through the
    counts of their (xy, xz, yz) labels, which blocks can add up."""
    views = perturbed_views(seed)
    p = ConsensusParams(vote_threshold=vote, allow_one_view=allow, min_size=min_size,
                        min_extent=min_extent)
    assert np.array_equal(via_counts(*views, p), cs.orthoplane_consensus(*views, p))


@pytest.mark.parametrize("vote, allow", [(1, False), (2, False), (3, False), (1, True)])
def test_the_consensus_from_counts_on_noisy_views_of_real_objects(vote, allow):
    gt, views = urocell_views()
    views = [v[:96] for v in views]
    p = ConsensusParams(vote_threshold=vote, allow_one_view=allow, min_size=100)
    want = cs.orthoplane_consensus(*views, p)
    assert want.max() > 10 and np.array_equal(via_counts(*views, p), want)


def test_counts_of_pieces_add_up_to_the_counts_of_the_whole():
    views = perturbed_views(7)
    keys, counts = cs.combination_counts(*views)
    parts = [cs.combination_counts(*(v[:, :, :3] for v in views)),
             cs.combination_counts(*(v[:, :, 3:] for v in views))]
    k = np.concatenate([p[0] for p in parts])
    c = np.concatenate([p[1] for p in parts])
    merged, inverse = np.unique(k, axis=0, return_inverse=True)
    assert np.array_equal(merged, keys)
    assert np.array_equal(np.bincount(inverse.reshape(-1), weights=c).astype(np.int64), counts)


def test_a_voxel_shared_by_equal_objects_goes_to_the_later_one_in_both_paths():
    """Module notes 7's tie: two 1000-voxel cubes from different views touch at one corner
    voxel (a trivial overlap, not unioned); the object of the later cluster (xz's) keeps it,
    in the consensus and in the consensus from counts (issue 31: this tie was untested)."""
    a = box((20, 20, 20), (1, (0, 10), (0, 10), (0, 10)))
    b = box((20, 20, 20), (1, (9, 19), (9, 19), (9, 19)))
    p = ConsensusParams(vote_threshold=1, allow_one_view=True)
    for out in (cs.orthoplane_consensus(a, b, np.zeros_like(a), p),
                via_counts(a, b, np.zeros_like(a), p)):
        assert int(out.max()) == 2
        assert out[9, 9, 9] == out[18, 18, 18] != out[0, 0, 0]
        assert (out == out[0, 0, 0]).sum() == 999 and (out == out[18, 18, 18]).sum() == 1000


def test_consensus_of_counts_refuses_other_params():
    with pytest.raises(ParameterError, match="must be ConsensusParams"):
        cs.consensus_of_counts(np.zeros((0, 3)), np.zeros(0), VolumeParams())


def _literal_cases():
    big = box((12, 12, 12), (1, (0, 10), (0, 10), (0, 10)))
    small = box((12, 12, 12), (1, (9, 10), (9, 10), (9, 12)))
    two = box((6, 6, 6), (1, (0, 6), (0, 6), (0, 3)), (2, (0, 6), (0, 6), (3, 6)))
    merged = (two > 0).astype(np.uint16)
    whole = box((6, 6, 6), (1, (1, 5), (1, 5), (0, 6)))
    split = box((6, 6, 6), (1, (1, 5), (1, 5), (0, 3)), (2, (1, 5), (1, 5), (3, 6)))
    return [((big, small, np.zeros_like(big)), 1, True),  # the smaller keeps shared voxels
            ((small, big, np.zeros_like(big)), 1, True),
            ((two, two, merged), 2, False), ((two, two, merged), 1, False),
            ((two, two, merged), 1, True), ((whole, whole, split), 2, False),
            ((split, whole, whole), 2, True)]


@pytest.mark.parametrize("k", range(7))
def test_the_consensus_from_counts_on_the_literal_cases(k):
    views, vote, allow = _literal_cases()[k]
    p = ConsensusParams(vote_threshold=vote, allow_one_view=allow, min_size=0, min_extent=0)
    want = cs.orthoplane_consensus(*views, p)
    assert np.array_equal(via_counts(*views, p), want)
