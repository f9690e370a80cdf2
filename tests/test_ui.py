"""The widget app without a browser: build it on a tiny model and a small volume, move the
controls, assert on the state, the views and the jobs (STYLE #13, #15, #16, #18)."""

from __future__ import annotations

import datetime
import io
import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("ipympl")
pytest.importorskip("ipyvolume")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from models import Recorder, TinyNet  # noqa: E402
from nbapp.jobs import JobState  # noqa: E402
from nbapp.models import default_config_path, load_model  # noqa: E402
from nbapp.params import LABELS  # noqa: E402
from nbapp.samples import demo_volume  # noqa: E402

pytestmark = [
    # bqscales (imported by ipyvolume) builds traits with constructor metadata at import time
    pytest.mark.filterwarnings("ignore:metadata .* was set from the constructor:DeprecationWarning"),
]

SHAPE = (16, 64, 64)


@pytest.fixture(scope="module")
def volume():
    img, _ = demo_volume(shape=SHAPE, n_mito=3)
    return img


def recorder_model():
    return load_model(Recorder(TinyNet()), device="cpu")


def make_app(volume, model=None, **kw):
    from nbapp.ui import App

    kw.setdefault("synchronous", True)
    app = App(volume=volume, model=model if model is not None else recorder_model(),
              device="cpu", **kw)
    return app


@pytest.fixture
def app(volume):
    a = make_app(volume)
    yield a
    a.close()


def descriptions(widget) -> list[str]:
    """Every ``description`` in a widget tree."""
    import ipywidgets as W

    out, todo = [], [widget]
    while todo:
        w = todo.pop()
        d = getattr(w, "description", None)
        if isinstance(d, str) and d:
            out.append(d)
        if isinstance(w, W.Box):
            todo.extend(w.children)
    return out


def small_lab(app):
    """Consensus settings that keep objects of the tiny random model."""
    st = app.state
    st.volume_params = st.volume_params.replace(
        consensus=st.volume_params.consensus.replace(min_size=10, min_extent=1, vote_threshold=1,
                                                     allow_one_view=True))


# ---------------------------------------------------------------- 2D

def test_app_segments_the_middle_slice_and_shows_every_spec_label(app):
    st = app.state
    assert st.data.shape == SHAPE and st.data.detected == "volume"
    r = st.result2d
    assert r.labels.shape == SHAPE[1:] and r.labels.dtype == np.int32
    assert r.index == SHAPE[0] // 2 and r.plane == "xy"
    assert r.count == np.count_nonzero(np.unique(r.labels))
    assert r.network_s > 0 and r.postprocess_s > 0 and not r.cached
    text = app.viewer2d.info.value
    assert f"<b>{r.count}</b> instances" in text and "network" in text and "post-processing" in text
    found = set(descriptions(app))
    missing = [label for label in LABELS.values() if label not in found]
    assert not missing
    assert st.model_info["parameters"] > 0 and "padding factor" in app.model_panel.info.value


def test_threshold_change_reuses_cached_heads_slice_change_runs_the_network(app):
    rec = app.state.model.module
    c = app.controls2d
    calls = rec.calls
    before = app.state.result2d
    c.widgets["seg_threshold"].value = 0.3
    c.widgets["center_threshold"].value = 0.2
    c.widgets["min_distance"].value = 7
    c.widgets["label_divisor"].value = 0
    assert rec.calls == calls
    r = app.state.result2d
    assert r is not before and r.cached and r.network_s == 0.0
    assert r.params.seg_threshold == 0.3 and r.params.min_distance == 7
    assert r.labels.max() < 10000  # divisor 0: ids from 1
    c.index.value = 3
    assert rec.calls == calls + 1 and app.state.result2d.index == 3
    c.plane.value = "xz"
    assert rec.calls == calls + 2 and app.state.result2d.labels.shape == (SHAPE[0], SHAPE[2])
    assert c.index.max == SHAPE[1] - 1
    c.widgets["downsampling"].value = 2  # 16 / 2 is under the padding factor: error, no crash
    assert app.state.status_level == "error" and "too small" in app.state.status


def test_viewer_updates_the_same_artists_in_place(app):
    v = app.viewer2d
    fig, image, overlay = v.figure, v.image, v.overlay
    old = overlay.get_array().copy()
    draws = v.draws
    app.controls2d.index.value = 2
    app.controls2d.plane.value = "yz"
    assert v.figure is fig and v.image is image and v.overlay is overlay
    assert list(v.ax.images) == [image, overlay, v.detail] and not v.detail.get_visible()
    assert v.draws == draws + 2
    assert overlay.get_array().shape == (SHAPE[0], SHAPE[1]) != old.shape
    np.testing.assert_array_equal(image.get_array(), app.state.result2d.image)
    app.controls2d.opacity.value = 0.8
    assert overlay.get_alpha() == 0.8


def test_slice_view_paints_what_colour_mapping_every_pixel_first_paints():
    """The viewer resamples to screen pixels before colour mapping (6x faster drawing); with
    nearest interpolation the picture must be the one of mapping all 1024^2 pixels first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from nbapp.ui.figures import label_display, setup_image_axes, show_image

    rng = np.random.default_rng(0)
    img = rng.random((1024, 1024)).astype(np.float32)
    lab = label_display(rng.integers(0, 300, (1024, 1024)))
    fig = Figure(figsize=(5.5, 5.5))
    canvas = FigureCanvasAgg(fig)
    base, over = setup_image_axes(fig.add_axes((0, 0, 1, 1)))
    show_image(base, img, (0.1, 0.9))
    show_image(over, lab)
    assert base.get_interpolation_stage() == over.get_interpolation_stage() == "data"
    pictures = []
    for stage in ("data", "rgba"):
        base.set_interpolation_stage(stage)
        over.set_interpolation_stage(stage)
        canvas.draw()
        pictures.append(np.asarray(canvas.buffer_rgba()).copy())
    assert pictures[0].shape == (550, 550, 4) and np.ptp(pictures[0][..., 0]) > 100
    np.testing.assert_array_equal(pictures[0], pictures[1])


def test_network_outputs_view_marks_the_detected_centres(app):
    hv = app.heads_view
    assert hv.widget.layout.display == "none"
    app.controls2d.show_heads.value = True
    assert hv.widget.layout.display is None
    r = app.state.result2d
    xs, _ = hv.centres.get_data()
    assert len(xs) == len(r.centres)
    # centres and objects are counted apart, and why they differ is said (issue 30 item 14)
    title = hv.axes[1].get_title()
    assert f"{len(r.centres)} centres -> {r.count} objects" in title and "pieces" in title
    np.testing.assert_allclose(hv.images[0].get_array(), r.heads.sem[0])
    assert hv.images[2].get_array().shape == (*r.heads.offsets.shape[1:], 3)


def test_compare_downsampling_fills_five_panels_enlarging_too(app):
    app.controls2d.compare.click()
    res = app.state.compare
    assert [c.downsampling for c in res] == [0.5, 1, 2, 4, 8]
    assert res[1].labels is not None and res[1].count == app.state.result2d.count
    assert res[0].labels.shape == res[1].labels.shape  # enlarged 2x, labels at image size
    assert res[4].labels is None and res[4].error  # 64 / 8 < padding factor 16
    assert all(c.f1 is None for c in res)  # no ground truth here: no score
    titles = [ax.get_title() for ax in app.compare_view.axes]
    assert len(titles) == 5 and titles[1].startswith("ds 1:") and "too small" in titles[4]
    assert titles[0].startswith("ds 0.5:")


def test_compare_downsampling_scores_each_factor_and_keeps_the_current_one():
    """Issue 30 item 6: with ground truth, F1 per factor and the best named; the current
    factor is always compared (and a sweep's grid holds the current value)."""
    from nbapp.metrics import headline_scores
    from nbapp.ui import App

    app = App(model=load_model("default", device="cpu"), device="cpu", synchronous=True)
    try:
        st = app.state
        st.slice_params = st.slice_params.replace(downsampling=16)
        app.controls2d.compare.click()
        res = st.compare
        assert [c.downsampling for c in res] == [1, 2, 4, 8, 16]
        gt = st.truth[st.index]
        assert res[-1].labels is None and res[-1].f1 is None  # 256 / 16 is too small
        for c in res[:-1]:
            assert c.f1 == pytest.approx(headline_scores(c.labels, gt)["f1"])
        best = max(res[:-1], key=lambda c: c.f1)
        assert f"best F1@0.5 at downsampling {best.downsampling:g} (now 16)" in st.status
        assert f"F1 {res[0].f1:.2f}" in app.compare_view.axes[0].get_title()
        st.slice_params = st.slice_params.replace(downsampling=1, center_threshold=0.12)
        app.controls2d.sweep_param.value = "center_threshold"
        app.controls2d.sweep.click()
        assert 0.12 in st.sweep["values"] and len(st.sweep["values"]) == 9
    finally:
        app.close()


def test_box_suggests_min_size_and_extent_and_apply_sets_them(app):
    v = app.viewer2d
    app.state.edited = np.zeros_like(app.state.result2d.labels)  # no object on the slice
    app.controls2d.box.value = True
    assert v.selector.get_active()
    v.selector.extents = (10, 40, 5, 25)  # x0, x1, y0, y1: a 20 x 30 box
    v._selected(None, None)
    sug = app.state.suggestion
    assert sug["min_size"] == 1200 and sug["min_extent"] == 3  # 20*30*(20/4)/2*0.8, 5-2
    assert "1200" in app.controls2d.suggestion.value and not app.controls2d.apply.disabled
    assert "from the box alone" in app.controls2d.suggestion.value
    app.controls2d.apply.click()
    cp = app.state.volume_params.consensus
    assert (cp.min_size, cp.min_extent) == (1200, 3)
    assert app.controls3d.widgets["min_size"].value == 1200
    app.controls3d.widgets["min_size"].value = 123  # the suggestion stays overridable
    assert app.state.volume_params.consensus.min_size == 123


def test_box_around_an_object_of_the_slice_measures_its_pixels(app):
    """A newcomer's loose box around a long, diagonal object suggested more voxels than any
    object had, and the 3D job then kept none: the object's own pixels are measured instead,
    however loose the box."""
    from nbapp.objects import suggest_from_mask

    labels = np.asarray(app.state.result2d.labels)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    target = int(ids[np.argmax(counts)])
    ys, xs = np.nonzero(labels == target)
    centre = ((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2)
    expected = suggest_from_mask(labels == target)
    for margin in (0, 10):  # tight, and 10 px loose on every side
        sug = app.session.suggest_from_box(np.ptp(ys) + 1 + 2 * margin, np.ptp(xs) + 1 + 2 * margin,
                                           centre=centre)
        assert (sug["min_size"], sug["min_extent"]) == (expected["min_size"],
                                                        expected["min_extent"])
        assert "object's pixels on this slice" in sug["filters_why"]


def test_box_on_an_object_of_the_3d_result_measures_it(app):
    """With a 3D result, the box's object is measured: the suggestion keeps it exactly."""
    st = app.state
    st.volume_params = st.volume_params.replace(orthoplane=False)
    app.session.run_3d()
    lab = st.labels3d
    ids, sizes = np.unique(lab[st.index][lab[st.index] > 0], return_counts=True)
    target = int(ids[np.argmax(sizes)])
    ys, xs = np.nonzero(lab[st.index] == target)
    sug = app.session.suggest_from_box(20, 20, centre=(float(ys[len(ys) // 2]),
                                                       float(xs[len(xs) // 2])))
    voxels = int((lab == target).sum())
    assert sug["min_size"] == int(0.8 * voxels) and "measured" in sug["filters_why"]
    from nbapp.tracking import filter_objects

    assert target in filter_objects(lab, sug["min_size"], sug["min_extent"])


@pytest.mark.parametrize("vs, median", [((30.0, 5.0, 5.0), 3), ((8.0, 8.0, 8.0), 7),
                                        ((4.0, 4.0, 4.0), 9)])
def test_voxel_size_suggests_the_median_filter_size(app, volume, vs, median):
    app.session.set_volume(volume, "v", voxel_size=vs)
    assert app.state.suggestion["median_size"] == median
    assert "Median Filter Size" in app.controls2d.suggestion.value
    app.controls2d.apply.click()
    assert app.state.volume_params.median_size == median
    assert app.controls3d.widgets["median_size"].value == median


def test_batch_mode_detects_a_stack_and_segments_every_image(app, volume):
    app.session.set_volume(volume[:3], "stack")
    st = app.state
    assert st.data.detected == "stack" and st.slice_params.batch_mode
    assert app.controls2d.widgets["batch_mode"].value and app.controls2d.plane.disabled
    app.controls2d.run_batch.click()
    assert st.batch_labels.shape == (3, *SHAPE[1:])
    app.controls2d.widgets["batch_mode"].value = False  # the same data as a volume
    assert app.session.effective_kind() == "volume" and not app.controls2d.plane.disabled


# ---------------------------------------------------------------- threads

def test_latest_request_wins_and_stale_results_are_dropped():
    from nbapp.ui.threads import LatestRunner

    runner = LatestRunner(debounce_s=0)
    started, gate = threading.Event(), threading.Event()
    ran, delivered = [], []

    def job(i):
        def fn():
            ran.append(i)
            if i == 1:
                started.set()
                gate.wait(10)
            return i
        return fn

    runner.submit("slice", job(1), lambda r, e: delivered.append(r))
    assert started.wait(10)
    for i in (2, 3, 4):
        runner.submit("slice", job(i), lambda r, e: delivered.append(r))
    gate.set()
    assert runner.wait_idle(10)
    runner.shutdown()
    assert ran == [1, 4]  # 2 and 3 were replaced while 1 ran
    assert delivered == [4]  # 1 finished after newer requests: stale, dropped


def test_debounce_coalesces_a_drag_into_one_run():
    from nbapp.ui.threads import LatestRunner

    runner = LatestRunner(debounce_s=60)  # only flush ends the wait: no sleeps, no timing
    delivered = []
    for v in range(5):
        runner.submit("slice", lambda v=v: v * 10, lambda r, e: delivered.append(r))
    assert runner.wait_idle(10)
    runner.shutdown()
    assert [k for k, _ in runner.ran] == ["slice"] and delivered == [40]


def test_call_in_ui_defers_worker_calls_to_the_kernel_loop(monkeypatch):
    from nbapp.ui import threads

    queued = []

    class Loop:
        def add_callback(self, fn, *args):
            queued.append((fn, args))

    monkeypatch.setattr(threads, "_kernel_loop", lambda: Loop())
    done = []
    t = threading.Thread(target=threads.call_in_ui, args=(lambda: done.append("worker"),))
    t.start()
    t.join()
    assert done == [] and len(queued) == 1
    fn, args = queued[0]
    fn(*args)  # what the loop does, in the main thread
    threads.call_in_ui(lambda: done.append("main"))
    assert done == ["worker", "main"]


def test_threaded_app_stays_responsive_and_shows_the_result(volume):
    a = make_app(volume, synchronous=False)
    try:
        assert a.session.runner2d.wait_idle(30)
        assert a.state.result2d is not None
        a.controls2d.widgets["seg_threshold"].value = 0.35
        a.controls2d.widgets["seg_threshold"].value = 0.4
        assert a.session.runner2d.wait_idle(30)
        assert a.state.result2d.params.seg_threshold == 0.4 and not a.state.busy2d
    finally:
        a.close()


# ---------------------------------------------------------------- 3D

def test_3d_job_feeds_progress_bars_and_shows_stacks_3d_view_and_table(app):
    small_lab(app)
    # before a result: no black panels titled "-" and no empty 3D box (they looked broken)
    app.view3d.ensure_figure()  # (what opening the 3D tab does)
    assert app.stacks_view.widget.layout.display == "none"
    assert app.view3d.figure not in app.view3d.widget.children
    assert not app.stacks_view.figure.canvas.toolbar_visible  # it covered the first panel
    seen = []
    app.state.observe(lambda c: seen.append(c.new), names=["job"])
    app.controls3d.run.click()
    st = app.state
    assert st.job.state == JobState.DONE, st.status
    assert any(s.state == JobState.RUNNING and s.planes for s in seen)
    bars = app.controls3d.progress.bars
    for p in ("xy", "xz", "yz"):
        assert bars[p].value == bars[p].max == SHAPE[("xy", "xz", "yz").index(p)]
    assert bars["all"].bar_style == "success"
    assert set(st.stacks) == {"xy", "xz", "yz"} and st.labels3d.shape == SHAPE
    n = int(np.count_nonzero(np.unique(st.labels3d)))
    assert n > 0 and len(st.table) == n
    assert app.table.html.value.count("<tr class='nbapp-obj'>") == n
    titles = [ax.get_title() for ax in app.stacks_view.axes]
    assert titles[3] == f"consensus: {n} objects" and all("objects" in t for t in titles)
    assert len(app.view3d.figure.meshes) == min(n, 64)
    assert app.stacks_view.widget.layout.display is None
    assert app.view3d.figure in app.view3d.widget.children
    assert not app.controls3d.rerun.disabled and "3D job done" in st.status
    row = st.table[0]
    assert set(row) == {"id", "class", "voxels", "bbox", "centroid", "extent"}
    assert row["class"] == "mito"  # the in-memory model's one class


def test_rerun_consensus_uses_stored_stacks_without_the_network(app, tmp_path):
    small_lab(app)
    app.session.run_3d()
    rec = app.state.model.module
    calls = rec.calls
    first = app.state.labels3d.copy()
    app.controls3d.widgets["vote_threshold"].value = 3
    app.controls3d.widgets["allow_one_view"].value = False
    app.controls3d.rerun.click()
    assert rec.calls == calls
    assert "consensus re-run" in app.state.status
    assert not np.array_equal(first, app.state.labels3d)
    assert len(app.state.table) == np.count_nonzero(np.unique(app.state.labels3d))


def test_filters_that_remove_every_object_say_so_and_how_to_get_them_back(app):
    """A Min Size above every object's size left "0 objects" and an F1 of 0 with no word of
    why: the status now says the stacks had objects and what removed them."""
    small_lab(app)
    app.session.run_3d()
    assert app.state.table and app.state.status_level == "ok"
    app.controls3d.widgets["min_size"].value = 10 ** 6
    app.controls3d.rerun.click()
    st = app.state
    assert st.table == [] and st.status_level == "warning"
    assert "The stacks had objects (xy " in st.status and "Min Size 1000000" in st.status
    assert "lower them and press Re-run consensus" in st.status
    app.controls3d.widgets["min_size"].value = 10
    app.controls3d.rerun.click()
    assert st.table and st.status_level == "ok" and "stacks had objects" not in st.status


def test_cancel_mid_job_leaves_the_state_cancelled(app):
    small_lab(app)
    st = app.state

    def cancel_on_first_progress(change):
        if change.new.state == JobState.RUNNING and change.new.planes:
            app.controls3d.cancel.click()

    st.observe(cancel_on_first_progress, names=["job"])
    app.session.run_3d()
    assert st.job.state == JobState.CANCELLED
    assert st.status == "3D job cancelled" and st.status_level == "warning"
    assert st.labels3d is None and app.controls3d.progress.bars["xy"].bar_style == "warning"
    assert not app.controls3d.run.disabled and app.controls3d.cancel.disabled


class GateNet(torch.nn.Module):
    """TinyNet that waits for ``gate`` on every forward pass once ``armed`` is set."""

    def __init__(self):
        super().__init__()
        self.inner = TinyNet()
        self.armed, self.gate, self.entered = threading.Event(), threading.Event(), threading.Event()

    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        if self.armed.is_set():
            self.entered.set()
            self.gate.wait(30)
        return self.inner(x, render_steps=render_steps, interpolate_ins=interpolate_ins)


def test_threaded_3d_job_runs_in_the_background_and_cancels(volume):
    net = GateNet()
    a = make_app(volume, model=load_model(net, device="cpu"), synchronous=False)
    try:
        assert a.session.runner2d.wait_idle(30)
        net.armed.set()
        assert a.session.run_3d()
        assert net.entered.wait(30)  # the job is inside the network, and we are back here
        assert a.session.jobs.busy and a.controls3d.cancel.disabled is False
        a.controls3d.cancel.click()
        net.gate.set()
        snap = a.session.jobs.wait(30)
        assert snap.state == JobState.CANCELLED and a.state.job.state == JobState.CANCELLED
        assert a.state.status == "3D job cancelled"
    finally:
        net.gate.set()
        a.close()


def test_3d_needs_a_volume(app, volume):
    app.session.set_volume(volume[8], "image")
    app.controls3d.run.click()
    assert app.state.status_level == "error"
    assert app.state.status.endswith("the data is one 2D image: load a volume, or use the 2D tab")
    app.session.set_volume(volume[:4], "stack")  # few slices, no voxel size: batch mode
    app.controls3d.run.click()
    assert "turn Batch mode off to segment it as a volume" in app.state.status


# ---------------------------------------------------------------- data, errors, exports

def test_path_box_errors_show_in_the_status_area(volume, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    np.save(root / "vol.npy", volume)
    (tmp_path / "secret.npy").write_bytes(b"x")
    (root / "link.npy").symlink_to(tmp_path / "secret.npy")
    a = make_app(volume, data_root=root)
    try:
        st, panel = a.state, a.data_panel

        def load(path):
            panel.path.value = path
            panel.load.click()
            return st.status_level, st.status

        assert load("missing.tif")[0] == "error" and "does not exist" in st.status
        assert load("../secret.npy")[0] == "error" and "outside the data root" in st.status
        assert load(str(tmp_path / "secret.npy"))[0] == "error" and "outside the data root" in st.status
        assert load("link.npy")[0] == "error" and "outside the data root" in st.status
        assert "nbapp-error" in a.status.line.value and "outside the data root" in a.status.line.value
        assert load("vol.npy")[0] == "ok" and st.data.name == "vol.npy"
        assert sum("[error]" in m for m in st.messages) == 4
        a.model_panel.spec.value = "no/such/model.pt"
        a.model_panel.load.click()
        assert st.status_level == "error" and "cannot load the model" in st.status
        a.model_panel.spec.value = "../model.pt"
        a.model_panel.load.click()
        assert "outside the data root" in st.status
    finally:
        a.close()


def _tiff_bytes(arr):
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def _png_bytes(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy_bytes(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("name, encode, kind", [("v.tif", _tiff_bytes, "volume"),
                                                ("s.png", _png_bytes, "image"),
                                                ("v.npy", _npy_bytes, "volume")])
def test_upload_reads_tiff_png_npy(app, volume, name, encode, kind):
    arr = volume if kind == "volume" else volume[4]
    data = encode(arr)
    app.data_panel.upload.set_trait("value", ({"name": name, "type": "", "size": len(data),
                                               "content": memoryview(data),
                                               "last_modified": datetime.datetime.now(datetime.timezone.utc)},))
    st = app.state
    assert st.status_level == "ok", st.status
    assert st.data.name == name and st.data.detected == kind
    np.testing.assert_array_equal(st.data.array, arr)
    assert app.data_panel.upload.value == ()


def test_upload_errors(volume):
    a = make_app(volume, upload_limit_mb=0.01)
    try:
        big = _npy_bytes(volume)
        a.session.load_upload("big.npy", big)
        assert a.state.status_level == "error" and "over the limit of 0.01 MB" in a.state.status
        a.session.load_upload("notes.txt", b"hello")
        assert "cannot read upload 'notes.txt'" in a.state.status
        a.session.load_upload("broken.tif", b"not a tiff")
        assert a.state.status_level == "error" and "broken.tif" in a.state.status
    finally:
        a.close()


def test_exports_go_inside_the_data_root(volume, tmp_path):
    import base64
    import csv
    import re

    import tifffile

    a = make_app(volume, data_root=tmp_path)
    out = tmp_path / "nbapp-exports"
    try:
        small_lab(a)
        a.session.run_3d()
        c = a.controls3d
        c.export_labels.click()  # issue 17 item 9: the defaults go to nbapp-exports/
        c.export_table.click()
        assert sorted(os.listdir(tmp_path)) == ["nbapp-exports"]
        assert sorted(os.listdir(out)) == ["labels.tif", "objects.csv"]
        c.export_path.value = "out.tif"
        c.export_labels.click()
        np.testing.assert_array_equal(tifffile.imread(out / "out.tif"), a.state.labels3d)
        # a page visitor downloads it through the page: the link holds the file itself
        link = re.search(r"download='out.tif' href='data:application/octet-stream;base64,([^']+)'",
                         c.download.value)
        assert link and base64.b64decode(link.group(1)) == (out / "out.tif").read_bytes()
        c.export_path.value = "out.zarr"
        c.export_labels.click()
        assert (out / "out.zarr").is_dir() and a.state.status_level == "ok"
        assert "is a folder on the server" in c.download.value
        assert "download='out.tif'" not in c.download.value  # the newer labels export's note
        # a taken name gets the next free one: nothing is replaced (issue 26 item 2)
        before = (out / "objects.csv").read_bytes()
        c.export_table.click()
        assert (out / "objects.csv").read_bytes() == before
        assert "objects-2.csv" in a.state.status
        with open(out / "objects-2.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0][:3] == ["id", "class", "voxels"] and len(rows) == len(a.state.table) + 1
        assert "download='objects-2.csv' href='data:text/csv;base64," in c.download.value
        c.export_path.value = "../escape.tif"
        c.export_labels.click()
        assert a.state.status_level == "error" and not (tmp_path.parent / "escape.tif").exists()
        assert "zarr" not in c.download.value  # no link to an export that failed
        assert "download='objects-2.csv'" in c.download.value  # the table's stays
        from nbapp.ui.controls import download_link

        assert "larger than the 0.001 MB the page downloads" in download_link(
            out / "out.tif", limit_mb=0.001)
    finally:
        a.close()


def test_missing_default_model_is_reported_in_the_status(volume):
    from nbapp.ui import App

    a = App(volume=volume, synchronous=True, device="cpu")
    try:
        if default_config_path().is_file():
            assert a.state.model is not None
        else:
            assert a.state.model is None and a.state.status_level == "error"
            assert "default model is missing" in a.state.status
            assert a.state.result2d is None and a.state.data is not None
    finally:
        a.close()


def test_unexpected_errors_show_type_and_traceback_in_the_log(app):
    def boom(change):
        raise RuntimeError("view exploded")

    from nbapp.ui.threads import call_in_ui

    call_in_ui(lambda: boom(None))
    assert app.state.status_level == "error" and "view update failed" in app.state.status
    assert any("RuntimeError: view exploded" in m for m in app.state.messages)
    try:
        {}["k"]
    except KeyError as exc:
        app.session.report(exc, "2D inference failed")
    assert app.state.status == "2D inference failed: KeyError: 'k'"
    assert "Traceback" in app.state.messages[-1]


class FailNet(torch.nn.Module):
    """TinyNet that raises ``message`` once ``armed`` (after the warm-up)."""

    def __init__(self, message: str):
        super().__init__()
        self.inner = TinyNet()
        self.message = message
        self.armed = False

    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        if self.armed:
            raise RuntimeError(self.message)
        return self.inner(x, render_steps=render_steps, interpolate_ins=interpolate_ins)


@pytest.mark.parametrize("message, shown", [
    ("shapes do not match", "3D job failed: model 'FailNet' failed on an input of shape"),
    ("CUDA out of memory. Tried to allocate 2 GiB", "3D job failed: out of memory"),
])
def test_failed_and_out_of_memory_jobs_show_in_the_status(volume, message, shown):
    net = FailNet(message)
    a = make_app(volume, model=load_model(net, device="cpu"))
    try:
        net.armed = True
        a.controls3d.run.click()
        assert a.state.job.state == JobState.FAILED
        assert a.state.status_level == "error" and a.state.status.startswith(shown)
        assert a.controls3d.progress.bars["xy"].bar_style == "danger"
        a.controls2d.index.value = 1  # 2D errors, too
        assert a.state.status.startswith("2D inference failed:")
    finally:
        a.close()


def test_bad_model_config_in_the_data_root_is_reported(volume, tmp_path):
    (tmp_path / "broken.yaml").write_text("class_names: {1: mito}\n")
    (tmp_path / "notes.txt").write_text("not a model")
    a = make_app(volume, data_root=tmp_path)
    try:
        assert a.model_panel.spec.options [0] == "default" and a.model_panel.spec.options[-1] == "broken.yaml"
        a.model_panel.spec.value = "broken.yaml"
        a.model_panel.load.click()
        assert a.state.status_level == "error" and "broken.yaml" in a.state.status
        assert a.state.model is not None  # the previous model stays in use
    finally:
        a.close()


def test_labelled_widgets_show_their_whole_label():
    import ipywidgets as W

    from nbapp.params import LABELS
    from nbapp.ui.controls import _labelled

    seen = []
    w = _labelled({"allow_one_view": W.Checkbox(False), "vote_threshold": W.IntSlider(2, 1, 3)},
                  lambda name: (lambda change: seen.append((name, change.new))))
    box, slider = w["allow_one_view"], w["vote_threshold"]
    assert box.description == LABELS["allow_one_view"] and box.tooltip == box.description
    assert box.indent is False and box.layout.width == "auto"
    assert slider.layout.width == "480px" and slider.style.description_width == "250px"
    slider.value = 3
    assert seen == [("vote_threshold", 3)]


# --------------------------------------------------------------------------------------------
# hardening (issue 15): uploads count real bytes, bombs are refused, nothing is left behind


def test_upload_limit_counts_the_bytes_received_not_the_claimed_size(volume):
    a = make_app(volume, upload_limit_mb=0.01)
    try:
        a.session.load_upload("big.npy", _npy_bytes(volume), size=1)
        assert a.state.status_level == "error" and "over the limit of 0.01 MB" in a.state.status
        assert a.state.data.name != "big.npy"
    finally:
        a.close()


def test_upload_bomb_is_refused_with_a_message_and_leaves_nothing(volume, monkeypatch):
    import tifffile

    from nbapp import memory

    buf = io.BytesIO()
    page = np.zeros((8192, 8192), np.uint8)
    tifffile.imwrite(buf, (page for _ in range(16)), shape=(16, 8192, 8192), dtype=np.uint8,
                     compression="zlib", photometric="minisblack")
    assert buf.tell() < 2_000_000
    monkeypatch.setattr(memory, "available_bytes", lambda: 700 << 20)  # a 700 MB container
    a = make_app(volume)
    try:
        a.session.load_upload("bomb.tif", buf.getvalue())
        st = a.state
        assert st.status_level == "error"
        assert "out of memory: bomb.tif decodes to 16x8192x8192 uint8 (1.0 GiB)" in st.status
        assert "nbapp-error" in a.status.line.value
        assert os.listdir(a.session._upload_dir) == []
    finally:
        a.close()


def test_uploaded_h5_cannot_read_server_files(volume, tmp_path):
    import h5py

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0" * 200)
    with h5py.File(tmp_path / "ext.h5", "w") as f:
        f.create_dataset("raw", shape=(32, 32), dtype="u1", external=[(str(secret), 0, 1024)])
    a = make_app(volume)
    try:
        a.session.load_upload("ext.h5", (tmp_path / "ext.h5").read_bytes())
        assert a.state.status_level == "error" and "external file" in a.state.status
        assert a.state.data.name != "ext.h5"
    finally:
        a.close()


def test_upload_folders_of_dead_kernels_are_removed_at_start_up(volume, tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from nbapp.ui.session import UPLOAD_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"{UPLOAD_PREFIX}{dead}-abc"
    live = tmp_path / f"{UPLOAD_PREFIX}{os.getpid()}-abc"
    for p in (stale, live):
        p.mkdir()
        (p / "big.tif").write_bytes(b"x")
    a = make_app(volume)
    try:
        assert not stale.exists() and live.exists()
    finally:
        a.close()


def test_upload_folder_is_removed_when_the_kernel_exits(tmp_path):
    import subprocess
    import sys

    code = ("import io, numpy as np\n"
            "from nbapp.ui.session import Session\n"
            "from nbapp.ui.state import AppState\n"
            "s = Session(AppState(), synchronous=True)\n"
            "buf = io.BytesIO(); np.save(buf, np.zeros((40, 40), np.uint8))\n"
            "s.load_upload('a.npy', buf.getvalue())\n"
            "print(s._upload_dir)\n")  # no close(): the interpreter just exits
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out.startswith(str(tmp_path)) and not os.path.exists(out)


def test_3d_job_of_a_closed_page_saves_its_labels_and_frees_the_kernel(volume, tmp_path,
                                                                        monkeypatch):
    """Served app: the job marks itself for the server; when the server says the page is gone
    (the orphan file), the finished job's labels go to nbapp-exports/ and the marker is
    removed, so that the server shuts the kernel down."""
    import tifffile

    from nbapp.jobs import MARKERS_ENV, JobMarker
    from nbapp.ui import session3d as session_mod

    markers = tmp_path / "markers"
    markers.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv(MARKERS_ENV, str(markers))
    monkeypatch.setattr(session_mod, "kernel_id", lambda: "k1")
    seen = []
    begin = JobMarker.begin

    def begin_then_close_the_page(self):
        begin(self)
        seen.append(self.running)
        self.orphan_path.touch()  # what the server does when the page's shutdown arrives

    monkeypatch.setattr(JobMarker, "begin", begin_then_close_the_page)
    a = make_app(volume, data_root=root)
    try:
        small_lab(a)
        assert a.session.run_3d()
        assert seen == [True]
        assert a.state.job.state == JobState.DONE
        saved = list((root / "nbapp-exports").glob("*_3d_*.tif"))
        assert len(saved) == 1
        np.testing.assert_array_equal(tifffile.imread(saved[0]), a.state.labels3d)
        assert "the page was closed during the 3D job: labels saved" in "".join(a.state.messages)
        assert os.listdir(markers) == []
    finally:
        a.close()


def test_3d_job_with_its_page_open_saves_nothing(volume, tmp_path, monkeypatch):
    from nbapp.jobs import MARKERS_ENV
    from nbapp.ui import session3d as session_mod

    monkeypatch.setenv(MARKERS_ENV, str(tmp_path))
    monkeypatch.setattr(session_mod, "kernel_id", lambda: "k2")
    a = make_app(volume, data_root=tmp_path)
    try:
        small_lab(a)
        assert a.session.run_3d()
        assert a.state.job.state == JobState.DONE
        assert os.listdir(tmp_path) == []
    finally:
        a.close()


def test_a_2d_error_clears_when_the_next_result_arrives():
    """Issue 17 item 2: Max objects per class below the count (overflow), then back."""
    from nbapp.samples import demo_volume
    from nbapp.ui import App

    a = App(volume=demo_volume()[0], device="cpu", synchronous=True)
    try:
        st, w = a.state, a.controls2d.widgets["label_divisor"]
        assert st.result2d.count > 3
        w.value = 3
        assert st.status_level == "error" and "label_divisor" in st.status
        assert "updating" not in a.viewer2d.info.value
        w.value = 10000
        assert st.status_level == "ok"
        assert st.status == f"2D inference: {st.result2d.count} instances"
        assert "updating" not in a.viewer2d.info.value
        assert f"<b>{st.result2d.count}</b> instances" in a.viewer2d.info.value
    finally:
        a.close()


def test_app_opens_on_the_2d_tab_when_ready_and_on_data_when_not(volume, tmp_path):
    """Issue 17 item 7: the first screen is the viewer once data and model are ready; a model
    that fails keeps the Data & model tab, where its error is."""
    a = make_app(volume)
    try:
        assert a.tabs.selected_index == 1
        assert "<details><summary>" in a.model_panel.info.value or \
            not a.state.model_info.get("description")
        assert a.children[1] is a.status.line and "nbapp-statusbar" in a.status.line._dom_classes
    finally:
        a.close()
    from nbapp.ui import App

    b = App(volume=volume, model=str(tmp_path / "missing.pt"), device="cpu", synchronous=True)
    try:
        assert b.tabs.selected_index == 0 and b.state.status_level == "error"
    finally:
        b.close()


def test_page_load_defers_the_3d_view_and_reuses_the_demo_volume(tmp_path):
    """Issue 17 item 11: ipyvolume is imported when the 3D tab is first opened, and the demo
    volume is generated once per machine (then read from the cache)."""
    import subprocess
    import sys

    code = ("import sys, time\n"
            "from nbapp.ui import App\n"
            "a = App(device='cpu', synchronous=True)\n"
            "print('ipyvolume' in sys.modules, a.view3d.figure is None)\n"
            "a.tabs.selected_index = 2\n"
            "print('ipyvolume' in sys.modules, a.view3d.figure is not None)\n"
            "a.close()\n")
    env = {**os.environ, "NBAPP_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, env=env, check=True).stdout.split("\n")
    assert out[:2] == ["False True", "True True"]
    cached = list((tmp_path / "demo").glob("demo-48x256x256-12-0-*.npz"))
    assert len(cached) == 1


def test_demo_volume_cache_is_exact_and_survives_a_broken_file(tmp_path, monkeypatch):
    from nbapp import samples

    monkeypatch.setenv("NBAPP_CACHE", str(tmp_path))
    shape = (8, 64, 64)
    fresh = samples._generate(shape, 2, 3)
    samples._demo_cached.cache_clear()
    first = samples._demo_cached(shape, 2, 3)  # generated and stored
    path = samples._disk_cache_file(shape, 2, 3)
    assert path.is_file()
    samples._demo_cached.cache_clear()
    again = samples._demo_cached(shape, 2, 3)  # read back
    for a, b, c in zip(fresh, first, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    path.write_bytes(b"not an npz")
    samples._demo_cached.cache_clear()
    np.testing.assert_array_equal(samples._demo_cached(shape, 2, 3)[0], fresh[0])
    samples._demo_cached.cache_clear()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --------------------------------------------------------------------------------------------
# the model zoo in the page


@pytest.fixture
def zoo_server(tmp_path, monkeypatch):
    from model_server import ModelServer
    from models import standin_bytes
    from nbapp.models import zoo
    from nbapp.models.config import MIRROR_ENV

    monkeypatch.setenv("NBAPP_CACHE", str(tmp_path / "cache"))
    mini = zoo.find("MitoNet_v1_mini")
    srv = ModelServer({"/" + mini.file_name: standin_bytes(1, 128),
                       "/MitoNet_v1_mini_quantized.pth": standin_bytes(1, 128, quantized=True)})
    monkeypatch.setenv(MIRROR_ENV, srv.url)
    yield srv
    srv.close()


def test_model_dropdown_offers_the_zoo_and_downloads_then_loads(volume, zoo_server):
    from nbapp.models import zoo

    app = make_app(volume)
    try:
        panel = app.model_panel
        assert panel.spec.options[:5] == ("default", "MitoNet_v1", "MitoNet_v1_mini",
                                          "NucleoNet_base_v2", "DropNet_base_v1")
        seen = []
        app.state.observe(lambda c: seen.append((c.new.state.value, c.new.done, c.new.total)),
                          names=["download"])
        assert "MitoNet_v1_mini</b> (mito, downloads once)" in panel.zoo.value
        panel.spec.value = "MitoNet_v1_mini"
        panel.load.click()
        assert "MitoNet_v1_mini</b> (mito)" in panel.zoo.value  # here now
        size = len(zoo_server.files["/MitoNet_v1_mini.pth"])
        assert ("done", size, size) in seen and seen[0][0] == "running"
        assert app.state.model_info["name"] == "MitoNet_v1_mini"
        assert app.state.model_info["padding_factor"] == 128
        assert app.state.status_level == "ok" and "MitoNet_v1_mini" in app.state.status
        assert panel.download_row.layout.display == "none" and not panel.load.disabled
        assert zoo.model_path("MitoNet_v1_mini").is_file()
        assert app.state.result2d is not None  # the slice is segmented with the new model
        panel.quantized.value = True
        panel.load.click()
        assert app.state.model_info["name"] == "MitoNet_v1_mini_quantized"
        assert app.state.model_info["device"] == "cpu"
    finally:
        app.close()


def test_model_download_shows_progress_and_cancels(volume, zoo_server):
    zoo_server.delay_s = 0.02  # about 0.5 s for the 24 KB stand-in
    app = make_app(volume, synchronous=False)
    try:
        panel = app.model_panel
        panel.spec.value = "MitoNet_v1_mini"
        panel.load.click()
        deadline = time.monotonic() + 10
        while app.state.download.done == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert panel.download_row.layout.display == "flex" and panel.load.disabled
        assert 0 < panel.bar.value < 1 and "MB" in panel.bar_text.value
        panel.cancel.click()
        app.session.downloads.wait(10)
        deadline = time.monotonic() + 5
        while "cancelled" not in app.state.status and time.monotonic() < deadline:
            time.sleep(0.02)
        assert app.state.download.state == JobState.CANCELLED
        assert "cancelled" in app.state.status and app.state.status_level == "warning"
        assert app.state.model_info["name"] != "MitoNet_v1_mini"
    finally:
        app.close()


def test_model_download_error_shows_in_the_status(volume, zoo_server):
    zoo_server.files.clear()
    app = make_app(volume)
    try:
        app.model_panel.spec.value = "MitoNet_v1_mini"
        app.model_panel.load.click()
        assert app.state.status_level == "error"
        assert "HTTP 404" in app.state.status and "nbapp models --path" in app.state.status
    finally:
        app.close()


# --------------------------------------------------------------------------------------------
# proofreading and fine-tuning in the page


def mouse(viewer, name, y, x):
    """A matplotlib mouse event at image pixel (y, x) on the 2D viewer."""
    from matplotlib.backend_bases import MouseEvent

    dx, dy = viewer.ax.transData.transform((x, y))
    viewer.canvas.callbacks.process(name, MouseEvent(name, viewer.canvas, dx, dy, button=1))


def test_proofread_tools_edit_the_visible_slice_and_undo(volume, tmp_path):
    app = make_app(volume, model=load_model("default", device="cpu"), data_root=tmp_path)
    try:
        st, v, tools = app.state, app.viewer2d, app.proofread
        labels = st.result2d.labels
        ids, sizes = np.unique(labels[labels > 0], return_counts=True)
        assert ids.size >= 2
        target = int(ids[np.argmax(sizes)])
        ys, xs = np.nonzero(labels == target)
        y, x = float(np.median(ys)), float(np.median(xs))
        mouse(v, "button_press_event", y, x)  # View tool: nothing happens
        assert st.edited is None
        tools.mode.value = "delete"
        mouse(v, "button_press_event", y, x)
        assert st.edited is not None and not (st.edited == target).any()
        assert "showing your edits" in v.info.value
        # the count is of what is shown (it said one more after a delete)
        assert v.info.value.startswith(f"<b>{ids.size - 1}</b> instances")
        shown = np.asarray(v.overlay.get_array())
        assert shown[int(y), int(x)] == 0  # the viewer shows the edit
        # paint a new object on background with a stroke
        bg = np.argwhere(ndimage_distance(st.edited == 0) > 8)[0]
        tools.mode.value = "paint"
        tools.brush.value = 3
        mouse(v, "button_press_event", float(bg[0]), float(bg[1]))
        mouse(v, "motion_notify_event", float(bg[0]), float(bg[1]) + 4)
        mouse(v, "button_release_event", float(bg[0]), float(bg[1]) + 4)
        new = int(st.edited[bg[0], bg[1]])
        assert new > labels.max() and (st.edited == new).sum() > 20
        tools.undo.click()
        assert st.edited[bg[0], bg[1]] == 0 and not (st.edited == target).any()
        # the edits stay with their slice when the slice changes and comes back
        index = st.index
        app.controls2d.index.value = index + 1 if index + 1 < volume.shape[0] else index - 1
        assert st.edited is None
        app.controls2d.index.value = index
        assert st.edited is not None and not (st.edited == target).any()
        tools.discard.click()
        assert st.edited is None
    finally:
        app.close()


def ndimage_distance(mask):
    from scipy import ndimage

    return ndimage.distance_transform_edt(mask)


def test_add_slice_and_fine_tune_make_the_tuned_model_active(volume, tmp_path):
    app = make_app(volume, model=load_model("default", device="cpu"), data_root=tmp_path)
    try:
        st, tools = app.state, app.proofread
        assert "no slices stored" in tools.summary.value
        labels = st.result2d.labels
        target = int(np.unique(labels[labels > 0])[0])
        ys, xs = np.nonzero(labels == target)
        tools.mode.value = "delete"
        mouse(app.viewer2d, "button_press_event", float(ys[0]), float(xs[0]))
        tools.add.click()
        stored = list((tmp_path / "nbapp-training").glob("*.npz"))
        assert len(stored) == 1 and "1 slice(s)" in tools.summary.value
        assert app.session.start_finetune(0.15)
        assert st.tuning.state == JobState.DONE, st.tuning.error
        assert tools.cancel.disabled and not tools.tune.disabled and tools.bar.value == 1.0
        assert tools.cancel.button_style == ""  # not coloured as if it could be clicked
        assert st.model_info["name"] == "tuned_1" and st.status_level == "ok", st.messages[-4:]
        assert app.model_panel.spec.value.endswith("tuned_1.yaml")  # the box names what is active
        assert "fine-tuned in" in st.status and "is active and saved as" in st.status
        # issue 30 item 8: the slice is too small for a held-out band, so the weights are
        # chosen on it (12 steps took it from 0.89 to 0.57 when the last ones were kept)
        held = st.tune_scores["held_out"]
        assert held["on"] == "trained slices" and "the 1 slice(s) it trained on" in st.status
        assert held["best"]["f1"] >= held["start"]["f1"]  # never worse than it started there
        assert ("(the starting weights, unchanged)" in st.status) == (held["best_step"] == 0)
        assert (tmp_path / "nbapp-training" / "models" / "tuned_1.yaml").is_file()
        assert set(st.tune_scores) >= {"before", "after", "steps"}
        assert "<svg" in tools.curve.value, (st.tuning.detail, st.messages[-6:])
        assert "before" in tools.scores.value
        assert st.result2d is not None and app.session.segmenter.engine.model is st.model
        assert st.edited is None  # the stored slice shows the tuned model's result now
        assert "showing your edits" not in app.viewer2d.info.value
    finally:
        app.close()


@pytest.mark.parametrize("worse", [False, True])
def test_fine_tune_with_ground_truth_scores_other_slices_and_warns_when_worse(
        tmp_path, monkeypatch, worse):
    """The stored slices are what it trained on (0.91 -> 1.00 in a walk-through while the
    ground truth of the slice fell 0.92 -> 0.83): where there is ground truth, slices it did not
    train on are scored too, and a drop there is a warning that says how to go back."""
    import nbapp.fewshot as fewshot
    from nbapp.ui import App

    real = fewshot.score_slices
    if worse:  # a tuned model that is worse on the held-out slices
        def fake(model, images, labels, ds=1, params=None, segmenter=None):
            out = real(model, images, labels, ds, params, segmenter)
            tuned = model is not app.state.model  # (the active one is the model before)
            return {**out, "f1": 0.5} if tuned and len(images) > 1 else out
        monkeypatch.setattr(fewshot, "score_slices", fake)
    app = App(model=load_model("default", device="cpu"), device="cpu", synchronous=True,
              data_root=tmp_path)
    try:
        st = app.state
        assert st.truth is not None
        app.proofread.add.click()
        # sliders far from the tuned model's best (issue 30 item 4: the old model's sliders
        # stayed, and the tuned model scored worse with them)
        st.slice_params = st.slice_params.replace(seg_threshold=0.9)
        assert app.session.start_finetune(0.1)
        assert st.tuning.state == JobState.DONE, st.tuning.error
        truth = st.tune_scores["truth"]
        assert truth["slices"] == 4 and set(truth) == {"slices", "which", "before", "after"}
        assert truth["which"] == "slices 9, 19, 28 and 38"  # named, not "4 other slices"
        assert "against the ground truth on slices 9, 19, 28 and 38 (not trained on)" in st.status
        best = st.tune_scores["thresholds"]
        assert best["on"] == "slices 9, 19, 28 and 38 (ground truth)"
        if not worse:  # (the worse variant's fake scores every setting alike)
            assert best["f1"] > best["current_f1"] and best["seg_threshold"] < 0.9
            assert "Apply tuned thresholds sets them" in st.status
            assert app.proofread.apply_thresholds.layout.display is None
            app.proofread.apply_thresholds.click()
            assert st.slice_params.seg_threshold == best["seg_threshold"]
            assert st.slice_params.center_threshold == best["center_threshold"]
        else:
            assert app.proofread.apply_thresholds.layout.display == "none"
        if worse:
            assert st.status_level == "warning" and "It is worse there than before" in st.status
            assert "load 'default' in the Data tab to go back" in st.status
        else:  # (how many steps fit in the time limit varies: the rule, not the outcome)
            dropped = truth["after"]["f1"] < truth["before"]["f1"] - 0.02
            assert st.status_level == ("warning" if dropped else "ok")
            assert ("worse" in st.status) == dropped
        assert "slices 9, 19, 28 and 38 vs ground truth" in app.proofread.scores.value
    finally:
        app.close()


def test_an_old_error_leaves_the_status_line_at_the_next_2d_result(app):
    """A failed model load stayed red at the top through later slider moves (walk-through)."""
    st = app.state
    assert not app.session.load_model("no_such_model_anywhere")
    assert st.status_level == "error" and "cannot load the model" in st.status
    assert "a model zoo name (`nbapp models` lists them)" in st.status
    assert st.status.endswith("loaded before stays active)") and st.model is not None
    assert "a model zoo name (`nbapp models` lists them)" in st.status
    assert st.status.endswith("loaded before stays active)") and st.model is not None
    st.slice_params = st.slice_params.replace(seg_threshold=0.6)
    assert st.status_level == "ok" and st.status.startswith("2D inference: ")
    assert any("cannot load the model" in m for m in st.messages)  # the log keeps it


def test_fine_tune_with_an_empty_training_set_says_so(app):
    assert not app.session.start_finetune(1.0)
    assert "training set is empty" in app.state.status


# --------------------------------------------------------------------------------------------
# live scores against ground truth (issue 18 item 8)


def test_demo_scores_live_and_sweeps_a_parameter():
    from nbapp.metrics import instance_metrics
    from nbapp.ui import App

    app = App(model=load_model("default", device="cpu"), device="cpu", synchronous=True)
    try:
        st = app.state
        assert st.truth is not None and st.score2d  # the demo brings its ground truth
        gt = st.truth[st.index]
        expect = instance_metrics(st.result2d.labels, gt)
        assert st.score2d["f1"] == pytest.approx(expect["f1"])
        assert f"F1@0.5 <b>{expect['f1']:.3f}</b>" in app.viewer2d.info.value
        # a threshold far too high loses objects: the score moves with the slider
        st.slice_params = st.slice_params.replace(seg_threshold=0.9)
        low = st.score2d["fg_iou"]
        st.slice_params = st.slice_params.replace(seg_threshold=0.5)
        assert st.score2d["fg_iou"] > low
        app.controls2d.sweep_param.value = "seg_threshold"
        app.controls2d.sweep.click()
        sw = st.sweep
        assert sw["param"] == "seg_threshold" and len(sw["values"]) == 9
        assert len(sw["f1"]) == 9 and max(sw["f1"]) >= st.score2d["f1"] - 1e-9
        assert "<svg" in app.controls2d.sweep_plot.value and "F1@0.5 " in st.status
        app.session.use_model(load_model("default", device="cpu"))
        assert st.sweep == {} and app.controls2d.sweep_plot.value == ""  # measured with the old one
        # the 3D job is scored too
        st.volume_params = st.volume_params.replace(orthoplane=False)
        app.session.run_3d()
        assert st.score3d and 0 <= st.score3d["f1"] <= 1 and "against the ground truth" in st.status
        # new data without truth: no scores, and a sweep says why
        app.session.set_volume(np.zeros((4, 64, 64), np.uint8), "blank")
        assert st.truth is None and st.score2d == {}
        app.session.sweep("seg_threshold")
        assert "needs ground truth" in st.status
    finally:
        app.close()


def test_ground_truth_file_is_checked(volume, tmp_path):
    import tifffile

    app = make_app(volume, data_root=tmp_path)
    try:
        tifffile.imwrite(tmp_path / "bad.tif", np.zeros((2, 3, 4), np.uint8))
        app.data_panel.truth.value = "bad.tif"
        app.data_panel.load_truth.click()
        assert app.state.status_level == "error" and "does not match" in app.state.status
        tifffile.imwrite(tmp_path / "float.tif", np.zeros(volume.shape, np.float32))
        app.session.load_truth("float.tif")
        assert "integer labels" in app.state.status
        tifffile.imwrite(tmp_path / "gt.tif", (volume > 128).astype(np.uint16))
        assert app.session.load_truth("gt.tif") and app.state.score2d
        assert app.session.sweep("nope") is None and "cannot sweep" in app.state.status
    finally:
        app.close()


# ---------------------------------------------------------------- volumes larger than memory

def test_a_volume_too_large_to_load_runs_block_by_block(volume, tmp_path, monkeypatch):
    """A file larger than the kernel's share stays on disk: the 2D tab reads slices, the 3D
    job runs block by block into nbapp-exports/NAME_3d.zarr, the views read the result lazily
    (the 3D view from its pyramid), and a .tif export is refused with the reason."""
    import zarr

    from nbapp.blockwise import BlockParams

    root = tmp_path / "root"
    root.mkdir()
    big = np.concatenate([volume, volume[::-1]], axis=0)  # 32 x 64 x 64
    arr = zarr.create_array(str(root / "big.zarr"), shape=big.shape, chunks=(8, 64, 64),
                            dtype=big.dtype)
    arr[...] = big
    monkeypatch.setenv("NBAPP_LAZY_ABOVE_MB", "0.01")
    a = make_app(volume, data_root=root)
    try:
        st = a.state
        a.session.block_params = BlockParams(block_size=(32, 32, 32))
        a.data_panel.path.value = "big.zarr"
        a.data_panel.load.click()
        assert st.status_level == "ok" and "slice by slice" in st.status
        assert not isinstance(st.data.array, np.ndarray) and st.data.shape == big.shape
        assert st.result2d is not None and st.result2d.labels.shape == big.shape[1:]
        assert st.blockwise and a.controls3d.blockwise.disabled
        small_lab(a)
        a.controls3d.run.click()
        assert st.job.state == JobState.DONE, st.status
        out = root / "nbapp-exports" / "big_3d.zarr"
        assert str(out) in st.status and st.job_output == str(out)
        bars = a.controls3d.progress
        assert bars.rows["blocks"].layout.display is None and bars.rows["xy"].layout.display == "none"
        # the network's slabs (xy 1, xz and yz 2 each: 64 slices in 2 slabs), tracking each
        # plane, counting and writing 4 blocks
        assert bars.bars["blocks"].value == bars.bars["blocks"].max == 5 + 3 + 4 + 4
        assert not isinstance(st.labels3d, np.ndarray) and st.labels3d.shape == big.shape
        labels = np.asarray(st.labels3d[...])
        n = int(labels.max())
        assert n > 0 and len(st.table) == n and st.table[0]["class"] == "mito"
        assert a.stacks_view.axes[3].get_title() == f"consensus: {n} objects"
        assert 0 < len(a.view3d.figure.meshes) <= min(n, 64)
        assert a.session.export_labels("nbapp-exports/copy.tif") is None
        assert "export to NAME.zarr" in st.status
        assert a.session.export_labels("nbapp-exports/copy.zarr") is not None
        assert a.session.export_table("nbapp-exports/objects.csv") is not None
    finally:
        a.close()


def test_block_by_block_on_loaded_data_gives_the_in_memory_labels(volume, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    a = make_app(volume, data_root=root)
    try:
        st = a.state
        small_lab(a)
        a.session.run_3d()
        in_memory = st.labels3d.copy()
        a.controls3d.blockwise.value = True
        a.session.run_3d()
        assert st.job.state == JobState.DONE, st.status
        assert np.array_equal(np.asarray(st.labels3d[...]), in_memory)
        assert (root / "nbapp-exports" / "array_3d.zarr").exists()
    finally:
        a.close()


def test_block_by_block_stacks_are_shown_and_their_consensus_re_runs_block_by_block(
        volume, tmp_path):
    """'Return stacks' on a block-by-block job: the per-plane stacks are written beside the
    labels and shown (read lazily, with their object counts); 'Re-run consensus' then runs
    block by block from them (no network) and gives the in-memory consensus."""
    from nbapp.volume import consensus, filter_stack

    root = tmp_path / "root"
    root.mkdir()
    a = make_app(volume, data_root=root)
    try:
        st = a.state
        small_lab(a)
        a.controls3d.widgets["return_stacks"].value = True
        a.session.run_3d()
        mem_stacks = {p: filter_stack(s, st.volume_params.consensus)
                      for p, s in st.stacks.items()}
        a.controls3d.blockwise.value = True
        a.session.run_3d()
        assert st.job.state == JobState.DONE, st.status
        exports = root / "nbapp-exports"
        assert "stacks beside it: array_3d_xy.zarr, array_3d_xz.zarr, array_3d_yz.zarr" \
            in st.status
        for i, plane in enumerate(("xy", "xz", "yz")):
            lazy = st.stacks[plane]
            assert not isinstance(lazy, np.ndarray)
            assert np.array_equal(np.asarray(lazy[...]), mem_stacks[plane])
            n = int(mem_stacks[plane].max())
            assert a.stacks_view.axes[i].get_title() == f"{plane}: {n} objects"
        assert not a.controls3d.rerun.disabled
        rec = st.model.module
        calls = rec.calls
        a.controls3d.widgets["vote_threshold"].value = 3
        a.controls3d.widgets["allow_one_view"].value = False
        a.controls3d.rerun.click()
        assert st.job.state == JobState.DONE, st.status
        assert rec.calls == calls  # no network
        assert "consensus re-run block by block done" in st.status
        assert np.array_equal(np.asarray(st.labels3d[...]),
                              consensus(mem_stacks, st.volume_params.consensus))
        assert all(not isinstance(s, np.ndarray) for s in st.stacks.values())
        assert (exports / "array_3d.zarr").exists()
    finally:
        a.close()


def test_the_viewer_grows_for_a_large_screen_or_a_projector(app):
    """Issue 17 item 8: the 2D viewer's size is the user's (the ipympl canvas does not follow
    the page's width by itself)."""
    from nbapp.ui.viewer2d import TOOLBAR_STRIP_IN, VIEWER_SIZES

    v = app.viewer2d
    strip = TOOLBAR_STRIP_IN
    assert tuple(v.figure.get_size_inches()) == (5.5 + strip, 5.5)
    assert [o[0] for o in v.size.options] == [name for name, _ in VIEWER_SIZES]
    v.size.value = 8.5
    assert app.state.viewer_inches == 8.5
    assert tuple(v.figure.get_size_inches()) == (8.5 + strip, 8.5)
    w, h = v.canvas.get_width_height()
    assert h == round(8.5 * v.figure.dpi) and w == round((8.5 + strip) * v.figure.dpi)
    # the image is square and starts right of the toolbar's strip (issue 30 item 2)
    x0, y0, x1, y1 = v.ax.get_window_extent().extents
    assert x0 == pytest.approx(strip * v.figure.dpi) and x1 - x0 == pytest.approx(y1 - y0)
    app.state.viewer_inches = 4.5
    assert v.size.value == 4.5 and tuple(v.figure.get_size_inches()) == (4.5 + strip, 4.5)
    assert v.ax.get_window_extent().x0 == pytest.approx(strip * v.figure.dpi)


def test_a_thin_stack_without_voxel_size_says_why_it_is_batch(volume):
    """Walk-through: a 3-slice stack became Batch mode with greyed planes, unexplained."""
    app = make_app(volume[:3])
    try:
        st = app.state
        assert st.slice_params.batch_mode and "taken as 3 separate 2D images" in " ".join(
            st.messages), st.messages[-3:]
        assert any("untick Batch mode in the 2D tab" in m for m in st.messages)
    finally:
        app.close()
    app = make_app(volume)  # a volume: no such sentence
    try:
        assert not any("separate 2D images" in m for m in app.state.messages)
    finally:
        app.close()


def test_the_object_table_is_silent_until_there_is_a_result(volume):
    """Walk-through: the 3D tab read "run a 3D job to see the objects in 3D no objects"."""
    app = make_app(volume)
    try:
        st = app.state
        assert app.table.html.value == "" and "run a 3D job" in app.view3d.note.value
        st.labels3d = np.zeros(volume.shape, np.int32)  # a result without objects
        assert "no objects" in app.table.html.value
    finally:
        app.close()


def test_the_viewer_takes_its_size_from_the_window_once(volume):
    """Issue 30 item 10: at 1366x768 the default viewer pushed the score line and fine-tune
    below the fold. The page reports its window (a hidden box typed into by one line of
    JavaScript); the first report picks the size, a later one or a user's choice wins."""
    app = make_app(volume)
    try:
        st, win = app.state, app.window
        assert "innerWidth + 'x' + innerHeight" in str(win.script.outputs[0]["data"])
        assert win.css_class in win.box._dom_classes and win.widget in app.children
        assert win.widget.layout.display == "none" and st.viewer_inches == 5.5
        win.box.value = "garbage"                  # ignored
        assert st.viewer_inches == 5.5
        win.box.value = "1366x768"
        assert st.viewer_inches == 4.0 and app.viewer2d.size.value == 4.0
        win.box.value = "1920x1080"                # once: later reports do not resize
        assert st.viewer_inches == 4.0
    finally:
        app.close()
    app = make_app(volume)
    try:
        app.viewer2d.size.value = 8.5              # the user chose before the page reported
        app.window.box.value = "1366x768"
        assert app.state.viewer_inches == 8.5
    finally:
        app.close()


def _faces_area_and_normals(m):
    v = np.stack([m["z"], m["y"], m["x"]], 1)
    a, b, c = (v[m["triangles"][:, k]] for k in range(3))
    n = np.cross(b - a, c - a)
    area = np.linalg.norm(n, axis=1)
    return area, n / np.maximum(area, 1e-12)[:, None]


@pytest.mark.parametrize("vs", [None, (32.0, 8.0, 8.0)])
def test_3d_meshes_are_smooth_surfaces_of_the_objects_not_staircases(vs):
    """Issue 17 item 8: ipyvolume shades a face by how much it looks at the camera, so the
    sideways steps of a binary mask's surface drew objects nearly black. A ball's surface must
    be round: few of its faces aligned with an axis, its extent the ball's."""
    from nbapp.ui.viewer3d import object_meshes

    z, y, x = np.ogrid[:64, :120, :120]
    r = 30.0
    zs = 1.0 if vs is None else vs[0] / vs[1]  # the ball is round in nm, flat in voxels
    ball = ((z - 32) * zs) ** 2 + (y - 60) ** 2 + (x - 60) ** 2 <= r ** 2
    lab = ball.astype(np.uint32)
    lab[2:4, 2:8, 2:8] = 2  # a small, flat object keeps a (closed) surface
    meshes = {m["id"]: m for m in object_meshes(lab, vs)}
    assert set(meshes) == {1, 2}
    area, normals = _faces_area_and_normals(meshes[1])
    aligned = (np.abs(normals).max(1) > np.cos(np.deg2rad(10))) @ area / area.sum()
    assert aligned < 0.25, aligned  # the binary mask's staircase: 0.37 / 0.40 (now 0.12 / 0.17)
    m = meshes[1]
    for axis, centre in (("z", 32 * zs), ("y", 60), ("x", 60)):
        lo, hi = m[axis].min(), m[axis].max()
        assert abs((lo + hi) / 2 - centre) < 2.5 and abs((hi - lo) / 2 - r) < 4, (axis, lo, hi)
    assert len(meshes[2]["triangles"]) > 0


def test_3d_view_keeps_the_volume_proportions_and_looks_at_it_from_an_angle():
    """ipyvolume maps each axis's limits onto the same box side: equal spans keep a 48x256x256
    volume a slab (unequal ones made it a cube and its objects 5x taller)."""
    from nbapp.ui.viewer3d import equal_aspect_limits, view_from

    lims = equal_aspect_limits((48, 256, 128), (32.0, 8.0, 8.0))  # 192 x 256 x 128 in 8 nm
    assert lims == [(-32.0, 224.0), (0.0, 256.0), (-64.0, 192.0)]
    assert equal_aspect_limits((10, 20, 40)) == [(-15.0, 25.0), (-10.0, 30.0), (0.0, 40.0)]
    p = np.array(view_from(0.0, 0.0, 1.0, (0.0, 0.0, 2.0)))
    np.testing.assert_allclose(p, [0.0, 0.0, 2.0], atol=1e-12)
    p = np.array(view_from(-25.0, -35.0, 1.5, (0.0, 0.0, 2.0)))
    assert np.isclose(np.linalg.norm(p), 3.0) and p[0] < 0 and p[1] < 0 and p[2] > 0


def test_merge_picks_belong_to_one_tool_slice_and_model_and_far_objects_need_a_second_click(app):
    """Issue 30 item 1: Merge, click A, View, Merge, click B far away merged them."""
    from nbapp.proofread import LabelEditor

    st, s = app.state, app.session
    lab = np.zeros(st.result2d.labels.shape, np.int32)
    lab[5:15, 5:15], lab[5:15, 15:25], lab[40:50, 40:50] = 1, 2, 3  # 1 touches 2; 3 is far
    s._editors[s._edit_key()] = LabelEditor(lab)
    ids = lambda: set(np.unique(s._editors[s._edit_key()].labels)) - {0}  # noqa: E731
    st.edit_mode = "merge"
    s.edit_click(10, 10)
    assert "object 1 picked" in st.status
    st.edit_mode = "view"
    assert "merge pick cleared" in st.status
    st.edit_mode = "merge"
    s.edit_click(45, 45)  # a first pick again, not a merge of 3 into 1
    assert ids() == {1, 2, 3} and "object 3 picked" in st.status
    s.edit_click(10, 10)  # 1 is far from 3: said, not done
    assert ids() == {1, 2, 3} and st.status_level == "warning"
    assert "objects 1 and 3 do not touch" in st.status and "click object 1 again" in st.status
    s.edit_click(10, 10)  # the repeated click merges them
    assert ids() == {2, 3} and "object 1 merged into 3" in st.status
    s.edit_click(10, 20)  # touching objects merge at once
    s.edit_click(10, 10)
    assert ids() == {2}
    s.edit_click(10, 10)
    st.index = st.index + 1  # another slice: the pick is gone
    assert s._merge_from is None


def test_the_live_score_is_of_what_is_shown_edits_included():
    """Issue 30 item 3: after six deletions the line still scored the model's output."""
    from nbapp.metrics import headline_scores
    from nbapp.ui import App

    app = App(model=load_model("default", device="cpu"), device="cpu", synchronous=True)
    try:
        st, s = app.state, app.session
        gt = st.truth[st.index]
        assert st.score2d["of"] == "the model's output"
        assert "the model's output vs ground truth" in app.viewer2d.info.value
        st.edit_mode = "delete"
        for i in np.unique(st.result2d.labels)[1:4]:  # delete three objects
            y, x = np.argwhere(st.result2d.labels == i)[0]
            s.edit_click(float(y), float(x))
        expect = headline_scores(st.edited, gt)
        assert st.score2d["of"] == "your edits"
        assert st.score2d["f1"] == pytest.approx(expect["f1"])
        assert st.score2d["f1"] < headline_scores(st.result2d.labels, gt)["f1"]
        assert f"your edits vs ground truth F1@0.5 <b>{expect['f1']:.3f}</b>" in \
            app.viewer2d.info.value
        # a threshold moved while the edits are shown: the score stays that of the edits
        st.slice_params = st.slice_params.replace(seg_threshold=0.8)
        assert st.score2d["f1"] == pytest.approx(expect["f1"])
        s.discard_edits()
        assert st.score2d["of"] == "the model's output"
    finally:
        app.close()


def test_download_links_of_both_exports_stay_until_other_data_is_loaded(volume, tmp_path):
    """Issue 30 item 14: only the last export had a link, and a link of the previous data set
    stayed."""
    a = make_app(volume, data_root=tmp_path)
    try:
        small_lab(a)
        a.session.run_3d()
        c = a.controls3d
        c.export_labels.click()
        c.export_table.click()
        assert "download='labels.tif'" in c.download.value
        assert "download='objects.csv'" in c.download.value
        c.export_labels.click()  # the newer labels export replaces the older's link
        assert "download='labels-2.tif'" in c.download.value
        assert "download='labels.tif'" not in c.download.value
        a.session.load_demo(shape=(8, 64, 64), n_mito=2)
        assert c.download.value == ""
    finally:
        a.close()


def test_per_slice_ground_truth_is_counted_and_scored_slice_by_slice(volume, tmp_path):
    """Issue 30 item 5: 'ground truth loaded (67 labels)' for a stack of 321 objects, and a
    3D score of 0.020 for slices that score 0.6-0.7."""
    import tifffile

    from skimage.segmentation import relabel_sequential

    from nbapp.metrics import slice_metrics

    app = make_app(volume, data_root=tmp_path)
    try:
        small_lab(app)
        app.session.run_3d()
        labels = app.state.labels3d
        # per-slice labels of the result itself: each slice numbered from 1
        per_slice = np.stack([relabel_sequential(z)[0] for z in labels]).astype(np.uint16)
        tifffile.imwrite(tmp_path / "gt2d.tif", per_slice, photometric="minisblack")
        assert app.session.load_truth("gt2d.tif")
        n = int(sum(np.count_nonzero(np.unique(z)) for z in per_slice))
        assert f"ground truth loaded: {n} objects in {len(labels)} slices, per-slice labels" \
            in app.state.status
        app.session.run_3d()
        sc = app.state.score3d
        assert sc["of"] == "slice by slice"
        assert sc["f1"] == pytest.approx(slice_metrics(app.state.labels3d, per_slice)["f1"])
        assert sc["f1"] > 0.9 and "against the ground truth slice by slice F1@0.5" in \
            app.state.status
    finally:
        app.close()


def test_a_thin_stack_gets_a_3d_setting_that_runs_and_a_refusal_that_says_what_works(volume):
    """Issue 30 item 9: ortho-plane refused a 5-slice stack with 'use less downsampling',
    which cannot help, and Apply suggestion gave settings the 3D job then refused."""
    a = make_app(volume[:5])
    try:
        st, s = a.state, a.session
        s.set_voxel_size("40, 8, 8")  # a serial-section stack: the data is a volume
        st.slice_params = st.slice_params.replace(batch_mode=False)
        assert st.volume_params.orthoplane
        s.run_3d()
        assert st.status_level == "error"
        assert "this stack has 5 slices: too few for the xz view" in st.status
        assert "single-plane xy" in st.status and "less downsampling" not in st.status
        st.suggestion = {**st.suggestion, "median_size": 3}
        s.apply_suggestion()
        assert not st.volume_params.orthoplane and "ortho-plane off" in st.status
        s.run_3d()
        assert st.labels3d is not None and st.labels3d.shape == volume[:5].shape, st.status
    finally:
        a.close()


def test_apply_tuned_thresholds_before_a_fine_tune_says_so(app):
    assert not app.session.apply_tuned_thresholds()
    assert "no better thresholds to apply: fine-tune first" in app.state.status
    assert app.proofread.apply_thresholds.layout.display == "none"


def test_an_export_writes_what_is_shown_and_says_what_it_is(volume, tmp_path):
    """Walk-through: exported labels dropped the visitor's proofreading edits, and a stack's
    export held one slice without saying so."""
    import tifffile

    a = make_app(volume, data_root=tmp_path)
    try:
        st, s = a.state, a.session
        ids = np.unique(st.result2d.labels)[1:]
        assert ids.size >= 1
        st.edit_mode = "delete"
        y, x = np.argwhere(st.result2d.labels == ids[0])[0]
        s.edit_click(float(y), float(x))
        target = s.export_labels("edited.tif")
        out = tifffile.imread(target)
        np.testing.assert_array_equal(out, st.edited)
        assert not (out == ids[0]).any()
        assert f"labels of xy slice {st.index} only with your edits (run the 3D job, or Run " \
               "batch, to export every slice) written to" in st.status
        small_lab(a)
        s.run_3d()
        s.export_labels("volume.tif")
        assert "labels of the 3D result written to" in st.status
    finally:
        a.close()
