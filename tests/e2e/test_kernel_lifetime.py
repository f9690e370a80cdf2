"""Kernel lifetime, probed live (issue 15, item 10): a 3D job running when its page closes is
not killed (its labels are saved under the data root, then its kernel is shut down), and a
kernel whose page vanished without a word (a crashed browser) is culled once idle.
"""

from __future__ import annotations

import re
import time

import pytest

from browser import AppPage, missing, watch

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(missing() is not None, reason=str(missing())),
]


def kernel_of(page) -> str:
    return page.evaluate("JSON.parse(document.getElementById('jupyter-config-data')"
                         ".textContent).kernelId")


def wait_for_log(server, text: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while text not in server.log_text():
        assert time.monotonic() < end, f"{text!r} not in the server log:\n" \
                                       f"{server.log_text()[-3000:]}"
        time.sleep(0.2)  # polling the server log, bounded by the deadline


def test_closing_the_page_during_a_3d_job_keeps_the_job(server, browser, data_root):
    ctx, rec = browser
    page = ctx.new_page()
    watch(page, rec)
    app = AppPage(page, rec)
    app.open(server.url)
    kernel = kernel_of(page)
    app.tab("3D inference")
    page.locator("button:visible").filter(has_text=re.compile(r"^\s*Run\s*$")).click()
    app.wait_for_status("3D job started")
    page.close(run_before_unload=True)  # the page's shutdown request goes out now
    wait_for_log(server, f"nbapp: kernel {kernel} runs a 3D job", 30)
    assert f"Kernel shutdown: {kernel}" not in server.log_text()
    end = time.monotonic() + 600
    saved = []
    while not saved:
        assert time.monotonic() < end, server.log_text()[-3000:]
        saved = list(data_root.glob("nbapp-visitors/*/exports/demo_volume_3d_*.tif"))
        time.sleep(0.5)  # polling for the job's file, bounded by the deadline
    wait_for_log(server, f"Kernel shutdown: {kernel}", 60)
    import tifffile

    labels = tifffile.imread(saved[0])
    assert labels.shape == (48, 256, 256) and labels.max() > 0


def test_a_kernel_whose_page_vanished_is_culled_when_idle(tmp_path, browser, data_root):
    from app_server import running_app

    ctx, rec = browser
    with running_app(tmp_path, data_root, extra_args=("--cull-idle-timeout", "4")) as srv:
        page = ctx.new_page()
        watch(page, rec)
        AppPage(page, rec).open(srv.url)
        kernel = kernel_of(page)
        page.close(run_before_unload=False)  # no unload handler: no shutdown request
        wait_for_log(srv, f"Kernel shutdown: {kernel}", 120)
        assert re.search(rf"[Cc]ulling .*{kernel}", srv.log_text()), srv.log_text()[-3000:]
