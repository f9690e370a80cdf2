"""2D inference benchmark: a 1024x1024 slice on this machine.

Prints one table (median and spread of repeated runs, ratios within the same run) and writes it
as JSON next to this script (``bench/results/bench_2d.json``):

- network: the engine alone (normalise, pad, forward, crop), default model;
- full inference: network + post-processing on a new image (cache miss);
- threshold-only change: post-processing from cached network outputs (what a slider costs);
- coarse vs fine post-processing: on the model's own outputs and on ideal heads of densely
  packed objects (the worst case for grouping).

Run: ``python bench/bench_2d.py [--model default] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def timeit(fn, repeats: int) -> dict:
    fn()  # warm
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    q = np.percentile(ts, [25, 75])
    return {"median_ms": 1000 * statistics.median(ts), "iqr_ms": 1000 * float(q[1] - q[0]),
            "n": repeats}


def machine() -> dict:
    import scipy
    import skimage
    import torch

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "skimage": skimage.__version__,
            "platform": platform.platform()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_2d.json"))
    args = ap.parse_args(argv)

    from models import dense_labels, ideal_heads

    import nbapp.postprocess as pp
    from nbapp import SliceParams, SliceSegmenter
    from nbapp.samples import demo_volume

    n = args.size
    img = demo_volume(shape=(3, n, n), n_mito=max(12, (n // 256) ** 2 * 10), seed=7)[0][1]
    seg = SliceSegmenter(args.model, device="cpu", cache_size=4)
    p = SliceParams()
    rows = {}
    rows["network (engine only)"] = timeit(lambda: seg.engine.infer(img), args.repeats)

    def full():
        seg.clear_cache()
        seg(img, p)

    rows["full inference (new image)"] = timeit(full, args.repeats)
    seg(img, p)
    thresholds = iter(np.tile(np.linspace(0.3, 0.7, 9), 1000))
    rows["threshold-only change (cached)"] = timeit(
        lambda: seg(img, p.replace(seg_threshold=float(next(thresholds)))), args.repeats * 2)
    heads_c = seg.heads(img, p)
    heads_f = seg.heads(img, p.replace(fine_boundaries=True))
    rows["post-processing coarse (model)"] = timeit(lambda: pp.segment_heads(heads_c, p), args.repeats)
    rows["post-processing fine (model)"] = timeit(lambda: pp.segment_heads(heads_f, p), args.repeats)
    dense = dense_labels((n, n), n * n // 4000, seed=3)
    oc, of = ideal_heads(dense, True), ideal_heads(dense, False)
    rows["post-processing coarse (dense ideal)"] = timeit(lambda: pp.segment_heads(oc, p), args.repeats)
    rows["post-processing fine (dense ideal)"] = timeit(lambda: pp.segment_heads(of, p), args.repeats)

    full_ms = rows["full inference (new image)"]["median_ms"]
    thr_ms = rows["threshold-only change (cached)"]["median_ms"]
    ratios = {
        "threshold-only / full inference": thr_ms / full_ms,
        "fine / coarse post-processing (model)":
            rows["post-processing fine (model)"]["median_ms"] / rows["post-processing coarse (model)"]["median_ms"],
        "fine / coarse post-processing (dense ideal)":
            rows["post-processing fine (dense ideal)"]["median_ms"]
            / rows["post-processing coarse (dense ideal)"]["median_ms"],
    }
    info = machine()
    info.update(model=seg.model.config.name, parameters=seg.model.parameters, slice=f"{n}x{n}",
                instances=int(np.count_nonzero(np.unique(seg(img, p)))),
                dense_objects=int(dense.max()))
    print(f"nbapp 2D benchmark, {n}x{n} slice, model {info['model']} "
          f"({info['parameters']:,} parameters)")
    print(f"machine: {info['platform']}, {info['cpus']} CPUs, torch {info['torch']} "
          f"({info['torch_threads']} threads), numpy {info['numpy']}")
    print(f"{'measurement':<40}{'median ms':>12}{'IQR ms':>10}{'n':>5}")
    for k, v in rows.items():
        print(f"{k:<40}{v['median_ms']:>12.1f}{v['iqr_ms']:>10.1f}{v['n']:>5}")
    for k, v in ratios.items():
        print(f"{k:<52}{v:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
