"""Viewer drawing benchmark: what matplotlib's Agg takes to draw the 2D viewer's figure.

The viewer (``nbapp.ui.viewer2d``) shows a slice and its label overlay, both nearest-neighbour
images, in a 5.5 x 5.5 inch figure (550 x 550 px). Each key press on a slider redraws it, so
this time sits inside the browser's key press -> painted latency (``bench_browser.py``).
Compared, on the same figure, data and labels:

- ``interpolation_stage="data"`` (what the viewer uses): resample the 1024 x 1024 values to
  screen pixels, then colour-map the 550 x 550 pixels;
- ``interpolation_stage="rgba"`` (what matplotlib's ``"auto"`` picks when it downsamples):
  colour-map all 1024 x 1024 values to RGBA first, then resample. The pictures are identical
  for nearest interpolation (``tests/test_ui.py``).

Run: ``python bench/bench_viewer_draw.py [--size 1024] [--repeats 30]``; prints a table and
writes ``bench/results/bench_viewer_draw.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_2d import machine, report, timeit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_viewer_draw.json"))
    args = ap.parse_args(argv)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from skimage.measure import label

    from nbapp.ui.figures import label_display, setup_image_axes, show_image

    rng = np.random.default_rng(0)
    img = rng.random((args.size, args.size)).astype(np.float32)
    blobs = rng.random((args.size // 16, args.size // 16)) > 0.7
    labels = label_display(label(np.kron(blobs, np.ones((16, 16), bool))))

    def drawer(stage: str):
        fig = Figure(figsize=(5.5, 5.5))
        canvas = FigureCanvasAgg(fig)
        base, over = setup_image_axes(fig.add_axes((0, 0, 1, 1)))
        show_image(base, img, (0.1, 0.9))
        show_image(over, labels)
        base.set_interpolation_stage(stage)
        over.set_interpolation_stage(stage)
        flip = [labels, labels[::-1]]

        def draw():  # a new overlay each time, as after a threshold change
            flip.reverse()
            over.set_data(flip[0])
            canvas.draw()
        return draw

    rows = timeit({"viewer draw, colour-map after resampling (data)": drawer("data"),
                   "viewer draw, colour-map every pixel first (rgba)": drawer("rgba")},
                  args.repeats)
    a, b = (r["median_ms"] for r in rows.values())
    print(f"nbapp viewer drawing benchmark, {args.size}x{args.size} slice + overlay, 550x550 px")
    report(machine(), rows, {"rgba / data": b / a}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
