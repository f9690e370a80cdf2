"""A big 2D slice in the page (issue 29 item 2): it shows as an overview, the centre region is
segmented, and zooming with the viewer's toolbar segments the region in view. A server of its
own, with a 2304 x 2304 px mosaic of the shipped CEM crops in its data root (more model-input
pixels than the page segments at once at downsampling 1)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from browser import AppPage, chromium, watch  # noqa: E402
from test_browser import assert_no_page_errors, needs_model, screenshot  # noqa: E402

pytestmark = pytest.mark.browser

SIDE = 2304
REGION = re.compile(r"region y (\d+)-(\d+), x (\d+)-(\d+) of the 2304 x 2304 slice")


@pytest.fixture(scope="module")
def page_app(tmp_path_factory):
    import tifffile

    from app_server import running_app
    from nbapp.samples import cem_crops

    root = tmp_path_factory.mktemp("data_root")
    crops = [c[1] for c in cem_crops() if c[1].shape == (224, 224)]
    reps = -(-SIDE // 224)
    rows = [np.concatenate([crops[(i + j) % 4][:, ::(-1) ** j] for j in range(reps)], axis=1)
            for i in range(reps)]
    tifffile.imwrite(root / "big.tif", np.concatenate(rows, axis=0)[:SIDE, :SIDE])
    with running_app(tmp_path_factory.mktemp("server"), root) as srv, \
            chromium(tmp_path_factory.mktemp("profile")) as (ctx, rec):
        page = ctx.new_page()
        watch(page, rec)
        app = AppPage(page, rec)
        app.load_times = app.open(srv.url)
        yield app
        page.close(run_before_unload=True)


def _region(text: str) -> tuple[int, ...]:
    m = REGION.search(text)
    assert m, text[-1500:]
    return tuple(int(v) for v in m.groups())


def test_a_big_slice_segments_the_region_in_view_as_you_zoom(page_app):
    app = page_app
    needs_model(app)
    page = app.page
    page.set_viewport_size({"width": 1366, "height": 768})
    viewer = page.locator(".jupyter-matplotlib-canvas-div canvas").first  # in the hidden 2D tab
    drawn = app.draws(viewer)
    app.load_path("big.tif")
    try:
        app.wait_for_status("loaded big.tif", 120)
        app.tab("2D parameter testing")
        app.wait_for_text("of the 2304 x 2304 slice", 240)
    except Exception:
        app.page.screenshot(path="/tmp/big_slice_failed.png")
        raise AssertionError(f"status: {app.status().inner_text()!r}")
    first = _region(page.locator(".nbapp-app").inner_text())
    assert first == (128, 2176, 128, 2176)  # the centre, 2048 px a side
    canvas = app.viewer_canvas()
    canvas.scroll_into_view_if_needed()
    app.wait_for_draw(canvas, drawn)  # the big slice, not the demo still
    page.wait_for_timeout(500)
    screenshot(app, "big_slice_overview.png")
    cb = canvas.bounding_box()
    side = cb["height"]
    left = cb["x"] + cb["width"] - side  # the image is square, right of the toolbar strip

    def point(row, col):
        return left + (col + 0.5) / SIDE * side, cb["y"] + (row + 0.5) / SIDE * side

    page.mouse.move(*point(SIDE / 2, SIDE / 2))  # the toolbar shows on hover
    figure = page.locator(".jupyter-matplotlib-figure:visible", has=canvas).first
    zoom = figure.locator("button[title^='Zoom to rectangle']").first
    zoom.click()
    before = app.draws(canvas)
    page.mouse.move(*point(100, 150))
    page.mouse.down()
    page.mouse.move(*point(700, 900), steps=8)
    page.mouse.up()
    try:
        page.wait_for_function(
            "() => /region y \\d+-\\d+, x \\d+-\\d+ of the 2304/.test(document.querySelector("
            "'.nbapp-app').innerText) && !/region y 128-2176, x 128-2176/.test(document."
            "querySelector('.nbapp-app').innerText)", timeout=120_000)
    except Exception:
        page.screenshot(path="/tmp/big_slice_zoom_failed.png")
        raise AssertionError(REGION.search(page.locator(".nbapp-app").inner_text()))
    y0, y1, x0, x1 = _region(page.locator(".nbapp-app").inner_text())
    # the rectangle dragged (rows 100-700, columns 150-900), widened to the viewer's square
    assert y0 <= 140 and y1 >= 660 and x0 <= 190 and x1 >= 860, (y0, y1, x0, x1)
    assert (y1 - y0) * (x1 - x0) < 0.3 * 2048 ** 2, (y0, y1, x0, x1)
    app.wait_for_draw(canvas, before)
    screenshot(app, "big_slice_zoomed.png")
    assert_no_page_errors(app)
