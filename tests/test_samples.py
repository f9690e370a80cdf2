"""The bundled generated samples: the demo volume and the teaching volume whose objects make
each parameter's effect visible (issue 18 item 5). The effects are checked with the shipped
default model on the slice / volume the notebooks show."""

from __future__ import annotations

import numpy as np
import pytest

from nbapp.samples import TEACHING_OBJECTS, demo_volume, teaching_volume


def test_demo_volume_is_unchanged_by_the_teaching_generator():
    img, lab = demo_volume(shape=(8, 64, 64), n_mito=2, seed=1)
    # the numbers of the demo generator before the teaching volume shared its code
    assert int(lab.max()) == 2 and img.dtype == np.uint8
    again = demo_volume(shape=(8, 64, 64), n_mito=2, seed=1)
    assert np.array_equal(img, again[0]) and np.array_equal(lab, again[1])


def test_teaching_volume_has_each_scripted_object():
    img, lab = teaching_volume()
    assert img.shape == lab.shape == (48, 256, 256) and img.dtype == np.uint8
    assert int(lab.max()) == len(TEACHING_OBJECTS)
    names = [o[0] for o in TEACHING_OBJECTS]
    size = {n: int((lab == i).sum()) for i, n in enumerate(names, start=1)}
    # the touching pair: one voxel of cytoplasm between them at most
    from scipy import ndimage as ndi

    a, b = lab == names.index("touching A") + 1, lab == names.index("touching B") + 1
    assert (ndi.binary_dilation(a, iterations=2) & b).any()
    # small objects around the default Min Size (500) and well below the others
    assert size["tiny"] < 500 < size["small 3"] < 3000 < size["faint 1"]
    # the flat one: 7 slices thick
    z = np.flatnonzero((lab == names.index("flat") + 1).any(axis=(1, 2)))
    assert z.size <= 8
    # the hole is inside the labels (a mitochondrion with a bright inclusion is one object)
    hole = lab[24] == names.index("hole") + 1
    assert not (ndi.binary_fill_holes(hole) & ~hole).any()
    # cached, but callers get their own copies
    img[:] = 0
    assert teaching_volume()[0].any()


@pytest.fixture(scope="module")
def slice_segmenter():
    import nbapp

    return nbapp.SliceSegmenter("default", device="cpu")


@pytest.mark.slow
def test_each_2d_parameter_moves_a_number_on_the_teaching_slice(slice_segmenter):
    """What 2d_teaching shows: the number each parameter moves on the middle slice."""
    from nbapp import SliceParams
    from nbapp.metrics import instance_metrics

    img, lab = teaching_volume()
    image, truth = img[24], lab[24]
    seg, p = slice_segmenter, SliceParams()

    def run(**kw):
        out = seg(image, p.replace(**kw))
        return out, len(np.unique(out)) - 1

    names = [o[0] for o in TEACHING_OBJECTS]
    ids = {n: i for i, n in enumerate(names, start=1)}
    fg = {t: int((run(seg_threshold=t)[0] > 0).sum()) for t in (0.3, 0.5, 0.8)}
    assert fg[0.3] > fg[0.5] > fg[0.8]
    faint = truth == ids["faint 2"]
    assert (run(seg_threshold=0.3)[0][faint] > 0).sum() > (run(seg_threshold=0.8)[0][faint] > 0).sum()
    # min distance: 1 over-splits the long one, 3 keeps it whole; 15 merges the touching pair
    long = truth == ids["long"]
    pieces = {d: np.count_nonzero(np.unique(run(min_distance=d)[0][long])) for d in (1, 3)}
    assert pieces[1] >= 3 and pieces[3] == 1
    pair = (truth == ids["touching A"]) | (truth == ids["touching B"])
    assert np.count_nonzero(np.unique(run(min_distance=15)[0][pair])) == 1
    assert np.count_nonzero(np.unique(run(min_distance=3)[0][pair])) >= 2
    # downsampling: the biggest that works is 1 here (8 nm pixels); 4 finds nothing
    counts = {d: run(downsampling=d)[1] for d in (1, 2, 4)}
    assert counts[1] > counts[2] > counts[4] == 0
    # fill holes fills the inclusion of the "hole" mitochondrion
    hole = truth == ids["hole"]
    assert (run(fill_holes=True)[0][hole] > 0).sum() > (run()[0][hole] > 0).sum()
    # fine boundaries move pixels between objects
    assert (run(fine_boundaries=True)[0] != run()[0]).sum() > 0
    f1 = instance_metrics(run()[0], truth)["f1"]
    assert 0.3 < f1 < 0.95  # harder than the demo (F1 1.000 there)


def test_the_cem_crops_ship_with_their_licence():
    """Issue 30 item 16: the five CEM500K crops (BSD-3-Clause) are a bundled sample."""
    from nbapp.samples import CEM_FOLDER, cem_crops

    crops = cem_crops()
    assert [n for n, _, _ in crops] == [f"mitochondria{i}" for i in range(1, 6)]
    for name, img, lab in crops:
        assert img.dtype == np.uint8 and img.ndim == 2 and img.shape == lab.shape
        assert max(img.shape) <= 224 and lab.max() >= 1 and img.std() > 2  # real EM, not blank
    assert "BSD 3-Clause" in (CEM_FOLDER / "LICENSE-BSD-3-Clause.txt").read_text()
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = data["tool"]["setuptools"]["package-data"]["nbapp"]
    assert "data/cem_mito_2d/LICENSE-BSD-3-Clause.txt" in shipped
    assert "data/cem_mito_2d/images/*.png" in shipped and "data/cem_mito_2d/masks/*.png" in shipped
