"""End to end: ``nbapp app`` (Voila on 127.0.0.1) driven in Debian's Chromium by Playwright.

The tests share one page (loading it starts a kernel and the model) and run in file order:
load, labels, 2D key press, 3D run, errors; the last one opens and closes a page of its own.
Each checks that the page raised no error. With the default model they also write the README
screenshots to docs/screenshots/.

``NBAPP_E2E_MODEL=FILE.yaml`` runs them with another model (its folder is copied into the data
root).
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from browser import MODEL_ENV, AppPage, missing, watch

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]

#: Every parameter label of SPEC sections 2 and 3 that the app must show.
SPEC_LABELS = (
    "Segmentation Confidence Threshold", "Center Confidence Threshold", "Centers Minimum Distance",
    "Fine boundaries", "Max objects per class", "Image Downsampling", "Batch mode",
    "Median Filter Size", "Min Size", "Min Box Extent", "Voxel Vote Threshold Out of 3",
    "Permit detections found in 1 stack into consensus", "Return xy, xz, yz stacks",
    "Inference plane", "Run ortho-plane", "Semantic only", "Fill holes in segmentation",
)


def needs_model(app) -> None:
    """Skip while the default model is not in the installation (as tests/test_cli.py does)."""
    error = app.load_times["error"]
    if error and "default model is missing" in error:
        pytest.skip(f"the default model is not bundled yet: {error}")
    assert error is None, error


def assert_no_page_errors(app) -> None:
    assert app.rec.problems() == []
    assert app.rec.unexpected_external() == []


def screenshot(app, name: str) -> None:
    """Write docs/screenshots/NAME (the README's pictures: default model only)."""
    if os.environ.get(MODEL_ENV):
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    app.page.locator(".nbapp-app").screenshot(path=str(SCREENSHOTS / name))


def not_blank(png: bytes) -> bool:
    """True when a PNG has more than one colour (something was drawn)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    lo, hi = zip(*img.getextrema())
    return any(h - l > 16 for l, h in zip(lo, hi))


def coloured_share(png: bytes) -> float:
    """Share of a picture's pixels drawn in strong colour (saturation above 0.4)."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float)
    hi = a.max(2)
    return float((((hi - a.min(2)) / np.maximum(hi, 1)) > 0.4).mean())


def dark_share_of_objects(png: bytes) -> float:
    """Of a 3D view's coloured pixels (the objects; the white background and the black box
    lines are not coloured), the share drawn dark (brightest channel under 40 %)."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float) / 255
    hi, lo = a.max(2), a.min(2)
    sat = (hi - lo) / np.maximum(hi, 1e-6)
    objects = (sat > 0.4) | ((hi < 0.25) & (sat > 0.15))
    assert objects.sum() > 500, "no objects in the 3D view"
    return float((objects & (hi < 0.4)).sum() / objects.sum())


def test_page_loads_with_the_model_and_no_errors(app, server):
    needs_model(app)
    assert app.load_times["model_s"] > 0
    assert "loaded on" in app.status().inner_text()
    assert app.page.locator(".nbapp-model-info").count() == 1
    assert_no_page_errors(app)
    assert "Error at server while executing cell" not in server.log_text()


def test_every_spec_parameter_label_is_in_the_page(app):
    text = app.text()
    missing_labels = [label for label in SPEC_LABELS if label not in text]
    assert missing_labels == []
    for tab, labels in (("2D parameter testing", SPEC_LABELS[:7] + SPEC_LABELS[-2:]),
                        ("3D inference", SPEC_LABELS[7:-2])):
        app.tab(tab)
        for label in labels:
            assert app.page.get_by_text(label).filter(visible=True).count() >= 1, label
    assert_no_page_errors(app)


def test_arrow_key_on_the_threshold_slider_repaints_the_viewer(app):
    needs_model(app)
    app.tab("2D parameter testing")
    app.wait_for_text("instances")
    slider = app.slider("Segmentation Confidence Threshold")
    readout = slider.locator(".widget-readout")
    canvas = app.viewer_canvas()
    app.page.wait_for_function("c => (c.__paints || 0) > 0", arg=canvas.element_handle())
    before_value = readout.inner_text()
    before_image = app.image_signature(canvas)
    slider.locator(".noUi-handle").focus()
    changed = False
    for _ in range(6):  # one step can leave every pixel as it was; the repaint must happen
        app.page.keyboard.press("ArrowRight")
        ms = app.wait_for_paint_after_key(canvas)
        assert ms > 0
        if app.image_signature(canvas) != before_image:
            changed = True
            break
    assert changed, "the viewer was repainted but its image never changed"
    assert float(readout.inner_text()) > float(before_value)
    assert "network cached" in app.page.locator(".nbapp-app").inner_text()
    screenshot(app, "app_2d.png")
    assert_no_page_errors(app)


def test_3d_run_shows_the_stacks_and_a_webgl_view(app):
    needs_model(app)
    app.tab("3D inference")
    page = app.page
    canvases = page.locator(".jupyter-matplotlib-canvas-div canvas:visible")
    assert canvases.count() == 0  # no black "xy: -" panels before there is a result
    page.locator("button:visible").filter(has_text=re.compile(r"^\s*Run\s*$")).click()
    page.wait_for_function(
        "/job \\d+: (done|failed|cancelled)/.test(document.body.innerText)", timeout=600_000)
    assert re.search(r"job \d+: done", page.locator(".nbapp-app").inner_text())
    app.wait_for_text("objects shown")  # the 3D view follows the job's end
    body = page.locator(".nbapp-app").inner_text()
    assert body.count("tracking done") == 3 and "consensus done" in body, body[-2000:]
    app.wait_for_draw(canvases.first, 0)  # the xy / xz / yz / consensus panels were drawn
    assert "objects shown" in body and " objects" in body
    gl = page.locator("canvas:visible").evaluate_all(
        "cs => cs.filter(c => /webgl/.test(c.__ctxType || '') && c.width > 0 && c.height > 0)"
        ".map(c => c.__ctxType)")
    assert gl, "no WebGL canvas in the 3D tab"
    webgl = [c for c in page.locator("canvas:visible").all()
             if "webgl" in (c.evaluate("c => c.__ctxType || ''"))]
    webgl[0].scroll_into_view_if_needed()
    view = webgl[0].screenshot()
    assert not_blank(view), "the WebGL 3D view is blank"
    # issue 17 item 8: the objects were drawn 60 % nearly black (a cube-stretched volume, the
    # steps of binary-mask surfaces); now about 15 %, the rims of the round surfaces
    assert dark_share_of_objects(view) < 0.3
    # issue 30 item 11: a walk-through saw a solid RGB cube hide the meshes after this job;
    # here (and with WebGL 1 only, or without float textures) the objects cover about 4 %
    assert coloured_share(view) < 0.25, coloured_share(view)
    page.set_viewport_size({"width": 1400, "height": 1700})
    screenshot(app, "app_3d.png")
    page.set_viewport_size({"width": 1400, "height": 1000})
    # the export reaches the visitor's computer through the page (no access to the server's disk)
    page.locator("button:visible", has_text="Export labels").click()
    link = page.locator("a.nbapp-download")
    link.wait_for(timeout=60_000)
    with page.expect_download(timeout=60_000) as got:
        link.click()
    import tifffile

    labels = tifffile.imread(got.value.path())
    assert labels.shape == (48, 256, 256) and labels.max() > 0
    assert_no_page_errors(app)


@pytest.mark.parametrize("path, needle", [
    ("no_such_volume.tif", "does not exist"),
    ("not_an_image.tif", "not_an_image.tif"),
    ("/etc/passwd", "data root"),
])
def test_errors_show_in_the_page(app, path, needle):
    app.tab("Data & model")
    box = app.page.locator(".widget-text:visible", has=app.page.locator("label", has_text="Path"))
    box.locator("input").fill(path)
    app.page.locator("button:visible").filter(has_text=re.compile(r"^\s*Load\s*$")).click()
    app.page.wait_for_function(
        "t => { const s = document.querySelector('.nbapp-status.nbapp-error');"
        " return s && s.textContent.includes(t); }", arg=needle, timeout=60_000)
    assert needle in app.status().inner_text()
    assert_no_page_errors(app)


def test_the_status_line_stays_in_view_at_1366x768(app):
    """Issue 17 item 6: an error caused by a button shows where the user is looking, also
    after scrolling down a long tab."""
    page = app.page
    page.set_viewport_size({"width": 1366, "height": 768})
    try:
        for tab in ("Data & model", "3D inference"):
            app.tab(tab)
            page.mouse.wheel(0, 2000)  # scroll to the bottom of the tab
            page.wait_for_timeout(300)  # let the scroll settle (bounded)
            box = app.status().bounding_box()
            assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= 768, box
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})
        page.mouse.wheel(0, -4000)


def test_closing_the_tab_shuts_its_kernel_down(server, browser):
    """The page's shutdown request on unload passes the XSRF check (voila issue 1458)."""
    ctx, rec = browser
    page = ctx.new_page()
    watch(page, rec)
    other = AppPage(page, rec)
    other.open(server.url)
    kernel = page.evaluate("JSON.parse(document.getElementById('jupyter-config-data')"
                           ".textContent).kernelId")
    assert f"Kernel started: {kernel}" in server.log_text()
    page.close(run_before_unload=True)
    deadline = time.monotonic() + 30
    while f"Kernel shutdown: {kernel}" not in server.log_text():
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.2)  # polling the server log, bounded by the deadline
    assert "403 POST /voila/api/shutdown" not in server.log_text()


#: The page's scroll box (Voila scrolls an element, not the document).
SCROLL_BOX = "document.querySelector('#rendered_cells') || document.scrollingElement"


def test_a_page_opened_at_1366x768_fits_the_2d_tab_and_keeps_the_status_line_on_top(
        server, browser):
    """Issue 30 item 10: at 1366x768 the default viewer pushed the score line and fine-tune
    controls below the fold, and when scrolled, the viewer's toolbar and canvas drew over the
    sticky status line."""
    ctx, rec = browser
    page = ctx.new_page()
    watch(page, rec)
    page.set_viewport_size({"width": 1366, "height": 768})
    other = AppPage(page, rec)
    try:
        needs_model(type("A", (), {"load_times": other.open(server.url)}))
        other.tab("2D parameter testing")
        size = page.locator(".widget-dropdown:visible", has=page.locator("label", has_text="Viewer"))
        page.wait_for_function("s => s.options[s.selectedIndex].text.startsWith('compact')",
                               arg=size.locator("select").element_handle(), timeout=30000)
        tune = page.locator("button:visible", has_text="Fine-tune").first
        page.wait_for_timeout(500)  # the canvas takes its new size (bounded)
        box = tune.bounding_box()
        assert box["y"] + box["height"] <= 768, box  # in view without scrolling
        count = page.locator(".widget-html:visible", has_text="instances ·").first.bounding_box()
        assert count["y"] + count["height"] <= 768, count  # the count and score line too
        size.locator("select").select_option(label="large (1920 wide)")  # room to scroll
        canvas = other.viewer_canvas()
        page.wait_for_function("c => c.getBoundingClientRect().height > 650",
                               arg=canvas.element_handle(), timeout=60000)
        page.evaluate(f"() => ({SCROLL_BOX}).scrollBy(0, 300)")
        page.wait_for_timeout(300)
        cb = canvas.bounding_box()
        page.mouse.move(cb["x"] + cb["width"] / 2, cb["y"] + cb["height"] / 2)  # the toolbar shows
        page.wait_for_timeout(600)
        line = other.page.locator(".nbapp-statusbar").first.bounding_box()
        assert cb["y"] < line["y"] + line["height"], "not scrolled under the status line"
        for x in (cb["x"] + 5, cb["x"] + 20, cb["x"] + cb["width"] / 2):  # toolbar, image
            for y in (line["y"] + 2, line["y"] + line["height"] / 2):
                on_top = page.evaluate("([x, y]) => !!document.elementFromPoint(x, y)"
                                       ".closest('.nbapp-statusbar')", [x, y])
                assert on_top, (x, y, line)
        if line["y"] >= 4:  # nothing of the image shows in the page's padding above the line
            from PIL import Image

            above = np.asarray(Image.open(io.BytesIO(page.screenshot(clip={
                "x": cb["x"], "y": 0, "width": cb["width"], "height": line["y"]}))).convert("L"))
            assert above.min() > 235, above.min()
    finally:
        page.close(run_before_unload=True)
    assert rec.problems() == []


def test_controls_line_up_and_no_label_is_cut_at_1366x768(app):
    """Issue 17 item 8: slider tracks of one width and start, whole button labels, progress
    bars of one length."""
    page = app.page
    page.set_viewport_size({"width": 1366, "height": 768})
    try:
        app.tab("2D parameter testing")
        tracks = page.evaluate(
            "() => [...document.querySelectorAll('.nbapp-app .widget-hslider')]"
            ".filter(e => e.offsetParent).map(e => { const t = e.querySelector("
            "'.slider-container').getBoundingClientRect(); return [Math.round(t.left), "
            "Math.round(t.width)]; })")
        assert len(tracks) >= 5 and len({tuple(t) for t in tracks}) == 1, tracks
        for tab in ("2D parameter testing", "3D inference", "Data & model"):
            app.tab(tab)
            cut = page.evaluate(
                "() => [...document.querySelectorAll('.nbapp-app button')]"
                ".filter(b => b.offsetParent && b.scrollWidth > b.clientWidth + 1)"
                ".map(b => b.textContent.trim())")
            assert cut == [], (tab, cut)
        app.tab("3D inference")
        bars = page.evaluate(
            "() => [...document.querySelectorAll('.nbapp-app .widget-hprogress .progress')]"
            ".filter(e => e.offsetParent).map(e => Math.round(e.getBoundingClientRect().width))")
        assert len(bars) == 4 and len(set(bars)) == 1, bars
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})


def test_results_below_the_fold_come_into_view_and_the_log_shows_its_end_at_1366x768(app):
    """Walk-through findings: "Network outputs" and "Compare downsampling" drew 650-900 px
    below the fold, so the buttons seemed to do nothing; the log stayed scrolled to its top
    with the newest entries hidden."""
    needs_model(app)
    page = app.page
    page.set_viewport_size({"width": 1366, "height": 768})
    try:
        app.tab("2D parameter testing")
        page.mouse.wheel(0, -4000)
        heads = page.locator("button:visible", has_text="Network outputs")
        if "mod-active" in (heads.get_attribute("class") or ""):
            heads.click()  # (another test left it on)
        heads.click()
        page.wait_for_function("() => { const e = document.querySelector('.nbapp-heads'); "
                               "if (!e) return false; const r = e.getBoundingClientRect(); "
                               "return r.height > 0 && r.top < innerHeight && r.bottom > 0; }",
                               timeout=20000)
        page.mouse.wheel(0, -4000)
        for _ in range(12):  # a dozen log entries: more than the log box shows at once
            page.locator("button:visible", has_text="Compare downsampling").click()
            app.wait_for_status("compared downsampling")
        page.wait_for_function("() => { const e = document.querySelector('.nbapp-compare'); "
                               "const r = e.getBoundingClientRect(); "
                               "return r.height > 0 && r.top < innerHeight && r.bottom > 0; }",
                               timeout=20000)
        page.locator(".nbapp-app").get_by_text("Log", exact=True).last.click()
        log = page.locator(".nbapp-log")
        log.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        overflow, last_visible = log.evaluate(
            "e => { const box = e.getBoundingClientRect(); const range = document.createRange(); "
            "range.selectNodeContents(e); const rects = [...range.getClientRects()]; "
            "const last = rects[rects.length - 1]; "
            "return [e.scrollHeight > e.clientHeight, last.bottom <= box.bottom + 1]; }")
        assert overflow and last_visible
        assert_no_page_errors(app)
    finally:
        heads = page.locator("button:visible", has_text="Network outputs")
        if "mod-active" in (heads.get_attribute("class") or ""):
            heads.click()  # off again: the later tests' screenshots are of the plain tab
        page.set_viewport_size({"width": 1400, "height": 1000})


def test_drawing_a_box_does_not_move_the_viewer(app):
    """Issue 17 item 8: the box tool's suggestion text wraps inside the controls' column."""
    needs_model(app)
    page = app.page
    app.tab("2D parameter testing")
    canvas = app.viewer_canvas()
    before = canvas.bounding_box()
    page.locator("button:visible").filter(has_text=re.compile(r"^\s*Draw box\s*$")).click()
    x, y = before["x"] + before["width"] * 0.3, before["y"] + before["height"] * 0.3
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 60, y + 40, steps=5)
    page.mouse.up()
    app.wait_for_text("Min Size")
    after = canvas.bounding_box()
    assert (round(after["x"]), round(after["y"])) == (round(before["x"]), round(before["y"]))
    page.locator("button:visible").filter(has_text=re.compile(r"^\s*Draw box\s*$")).click()


def test_the_viewer_grows_on_a_full_hd_screen(app):
    """Issue 17 item 8: at 1920x1080 the "Viewer" size makes the 2D viewer larger (the
    projector size), in the page, without errors; back to medium afterwards."""
    needs_model(app)
    page = app.page
    page.set_viewport_size({"width": 1920, "height": 1080})
    try:
        app.tab("2D parameter testing")
        canvas = app.viewer_canvas()
        before = canvas.bounding_box()
        size = page.locator(".widget-dropdown:visible", has=page.locator("label", has_text="Viewer"))
        size.locator("select").select_option(label="projector (1920x1080)")
        page.wait_for_function("([c, w]) => c.getBoundingClientRect().width > 1.45 * w",
                               arg=[canvas.element_handle(), before["width"]], timeout=60000)
        after = canvas.bounding_box()
        # larger, and still on the screen: no scrolling needed to see all of it or to get back
        assert after["width"] >= 1.5 * before["width"]
        assert after["x"] + after["width"] <= 1920 and after["y"] + after["height"] <= 1080
        assert size.bounding_box()["y"] < after["y"]
        screenshot(app, "viewer_projector_1920.png")
        size.locator("select").select_option(label="medium")
        page.wait_for_function("([c, w]) => Math.abs(c.getBoundingClientRect().width - w) < 2",
                               arg=[canvas.element_handle(), before["width"]], timeout=60000)
        assert_no_page_errors(app)
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})


def _image_point(canvas, row: float, col: float, shape) -> tuple[float, float]:
    """Page coordinates of image pixel (row, col) on the viewer's canvas (the image fills the
    square figure: its axes span the whole canvas)."""
    box = canvas.bounding_box()
    return (box["x"] + (col + 0.5) / shape[1] * box["width"],
            box["y"] + (row + 0.5) / shape[0] * box["height"])


def test_proofread_add_and_fine_tune_in_the_page(app):
    """Issue 16: delete an object, paint one, add the slice, fine-tune for half a minute; the
    viewer then shows the tuned model's result."""
    import numpy as np
    from scipy import ndimage

    from nbapp.samples import demo_volume

    needs_model(app)
    page = app.page
    app.tab("2D parameter testing")
    _, truth = demo_volume()
    index = truth.shape[0] // 2
    lab = truth[index]
    ids, sizes = np.unique(lab[lab > 0], return_counts=True)
    ys, xs = np.nonzero(lab == ids[np.argmax(sizes)])
    canvas = app.viewer_canvas()

    def tool(name):
        page.locator(".widget-toggle-buttons:visible button", has_text=name).first.click()

    tool("Delete")
    page.mouse.click(*_image_point(canvas, float(np.median(ys)), float(np.median(xs)), lab.shape))
    app.wait_for_status("deleted")
    tool("Paint")
    free = ndimage.distance_transform_edt(np.pad(lab == 0, 1))[1:-1, 1:-1]  # edges count too
    r, c = np.unravel_index(np.argmax(free), lab.shape)
    step = max(2.0, free[r, c] / 3)  # a stroke that stays on background, inside the image
    x, y = _image_point(canvas, r, c, lab.shape)
    x2, y2 = _image_point(canvas, r + step, c + step, lab.shape)
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x2, y2, steps=6)
    page.mouse.up()
    try:
        app.wait_for_status("(new)", timeout_s=60)
    except Exception:
        raise AssertionError(f"no new object painted; status: {app.status().inner_text()!r}")
    assert "showing your edits" in app.text()
    tool("View")
    page.locator("button:visible", has_text="Add slice to training set").click()
    app.wait_for_status("added to the training set")
    assert "1 slice(s)" in app.text()
    screenshot(app, "proofread.png")
    minutes = page.locator(".widget-text:visible", has=page.locator("label", has_text="Minutes"))
    minutes.locator("input").fill("0.5")  # the shortest the page allows
    minutes.locator("input").press("Tab")
    before = app.draws(canvas)
    # issue 30 item 10: the page jumped to the top during a fine-tune (the scroll position is
    # sampled every 100 ms from the click to the end)
    page.evaluate(f"() => ({SCROLL_BOX}).scrollBy(0, 200)")
    page.evaluate(f"() => {{ const b = {SCROLL_BOX}; window.__tops = [b.scrollTop]; "
                  "window.__sampler = setInterval(() => window.__tops.push(b.scrollTop), 100); }")
    page.locator("button:visible", has_text="Fine-tune").click()
    app.wait_for_status("fine-tuning", timeout_s=30)
    status = app.wait_for_status("is active and saved as", timeout_s=300)
    tops = page.evaluate("() => { clearInterval(window.__sampler); return window.__tops; }")
    assert tops[0] > 0 and min(tops) >= tops[0] - 50, (tops[0], min(tops))
    assert "fine-tuned in" in status and "F1@0.5 on the stored slices" in status
    app.wait_for_draw(canvas, before)
    page.wait_for_function("() => document.querySelector('.nbapp-loss') !== null", timeout=30000)
    assert "showing your edits" not in app.text()  # the viewer shows the tuned model's result
    app.tab("Data & model")
    assert "tuned_1" in page.locator(".nbapp-model-info").first.inner_text()
    app.tab("2D parameter testing")
    page.set_viewport_size({"width": 1400, "height": 1500})  # the scores table too
    page.wait_for_timeout(1000)
    screenshot(app, "finetuned.png")
    page.set_viewport_size({"width": 1400, "height": 1000})
    assert_no_page_errors(app)


def test_no_control_sits_over_the_image(app):
    """Issue 30 item 2: the zoom toolbar covered the image's left edge (about 35 px), so objects
    there could not be edited; the image now starts right of the toolbar."""
    needs_model(app)
    page = app.page
    page.set_viewport_size({"width": 1366, "height": 768})
    try:
        app.tab("2D parameter testing")
        canvas = app.viewer_canvas()
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # shows it
        figure = page.locator(".jupyter-matplotlib-figure:visible", has=canvas).first
        bar = figure.locator(".jupyter-matplotlib-toolbar").first
        page.wait_for_timeout(500)  # the toolbar's fade-in (bounded)
        tb, cb = bar.bounding_box(), canvas.bounding_box()
        assert tb is not None and cb is not None
        image_left = cb["x"] + cb["width"] - cb["height"]  # the image is square, at the right
        assert image_left > cb["x"] + 20  # a strip for the toolbar
        assert tb["x"] + tb["width"] <= image_left + 1, (tb, cb)
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})
