"""Driving the Voila app in Debian's Chromium with Playwright (used by test_browser.py and
bench/bench_browser.py).

- Chromium is ``/usr/bin/chromium`` (``apt-get install chromium``), launched with the flags of
  DESIGN.md and a fresh user-data-dir; Playwright's own browsers are never installed.
- The browser never leaves the machine: every request that is not for the app on 127.0.0.1 is
  answered locally with an empty response and recorded (Voila's lab template links Font
  Awesome from a CDN; the widgets bundle their own icons).
- An init script records, per canvas, the kind of context it got (2d / webgl) and every 2D
  ``drawImage`` (count and the time of the next animation frame after it), and the time of the
  last key press, so that tests can wait for a repaint and the benchmark can time key press ->
  painted frame.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP_ORIGIN = "http://127.0.0.1:"
#: Environment variable naming another model for the browser tests and the benchmark (an
#: empanada YAML; its folder is copied into the data root).
MODEL_ENV = "NBAPP_E2E_MODEL"
#: Requests outside the app that Voila's page is known to make (answered locally).
KNOWN_EXTERNAL = ("https://cdn.jsdelivr.net/npm/@fortawesome/fontawesome-free",)

INIT_SCRIPT = """
(() => {
  const getContext = HTMLCanvasElement.prototype.getContext;
  HTMLCanvasElement.prototype.getContext = function (type, ...rest) {
    const ctx = getContext.call(this, type, ...rest);
    if (ctx && !this.__ctxType) this.__ctxType = type;
    return ctx;
  };
  const drawImage = CanvasRenderingContext2D.prototype.drawImage;
  CanvasRenderingContext2D.prototype.drawImage = function (...args) {
    const c = this.canvas;
    if (c && c.isConnected) {
      c.__draws = (c.__draws || 0) + 1;
      c.__lastDraw = performance.now();
      requestAnimationFrame(() => { c.__lastPaint = performance.now(); c.__paints = (c.__paints || 0) + 1; });
    }
    return drawImage.apply(this, args);
  };
  window.__lastKey = 0;
  document.addEventListener('keydown', () => { window.__lastKey = performance.now(); }, true);
})();
"""


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    from app_server import missing_app_modules

    if missing_app_modules():
        return f"app packages missing: {missing_app_modules()} (pip install 'nbapp[app]')"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@dataclass
class Recorder:
    """Page errors, console errors and requests that left the app, since ``reset``."""

    page_errors: list = field(default_factory=list)
    console_errors: list = field(default_factory=list)
    external: list = field(default_factory=list)

    def reset(self) -> None:
        self.page_errors.clear()
        self.console_errors.clear()

    def problems(self) -> list[str]:
        return [f"pageerror: {e}" for e in self.page_errors] + [
            f"console.error: {e}" for e in self.console_errors]

    def unexpected_external(self) -> list[str]:
        return [u for u in self.external if not u.startswith(KNOWN_EXTERNAL)]


@contextmanager
def chromium(profile_dir: Path, viewport=(1400, 1000)):
    """A persistent Chromium context with a fresh profile, the init script and the offline
    routing; yields (context, recorder)."""
    from playwright.sync_api import sync_playwright

    rec = Recorder()

    def offline(route) -> None:
        rec.external.append(route.request.url)
        route.fulfill(status=200, body="", content_type="text/css")

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile_dir), executable_path=CHROMIUM if os.path.exists(CHROMIUM)
            else shutil.which("chromium"), args=FLAGS, headless=True, accept_downloads=True,
            viewport={"width": viewport[0], "height": viewport[1]})
        try:
            ctx.route(lambda url: not url.startswith(APP_ORIGIN), offline)
            ctx.add_init_script(INIT_SCRIPT)
            yield ctx, rec
        finally:
            ctx.close()


def watch(page, rec: Recorder) -> None:
    page.on("pageerror", lambda e: rec.page_errors.append(str(e)))
    page.on("console", lambda m: rec.console_errors.append(m.text) if m.type == "error" else None)


class AppPage:
    """The nbapp app in one browser page."""

    def __init__(self, page, rec: Recorder):
        self.page, self.rec = page, rec

    # -- loading
    def open(self, url: str, model: str | None = None, timeout_s: float = 240) -> dict:
        """Load the page and wait for the app and its model (or the error that says why there
        is none); returns seconds to each step and that error (None when the model loaded)."""
        page = self.page
        t0 = time.perf_counter()
        page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
        t_dom = time.perf_counter() - t0
        page.wait_for_selector(".nbapp-app", timeout=timeout_s * 1000)
        t_app = time.perf_counter() - t0
        if model:
            self.tab("Data & model")
            page.locator(".nbapp-app input[list]").first.fill(model)
            page.locator("button:visible", has_text="Load model").click()
            self.wait_for_status("loaded on", timeout_s)
        page.wait_for_function(
            "document.querySelector('.nbapp-model-info') || document.querySelector('.nbapp-status.nbapp-error')",
            timeout=timeout_s * 1000)
        error = (self.status().inner_text()
                 if page.locator(".nbapp-status.nbapp-error").count() else None)
        return {"dom_s": t_dom, "app_s": t_app, "model_s": time.perf_counter() - t0,
                "error": error}

    def load_path(self, name: str) -> None:
        """Type ``name`` into the Data tab's path box and press Load."""
        import re

        page = self.page
        self.tab("Data & model")
        box = page.locator(".widget-text:visible", has=page.locator("label", has_text="Path"))
        box.locator("input").fill(name)
        page.locator("button:visible").filter(has_text=re.compile(r"^\s*Load\s*$")).click()

    def tab(self, title: str) -> None:
        self.page.locator(".lm-TabBar-tab, .p-TabBar-tab", has_text=title).first.click()

    # -- status
    def status(self):
        return self.page.locator(".nbapp-status").first

    def wait_for_status(self, text: str, timeout_s: float = 120) -> str:
        self.page.wait_for_function(
            "t => { const s = document.querySelector('.nbapp-status'); return s && s.textContent.includes(t); }",
            arg=text, timeout=timeout_s * 1000)
        return self.status().inner_text()

    def text(self) -> str:
        """All text of the page, hidden tabs included."""
        return self.page.evaluate("document.body.textContent")

    # -- widgets
    def slider(self, label: str):
        return self.page.locator(".widget-slider:visible",
                                 has=self.page.locator("label", has_text=label)).first

    def viewer_canvas(self):
        """The 2D viewer's canvas (the first ipympl canvas of the visible tab)."""
        return self.page.locator(".jupyter-matplotlib-canvas-div canvas:visible").first

    def draws(self, canvas) -> int:
        return canvas.evaluate("c => c.__draws || 0")

    def wait_for_draw(self, canvas, after: int, timeout_s: float = 60) -> None:
        self.page.wait_for_function("([c, n]) => (c.__draws || 0) > n",
                                    arg=[canvas.element_handle(), after], timeout=timeout_s * 1000)

    def wait_for_paint_after_key(self, canvas, timeout_s: float = 60) -> float:
        """Wait until the canvas is painted after the last key press; return the milliseconds
        from the key press to the animation frame after the draw."""
        self.page.wait_for_function(
            "c => (c.__lastPaint || 0) > window.__lastKey && (c.__lastDraw || 0) > window.__lastKey",
            arg=canvas.element_handle(), timeout=timeout_s * 1000)
        return canvas.evaluate("c => c.__lastPaint - window.__lastKey")

    def image_signature(self, canvas) -> str:
        return canvas.evaluate("c => c.toDataURL()")

    def wait_for_text(self, text: str, timeout_s: float = 120) -> None:
        self.page.wait_for_function("t => document.body.innerText.includes(t)", arg=text,
                                    timeout=timeout_s * 1000)
