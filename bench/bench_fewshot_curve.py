"""Learning curves of few-shot fine-tuning on real EM where the default model is weak
(issue 30 item 8): F1@0.5 on slices never trained on, against labelled slices (1 / 3 / 6) and
training time (2 / 5 / 10 minutes of this CPU), for the current recipe (held-out bands, best
weights kept, early stop) and the previous one (no band, last weights).

Sources (each absent one is skipped):

- ``sbem``: mouse-brain SBEM (CDeep3M's training part, ~10 nm, ~55 small mitochondria per
  slice): the issue's data; downsampling 1; train pool z = 1, 4, 7, 10, 13, 16, scored on the
  other 14 slices;
- ``vnc``: Drosophila VNC ssTEM at 4.6 nm, downsampling 2 (the model's 10 nm); the same pool
  and test split over its 20 slices;
- ``lucchi20``: Lucchi++ shown at 20 nm (4x smaller) and left at downsampling 1 (a user who
  did not match the scale); pool z = 10, 30, 50, 70, 90, 110, scored on z = 130..160 step 5.

One labelled slice is the pool's 4th, three are its 2nd, 4th and 6th, six the whole pool.

Minutes are counted in steps so that the curve does not depend on what else the machine runs:
``STEPS_PER_MINUTE`` is what ``bench_fewshot.py`` measured for the recipe on this 2-core CPU
(1052 steps in 5.0 min, 1024x1024 slices, patch 256, batch 4, 2 threads). One run per
(source, slices) gives every minute of its curve: the fine-tune keeps a copy of its best
weights so far at each minute's step count (``snapshot_steps``), which is what a run stopped
there returns.

Run: ``python bench/bench_fewshot_curve.py [--sources sbem,vnc,lucchi20] [--plan quick|full]
[--out bench/results/bench_fewshot_curve.json]``. The JSON is rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_2d import machine  # noqa: E402
from bench_model import DATA  # noqa: E402

STEPS_PER_MINUTE = 200
POOL_PICKS = {1: [3], 3: [1, 3, 5], 6: [0, 1, 2, 3, 4, 5]}


def _stack(folder: str, pool: list[int]):
    import tifffile

    d = DATA / folder
    if not (d / "raw.tif").exists():
        return None
    raw = tifffile.imread(d / "raw.tif")
    lab = tifffile.imread(d / "mito_instances_2d_cc.tif").astype(np.int32)
    test = [i for i in range(raw.shape[0]) if i not in pool]
    return raw, lab, pool, test


def sbem():
    got = _stack("sbem_cdeep3m_train", [1, 4, 7, 10, 13, 16])
    return None if got is None else (*got, 1)


def vnc():
    got = _stack("vnc_sstem", [1, 4, 7, 10, 13, 16])
    return None if got is None else (*got, 2)


def lucchi20():
    from bench_fewshot import lucchi_at_20nm

    keep = [10, 30, 50, 70, 90, 110] + list(range(130, 165, 5))
    got = lucchi_at_20nm(keep)
    return None if got is None else (*got, list(range(6)), list(range(6, len(keep))), 1)


SOURCES = {"sbem": sbem, "vnc": vnc, "lucchi20": lucchi20}

#: (recipe, slices, minutes) per run, most telling first; "quick" is what fits one session.
PLANS = {
    "quick": [("current", 3, (2, 5, 10)), ("previous", 3, (2, 5)), ("current", 1, (2, 5)),
              ("current", 6, (2, 5))],
    "current": [("current", 3, (2, 5, 10)), ("current", 1, (2, 5)), ("current", 6, (2, 5))],
    "slices": [("current", 1, (2, 5)), ("current", 6, (2, 5))],
    "full": [("current", n, (2, 5, 10)) for n in (1, 3, 6)]
            + [("previous", n, (2, 5, 10)) for n in (1, 3, 6)],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="sbem,vnc,lucchi20")
    ap.add_argument("--plan", choices=sorted(PLANS), default="quick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_fewshot_curve.json"))
    args = ap.parse_args(argv)
    import torch

    from nbapp.fewshot import FinetuneParams, finetune, score_slices, weights_model
    from nbapp.models import load_model
    from nbapp.training.start import load_init

    torch.set_num_threads(args.threads)
    default = load_model("default", device="cpu")
    start = load_init("default")
    results = {"machine": machine(), "steps_per_minute": STEPS_PER_MINUTE, "plan": args.plan,
               "recipes": {"current": FinetuneParams().__dict__,
                           "previous": {**FinetuneParams().__dict__, "held_out": 0.0}},
               "sources": {}}
    data = {}
    for name in args.sources.split(","):
        got = SOURCES[name]()
        if got is None:
            print(f"{name}: data absent, skipped", flush=True)
            continue
        raw, lab, pool, test, ds = got
        te_i, te_l = [raw[i] for i in test], [lab[i] for i in test]
        before = score_slices(default, te_i, te_l, ds)
        data[name] = (raw, lab, pool, te_i, te_l, ds)
        results["sources"][name] = {"downsampling": ds, "test_slices": len(test),
                                    "test_objects": int(sum(np.count_nonzero(np.unique(la))
                                                            for la in te_l)),
                                    "before": {k: round(v, 4) for k, v in before.items()},
                                    "runs": []}
        print(f"{name}: default model F1@0.5 {before['f1']:.3f} on {len(test)} test slices",
              flush=True)
    for recipe, n, minutes in PLANS[args.plan]:
        for name, (raw, lab, pool, te_i, te_l, ds) in data.items():
            picks = [pool[i] for i in POOL_PICKS[n]]
            steps = [int(m * STEPS_PER_MINUTE) for m in minutes]
            params = FinetuneParams(minutes=10_000, max_steps=max(steps), downsampling=ds,
                                    held_out=0.2 if recipe == "current" else 0.0)
            t0 = time.monotonic()
            res = finetune([raw[i] for i in picks], [lab[i] for i in picks], "default",
                           params=params, name=f"curve_{name}", snapshot_steps=steps)
            curve = []
            for m, s in zip(minutes, steps):
                weights = res.snapshots.get(s)
                model = res.model if weights is None else weights_model(
                    weights, start["arch"], start["norms"])
                f1 = score_slices(model, te_i, te_l, ds)
                curve.append({"minutes": m, "steps": s, "reached": weights is not None,
                              **{k: round(v, 4) for k, v in f1.items()}})
            row = {"recipe": recipe, "slices": n, "picks": picks, "curve": curve,
                   "steps": res.steps, "stopped": res.stopped,
                   "wall_minutes": round((time.monotonic() - t0) / 60, 2)}
            if res.held_out is not None:
                row["held_out"] = {k: res.held_out[k] for k in ("slices", "objects",
                                                                "best_step", "curve")}
            results["sources"][name]["runs"].append(row)
            before = results["sources"][name]["before"]["f1"]
            print(f"{name} {recipe} {n} slice(s): " + ", ".join(
                f"{c['minutes']} min {c['f1']:.3f}" for c in curve)
                + f" (default {before:.3f}; {res.steps} steps, {res.stopped})", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
