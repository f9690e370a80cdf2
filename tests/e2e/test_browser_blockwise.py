"""A volume larger than the kernel's share, in the page: it stays on disk, its 3D job runs block
by block with a progress bar of its parts, Cancel and Run again resume, and the result is shown
(read lazily). A server of its own: the page's "large" threshold and block size are set small
(``NBAPP_LAZY_ABOVE_MB``, ``NBAPP_BLOCK_SIZE``) so that a 4 MB volume shows it in a minute."""

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


@pytest.fixture(scope="module")
def page_app(tmp_path_factory):
    import zarr

    from app_server import running_app
    from nbapp.samples import demo_volume

    root = tmp_path_factory.mktemp("data_root")
    vol = demo_volume()[0]
    big = np.concatenate([vol, vol[::-1]], axis=0)  # 96 x 256 x 256
    arr = zarr.create_array(str(root / "big.zarr"), shape=big.shape, chunks=(16, 256, 256),
                            dtype=big.dtype)
    arr[...] = big
    env = {"NBAPP_LAZY_ABOVE_MB": "1", "NBAPP_BLOCK_SIZE": "128"}
    with running_app(tmp_path_factory.mktemp("server"), root, extra_env=env) as srv, \
            chromium(tmp_path_factory.mktemp("profile")) as (ctx, rec):
        page = ctx.new_page()
        watch(page, rec)
        app = AppPage(page, rec)
        app.load_times = app.open(srv.url)
        yield app, root
        page.close(run_before_unload=True)


def test_a_large_volume_runs_block_by_block_and_resumes(page_app):
    app, root = page_app
    needs_model(app)
    page = app.page
    page.set_viewport_size({"width": 1366, "height": 768})
    app.load_path("big.zarr")
    app.wait_for_status("slice by slice", 120)
    app.tab("3D inference")
    run = page.locator("button:visible").filter(has_text=re.compile(r"^\s*Run\s*$"))
    run.click()
    # the first slab of slices through the network: stop, then run again
    app.wait_for_text("network: xy slices 1-32 done", 300)
    page.locator("button:visible").filter(has_text=re.compile(r"^\s*Cancel\s*$")).click()
    page.wait_for_function("/job \\d+: cancelled/.test(document.body.innerText)",
                           timeout=300_000)
    run.click()
    page.wait_for_function("/job \\d+: (done|failed)/.test(document.body.innerText)",
                           timeout=600_000)
    body = page.locator(".nbapp-app").inner_text()
    assert re.search(r"job \d+: done", body), body[-2000:]
    status = app.wait_for_status("3D job done", 60)
    assert re.search(r"\d+ objects, 4 blocks, the network outputs of \d+ of 19 slabs of slices "
                     r"from an earlier run", status), status
    # in the visitor's own exports folder (issue 26)
    assert len(list(root.glob("nbapp-visitors/*/exports/big_3d.zarr"))) == 1
    app.wait_for_text("objects shown")  # the 3D view, from the output's coarse level
    body = page.locator(".nbapp-app").inner_text()
    assert re.search(r"\d+ objects: mito \d+", body)  # the object table, from the job
    page.mouse.wheel(0, -4000)
    # tall enough for the whole tab: the widgets below a 768 px window are not drawn
    page.set_viewport_size({"width": 1366, "height": 1500})
    page.wait_for_timeout(1000)
    screenshot(app, "blockwise.png")
    page.set_viewport_size({"width": 1366, "height": 768})
    assert_no_page_errors(app)
