"""Tests of the synthetic EM training patches (nbapp.training.synth)."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label as cc_label

from nbapp.training.synth import synthetic_patch


def _patches(n, size=128, seed=0):
    rng = np.random.default_rng(seed)
    return [synthetic_patch(rng, size) for _ in range(n)]


def test_same_seed_same_patch_and_valid_ranges():
    a, b = _patches(3, seed=5), _patches(3, seed=5)
    for (ia, la), (ib, lb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert ia.dtype == np.float32 and la.dtype == np.int32
        assert 0.0 <= ia.min() and ia.max() <= 1.0
    assert not np.array_equal(a[0][0], a[1][0])


def test_objects_are_single_components_kept_apart():
    n_objects = 0
    for _, lab in _patches(12):
        ids = np.unique(lab[lab > 0])
        n_objects += ids.size
        np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))  # consecutive ids
        for i in ids:
            assert cc_label(lab == i, connectivity=2).max() == 1
            grown = ndi.binary_dilation(lab == i, structure=np.ones((3, 3)))
            assert np.all(np.isin(lab[grown], (0, i)))  # background between two objects
    assert n_objects > 20


def test_mitochondria_have_a_dark_rim_against_their_surroundings():
    darker, total = 0, 0
    for img, lab in _patches(20, seed=2):
        for i in np.unique(lab[lab > 0]):
            obj = lab == i
            if obj.sum() < 40:
                continue
            rim = obj & ~ndi.binary_erosion(obj, iterations=2)
            around = ndi.binary_dilation(obj, iterations=4) & (lab == 0)
            around &= ~ndi.binary_dilation(obj, iterations=2)
            if around.sum() < 10:
                continue
            total += 1
            darker += img[rim].mean() < img[around].mean()
    assert total > 20 and darker / total > 0.9


def test_object_sizes_span_other_pixel_sizes():
    widths = []
    for _, lab in _patches(30, size=256, seed=3):
        for i in np.unique(lab[lab > 0]):
            widths.append(2 * ndi.distance_transform_edt(lab == i).max())
    widths = np.array(widths)
    assert widths.min() < 12 and widths.max() > 50  # 10 px mitochondria as well as 60 px ones


#: the first three 128x128 patches of seed 7 from nbapp 0.4's generator (commit 4dc8441)
V04_SEED7 = [(7303.233148428189, 2, 2647), (11505.007567799184, 0, 0),
             (8778.21120922295, 2, 3561)]


def test_hard_negatives_are_unlabelled_and_off_by_default():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    changed = 0
    for i in range(6):
        img0, lab0 = synthetic_patch(rng_a, 128)
        img1, lab1 = synthetic_patch(rng_b, 128, hard_negatives=0.0)
        np.testing.assert_array_equal(img0, img1)  # 0 draws nothing more: 0.4's patches
        np.testing.assert_array_equal(lab0, lab1)
        if i < len(V04_SEED7):  # image sum, objects, foreground pixels: 0.4's generator
            got = (img0.astype(np.float64).sum(), lab0.max(), (lab0 > 0).sum())
            assert got == pytest.approx(V04_SEED7[i])
    for seed in range(6):
        img0, lab0 = synthetic_patch(np.random.default_rng(seed), 128)
        img1, lab1 = synthetic_patch(np.random.default_rng(seed), 128, hard_negatives=1.0)
        np.testing.assert_array_equal(lab0, lab1)  # look-alikes never get a label ...
        far = ~ndi.binary_dilation(lab0 > 0, iterations=4)
        inside = np.abs(img1 - img0)[~far]
        # ... nor touch the mitochondria (up to the final blur and noise, drawn afterwards)
        assert inside.size == 0 or np.median(inside) < 0.05
        changed += np.abs(img1 - img0)[far].max() > 0.1  # ... but do darken the image
    assert changed >= 4


def test_each_kind_of_hard_negative_darkens_the_patch():
    from nbapp.training.synth import _hard_negatives

    for seed in range(8):
        rng = np.random.default_rng(seed)
        img = np.full((128, 128), 0.6, np.float32)
        free = np.ones_like(img, bool)
        free[:, :16] = False
        _hard_negatives(rng, img, free)
        assert img.max() <= 0.6 + 1e-6 and img.min() < 0.5  # only ever darker, and visibly
        assert np.all(img[:, :16] == 0.6)  # nothing drawn outside ``free``
