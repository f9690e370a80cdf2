"""Two visitors of one served page at once (issue 26): each sees and writes only their own
work; neither overwrites the other's files or the data root's."""

from __future__ import annotations

import numpy as np
import pytest

from browser import AppPage, watch

tifffile = pytest.importorskip("tifffile")
pytestmark = pytest.mark.slow


def _export(app: AppPage, name: str) -> str:
    page = app.page
    app.tab("3D inference")
    box = page.locator(".widget-text", has_text="Export to").locator("input")
    box.fill(name)
    page.locator("button:visible", has_text="Export labels").click()
    return app.wait_for_status(" written to ", 60)


def test_two_visitors_at_once_keep_their_work_apart(server, browser, data_root):
    tifffile.imwrite(data_root / "alice_data.tif", np.full((16, 16), 7, np.uint8))
    ctx, rec = browser
    pages = []
    try:
        for _ in range(2):
            ctx.clear_cookies()  # a second browser: no visitor cookie yet (the token logs in)
            page = ctx.new_page()
            watch(page, rec)
            app = AppPage(page, rec)
            app.open(server.url)
            pages.append(app)
        alice, bob = pages
        said = [_export(a, "alice_data.tif") for a in (alice, bob)]
        folders = sorted((data_root / "nbapp-visitors").iterdir())
        assert len(folders) == 2, folders  # one folder per visitor
        owners = [[f for f in folders if str(f / "exports" / "alice_data.tif") in t] for t in said]
        assert [len(o) for o in owners] == [1, 1] and owners[0] != owners[1], (said, folders)
        assert tifffile.imread(data_root / "alice_data.tif").max() == 7  # the data is intact
        # Bob cannot open Alice's export through the path box
        theirs = owners[0][0]
        bob.tab("Data & model")
        bob.page.locator(".widget-text", has_text="Path").first.locator("input").fill(
            f"nbapp-visitors/{theirs.name}/exports/alice_data.tif")
        bob.page.locator("button:visible", has_text="Load").first.click()
        assert "is in another visitor" in bob.wait_for_status("another visitor", 60)
        assert not rec.page_errors, rec.page_errors
        # the page asks no third party for anything (Voila's template linked a CDN's fonts:
        # offline, two console errors; issue 30 item 14)
        assert not rec.external, rec.external
    finally:
        for a in pages:
            a.page.close(run_before_unload=True)
