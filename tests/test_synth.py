"""Tests of the synthetic EM training patches (nbapp.synth)."""

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as cc_label

from nbapp.synth import synthetic_patch


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
