"""Big slices in the page (issue 29 item 2): the region to segment for a view, and the 2D tab
showing an overview and segmenting the region in view as the user zooms and pans."""

from __future__ import annotations

import numpy as np
import pytest
from models import Recorder, TinyNet

from nbapp import region
from nbapp.inference import SliceSegmenter
from nbapp.models import load_model
from nbapp.params import SliceParams
from nbapp.samples import demo_volume

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


# --- the region for a view ---------------------------------------------------------------------

@pytest.mark.parametrize("view,shape,ds,expected", [
    (None, (300, 200), 1, (0, 300, 0, 200)),                   # small enough: all of it
    ((-0.5, 99.5, 49.5, 149.5), (300, 200), 1, (0, 100, 50, 150)),  # exactly the pixels shown
    ((10.2, 20.7, 10.0, 30.0), (300, 200), 1, (0, 32, 4, 36)),  # grown to the model's 32 px
    ((10.2, 20.7, 10.0, 30.0), (300, 200), 2, (0, 64, 0, 64)),  # 32 model px at downsampling 2
    ((500, 900, -300, -100), (300, 200), 1, (268, 300, 0, 32)),  # off the slice: nearest corner
    ((99.5, -0.5, 0, 50), (300, 200), 1, (0, 100, 0, 51)),      # inverted y axis: the same
])
def test_region_for_view(view, shape, ds, expected):
    assert region.region_for_view(view, shape, ds, 32, max_pixels=200 * 300) == expected


def test_a_view_too_large_shrinks_about_its_centre_keeping_its_shape():
    y0, y1, x0, x1 = region.region_for_view((999.5, 2999.5, 1999.5, 5999.5), (8000, 8000), 1,
                                            max_pixels=1000 * 1000)
    assert (y1 - y0) * (x1 - x0) <= 1000 * 1000
    assert (x1 - x0) == pytest.approx(2 * (y1 - y0), abs=2)
    assert (y0 + y1) / 2 == pytest.approx(2000, abs=1) and (x0 + x1) / 2 == pytest.approx(4000, abs=1)
    # at downsampling 2 four times the slice pixels fit
    view = (999.5, 2999.5, 1999.5, 3999.5)
    assert region.region_for_view(view, (8000, 8000), 2, max_pixels=1000 * 1000) == \
        (1000, 3000, 2000, 4000)
    assert region.region_for_view(view, (8000, 8000), 1, max_pixels=1000 * 1000) == \
        (1500, 2500, 2500, 3500)


def test_big_and_overview():
    assert region.is_big((2049, 2048)) and not region.is_big((2048, 2048))
    assert not region.is_big((4096, 4096), 2) and region.is_big((4096, 4096), 1)
    assert region.overview_step((2048, 100)) == 1 and region.overview_step((2049, 100)) == 2
    assert region.overview_step((20000, 300), max_side=1000) == 20


# --- the page ----------------------------------------------------------------------------------

@pytest.fixture
def big_app(monkeypatch):
    """The 2D tab on a 2D image that counts as big (limits lowered so that a 256 x 320 image
    is big): the network is a counting random model."""
    from nbapp.ui import App

    monkeypatch.setattr(region, "REGION_MAX_PIXELS", 96 * 96)
    monkeypatch.setattr(region, "OVERVIEW_MAX_SIDE", 128)
    vol, truth = demo_volume(shape=(3, 256, 320), n_mito=12, seed=3)
    image = np.ascontiguousarray(vol[1])
    rec = Recorder(TinyNet())
    app = App(volume=image, model=load_model(rec, device="cpu"), device="cpu", synchronous=True)
    yield app, image, rec, truth[1]
    app.close()


def test_a_big_slice_shows_an_overview_and_segments_the_centre_region(big_app):
    app, image, rec, _ = big_app
    r = app.state.result2d
    assert r.full_shape == (256, 320) and r.overview_step == 3
    y0, y1, x0, x1 = r.region
    assert (y1 - y0) * (x1 - x0) <= 96 * 96 and (y0 + y1) / 2 == pytest.approx(128, abs=1)
    assert (x0 + x1) / 2 == pytest.approx(160, abs=1)
    np.testing.assert_array_equal(r.image, image[y0:y1, x0:x1])
    np.testing.assert_array_equal(r.overview, image[::3, ::3])
    # the region's labels are what the API gives for the same crop with the slice's grey range
    seg = SliceSegmenter(app.state.model)
    want = seg(image[y0:y1, x0:x1], SliceParams(), intensity=app.state.data.intensity)
    np.testing.assert_array_equal(r.labels, want)
    v = app.viewer2d
    assert v.detail.get_visible() and v.frame.get_visible()
    assert v.overlay.get_extent() == [x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5]
    assert v.image.get_extent() == [-0.5, 320.5, 257.5, -0.5]  # 86 x 107 pixels of 3
    assert v.ax.get_xlim() == (-0.5, 319.5) and v.ax.get_ylim() == (255.5, -0.5)
    assert f"region y {y0}-{y1}, x {x0}-{x1} of the 256 x 320 slice" in v.info.value


def test_zooming_segments_the_region_in_view_and_sliders_reuse_it(big_app):
    app, image, rec, _ = big_app
    v, st = app.viewer2d, app.state
    calls = rec.calls
    v.ax.set_xlim(9.5, 79.5)
    v.ax.set_ylim(69.5, 19.5)
    r = st.result2d
    assert r.region == (20, 70, 10, 80)
    np.testing.assert_array_equal(r.image, image[20:70, 10:80])
    assert rec.calls <= calls + 2  # x then y limits: at most one run each
    assert v.overlay.get_extent() == [9.5, 79.5, 69.5, 19.5]
    assert v.ax.get_xlim() == (9.5, 79.5)  # the zoom is the user's: not reset
    calls = rec.calls
    app.controls2d.widgets["seg_threshold"].value = 0.3
    assert rec.calls == calls and st.result2d.cached and st.result2d.region == (20, 70, 10, 80)
    # a small zoom that shows the same pixels asks for nothing
    v.ax.set_xlim(9.55, 79.45)  # the same pixels in view: nothing to do
    assert rec.calls == calls
    # another plane or data: back to the whole slice
    st.view = None
    app.controls2d.widgets["seg_threshold"].value = 0.5
    assert st.result2d.region != (20, 70, 10, 80)


def test_scores_and_edits_of_a_region_use_its_own_pixels(big_app):
    app, image, rec, truth = big_app
    st, s, v = app.state, app.session, app.viewer2d
    st.truth = truth
    v.ax.set_xlim(99.5, 179.5)
    v.ax.set_ylim(159.5, 99.5)
    r = st.result2d
    assert r.region == (100, 160, 100, 180)
    from nbapp.metrics import headline_scores

    s.score_2d()
    assert st.score2d["f1"] == pytest.approx(headline_scores(r.labels, truth[100:160, 100:180])["f1"])
    # a delete click at slice coordinates (150, 150) deletes the region's object there
    lab = np.zeros(r.labels.shape, np.int32)
    lab[40:60, 40:60] = 7  # slice pixels 140-160, 140-160
    from nbapp.proofread import LabelEditor

    s._editors[s._edit_key()] = LabelEditor(lab)
    st.edit_mode = "delete"

    class Click:  # what matplotlib gives the viewer
        inaxes, button, xdata, ydata = v.ax, 1, 150.0, 150.0

    v._press(Click())
    assert "object 7 deleted" in st.status and not st.edited.any()


def test_another_slice_of_a_big_volume_keeps_the_zoom_and_another_plane_shows_all(monkeypatch):
    from nbapp.ui import App

    monkeypatch.setattr(region, "REGION_MAX_PIXELS", 96 * 96)
    vol, _ = demo_volume(shape=(28, 256, 320), n_mito=12, seed=3)
    app = App(volume=vol, model=load_model(TinyNet(), device="cpu"), device="cpu",
              synchronous=True)
    try:
        v, st = app.viewer2d, app.state
        v.ax.set_xlim(9.5, 79.5)
        v.ax.set_ylim(69.5, 19.5)
        assert st.result2d.region == (20, 70, 10, 80)
        app.controls2d.index.value = 5
        r = st.result2d
        assert r.index == 5 and r.region == (20, 70, 10, 80)
        np.testing.assert_array_equal(r.image, vol[5, 20:70, 10:80])
        assert v.ax.get_xlim() == (9.5, 79.5) and v.ax.get_ylim() == (69.5, 19.5)
        app.controls2d.plane.value = "xz"  # 28 x 320: not big, shown whole
        r = st.result2d
        assert r.region is None and r.labels.shape == (28, 320)
        assert not v.detail.get_visible() and not v.frame.get_visible()
        assert v.ax.get_xlim() == (-0.5, 319.5) and v.ax.get_ylim() == (27.5, -0.5)
    finally:
        app.close()
