"""2D inference benchmark: a 1024x1024 slice on this machine.

Prints one table (median and spread of repeated runs, ratios within the same run) and writes it
as JSON next to this script (``bench/results/bench_2d.json``):

- network: the engine alone (normalise, pad, forward, crop), default model;
- full inference: network + post-processing on a new image (cache miss);
- threshold-only change: post-processing from cached network outputs (what a slider costs);
- coarse vs fine post-processing: on the model's own outputs and on ideal heads of densely
  packed objects (the worst case for grouping).

Each group of rows that a ratio compares is timed in rounds that take turns (see ``timeit``).

``--baseline MODEL`` also times another model's network in the same rounds (e.g. the previous
default, to price a change of the network) and reports the ratio.

Run: ``python bench/bench_2d.py [--model default] [--baseline MODEL] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import itertools
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


def timeit(fns: dict, repeats: int, rounds: int = 3) -> dict:
    """Time each function ``repeats`` times, in ``rounds`` rounds that take turns (a block of
    calls of each, warmed up), so that a load change on a shared machine hits all alike and
    ratios within one call compare like with like."""
    ts: dict = {name: [] for name in fns}
    for r in range(rounds):
        n = repeats // rounds + (r < repeats % rounds)
        for name, fn in fns.items():
            fn()  # warm
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in ts.items():
        q = np.percentile(t, [25, 75])
        out[name] = {"median_ms": 1000 * statistics.median(t), "iqr_ms": 1000 * float(q[1] - q[0]),
                     "n": len(t)}
    return out


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
    ap.add_argument("--baseline", default=None,
                    help="another model whose network is timed in the same rounds")
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

    # a new image each time (one pixel differs), so that hashing it is paid as for a new slice
    other = img.copy()
    other[0, 0] ^= 1
    images = itertools.cycle([img, other])

    def full():
        seg.clear_cache()
        seg(next(images), p)

    thresholds = iter(np.tile(np.linspace(0.3, 0.7, 9), 1000))
    baseline = {}
    if args.baseline:
        base = SliceSegmenter(args.baseline, device="cpu", cache_size=4)
        baseline = {"network (engine only), baseline": lambda: base.engine.infer(img)}
    rows.update(timeit({
        "network (engine only)": lambda: seg.engine.infer(img),
        **baseline,
        "full inference (new image)": full,
        # its warm-up call caches the heads of img
        "threshold-only change (cached)":
            lambda: seg(img, p.replace(seg_threshold=float(next(thresholds)))),
    }, args.repeats))
    heads_c = seg.heads(img, p)
    heads_f = seg.heads(img, p.replace(fine_boundaries=True))
    dense = dense_labels((n, n), n * n // 4000, seed=3)
    oc, of = ideal_heads(dense, True), ideal_heads(dense, False)
    rows.update(timeit({
        "post-processing coarse (model)": lambda: pp.segment_heads(heads_c, p),
        "post-processing fine (model)": lambda: pp.segment_heads(heads_f, p),
        "post-processing coarse (dense ideal)": lambda: pp.segment_heads(oc, p),
        "post-processing fine (dense ideal)": lambda: pp.segment_heads(of, p),
    }, args.repeats))

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
    if baseline:
        ratios["network / baseline network"] = (rows["network (engine only)"]["median_ms"]
                                                / rows["network (engine only), baseline"]
                                                ["median_ms"])
    info = machine()
    info.update(model=seg.model.config.name, parameters=seg.model.parameters, slice=f"{n}x{n}",
                instances=int(np.count_nonzero(np.unique(seg(img, p)))),
                dense_objects=int(dense.max()), baseline=args.baseline)
    print(f"nbapp 2D benchmark, {n}x{n} slice, model {info['model']} "
          f"({info['parameters']:,} parameters)")
    report(info, rows, ratios, args.out)
    return 0


def report(info: dict, rows: dict, ratios: dict, out: str | Path) -> None:
    """Print the machine, the timing table of :func:`timeit` rows and the ratios; write them as
    JSON to ``out``."""
    print(f"machine: {info['platform']}, {info['cpus']} CPUs, torch {info['torch']} "
          f"({info['torch_threads']} threads), numpy {info['numpy']}")
    print(f"{'measurement':<40}{'median ms':>12}{'IQR ms':>10}{'n':>5}")
    for k, v in rows.items():
        print(f"{k:<40}{v['median_ms']:>12.1f}{v['iqr_ms']:>10.1f}{v['n']:>5}")
    for k, v in ratios.items():
        print(f"{k:<52}{v:>8.3f}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
