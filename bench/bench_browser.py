"""Browser benchmark: the Voila app in Debian's Chromium, driven by Playwright.

- page load: navigation -> DOM ready -> the app widget shown -> the model loaded (a fresh page,
  i.e. a fresh kernel, each time);
- key press -> painted viewer: a 1024x1024 slice in the 2D tab, ArrowRight / ArrowLeft on the
  focused "Segmentation Confidence Threshold" slider (a threshold-only change: post-processing
  from cached network outputs), timed in the page from the keydown event to the first animation
  frame after the viewer canvas was drawn. The viewer must be idle (no draw for 0.7 s) before
  each press. The app's own post-processing time is read from the viewer's info line.

Prints one table and writes ``bench/results/bench_browser.json``. Needs what the browser tests
need (``pip install -e '.[test]'``, ``apt-get install chromium``).

Run: ``python bench/bench_browser.py [--presses 21] [--loads 3] [--size 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))

TARGET_MS = 150.0


def stats(values: list[float]) -> dict:
    q = np.percentile(values, [25, 75, 90])
    return {"median_ms": statistics.median(values), "iqr_ms": float(q[1] - q[0]),
            "p90_ms": float(q[2]), "min_ms": min(values), "max_ms": max(values),
            "n": len(values)}


def machine() -> dict:
    import torch

    from browser import CHROMIUM

    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    return {"machine": platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "chromium": chromium,
            **{p: version(p) for p in ("voila", "ipywidgets", "ipympl", "ipyvolume", "playwright",
                                        "jupyter_server", "tornado", "matplotlib")},
            "load_average": os.getloadavg()}


def idle(app, canvas, quiet_ms: int = 700, timeout_s: float = 60) -> None:
    """Wait until the canvas has not been drawn for ``quiet_ms``."""
    app.page.wait_for_function(f"c => performance.now() - (c.__lastDraw || 0) > {quiet_ms}",
                               arg=canvas.element_handle(), timeout=timeout_s * 1000)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presses", type=int, default=21, help="timed key presses (>= 15)")
    ap.add_argument("--loads", type=int, default=3, help="page loads")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default="default",
                    help="'default' or an empanada YAML (its folder is copied into the data root)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_browser.json"))
    args = ap.parse_args(argv)

    import tifffile

    from app_server import running_app
    from browser import AppPage, chromium, missing, watch
    from nbapp.samples import demo_volume

    reason = missing()
    if reason:
        print(f"bench_browser: cannot run: {reason}", file=sys.stderr)
        return 2
    n = args.size
    work = Path(tempfile.mkdtemp(prefix="nbapp_bench_browser_"))
    data = work / "data"
    data.mkdir()
    name = f"slice_{n}.tif"
    model = None
    if args.model != "default":
        shutil.copytree(Path(args.model).parent, data / "model")
        model = f"model/{Path(args.model).name}"
    # the same slice as bench_2d.py
    tifffile.imwrite(data / name, demo_volume(shape=(3, n, n), n_mito=max(12, (n // 256) ** 2 * 10),
                                              seed=7)[0][1])

    loads, latencies, post_ms, instances = [], [], [], set()
    with running_app(work, data) as server, chromium(work / "profile") as (ctx, rec):
        for i in range(args.loads):
            page = ctx.new_page()
            watch(page, rec)
            app = AppPage(page, rec)
            loads.append(app.open(server.url, model=model))
            if i < args.loads - 1:
                page.close(run_before_unload=True)

        app.tab("Data & model")
        box = page.locator(".widget-text:visible", has=page.locator("label", has_text="Path"))
        box.locator("input").fill(name)
        page.locator("button:visible").filter(has_text=re.compile(r"^\s*Load\s*$")).click()
        app.wait_for_status(f"loaded {name}", 120)
        app.tab("2D parameter testing")
        app.wait_for_text("xy slice 0", 300)
        canvas = app.viewer_canvas()
        info = page.locator(".nbapp-app").get_by_text(re.compile(r"instances ·"))
        idle(app, canvas)
        box_px = canvas.bounding_box()
        handle = app.slider("Segmentation Confidence Threshold").locator(".noUi-handle")
        handle.focus()
        extra_draws = 0
        for i in range(args.presses + 1):  # the first press is a warm-up
            before = app.draws(canvas)
            page.keyboard.press("ArrowRight" if i % 2 == 0 else "ArrowLeft")
            ms = app.wait_for_paint_after_key(canvas, 60)
            idle(app, canvas)
            if i:  # timed presses: more than one repaint per press?
                extra_draws += app.draws(canvas) - before - 1
            text = info.first.inner_text()
            m = re.search(r"(\d+) instances · network (\w+).*post-processing (\d+) ms", text)
            if i == 0:
                continue
            latencies.append(ms)
            if m:
                instances.add(int(m.group(1)))
                post_ms.append(float(m.group(3)))
                assert m.group(2) == "cached", f"the network ran again: {text}"
        problems = rec.problems()

    info_m = machine()
    rows = {
        "page load: DOM ready": stats([1000 * x["dom_s"] for x in loads]),
        "page load: app shown": stats([1000 * x["app_s"] for x in loads]),
        "page load: model loaded": stats([1000 * x["model_s"] for x in loads]),
        f"key press -> painted viewer ({n}x{n}, threshold only)": stats(latencies),
        "  of which post-processing in the kernel": stats(post_ms) if post_ms else {},
    }
    kp = rows[f"key press -> painted viewer ({n}x{n}, threshold only)"]
    result = {"machine": info_m, "model": args.model, "rows": rows, "target_ms": TARGET_MS,
              "meets_target": kp["median_ms"] <= TARGET_MS, "viewer_css_px": box_px,
              "instances": sorted(instances), "page_errors": problems,
              "key_press_ms": latencies, "postprocess_ms": post_ms,
              "extra_draws": extra_draws}
    print(f"nbapp browser benchmark: Voila {info_m['voila']} in {info_m['chromium']} (headless), "
          f"{n}x{n} slice, model {args.model}")
    print(f"machine: {info_m['platform']}, {info_m['cpus']} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in info_m['load_average'])}; torch {info_m['torch']}, "
          f"ipywidgets {info_m['ipywidgets']}, ipympl {info_m['ipympl']}, "
          f"playwright {info_m['playwright']}")
    print(f"{'measurement':<60}{'median ms':>10}{'IQR':>8}{'p90':>8}{'min':>8}{'max':>8}{'n':>4}")
    for k, v in rows.items():
        if v:
            print(f"{k:<60}{v['median_ms']:>10.0f}{v['iqr_ms']:>8.0f}{v['p90_ms']:>8.0f}"
                  f"{v['min_ms']:>8.0f}{v['max_ms']:>8.0f}{v['n']:>4}")
    print(f"key press -> painted median {kp['median_ms']:.0f} ms, target <= {TARGET_MS:.0f} ms: "
          f"{'met' if result['meets_target'] else 'NOT met'}")
    if extra_draws:
        print(f"note: {extra_draws} extra repaints of the viewer beyond one per key press")
    if problems:
        print("page errors:", *problems, sep="\n  ")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
