"""What the TorchScript operator check (nbapp.models.guard) adds to loading a model, this CPU.

For the shipped default model and a MitoNet_v1-architecture network (random weights, scripted
and frozen as empanada ships it; bench_mitonet_speed.py builds it), timed in interleaved rounds
(``timeit`` of bench_2d.py):

- ``check_archive``: parsing the file's stored source and checking every call, before loading;
- ``torch.jit.load``: loading as before;
- ``check_module``: inlining every method's graph and checking every operator, after loading;
- ``load_model``: the whole load as the app does it (both checks, no warm-up).

Prints a table and writes ``bench/results/bench_guard.json`` (machine, medians, IQRs, the
checks' share of the load).

Run: ``python bench/bench_guard.py [--repeats N]`` (under a minute on 2 idle CPU cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_2d import machine, timeit  # noqa: E402


def model_files(folder: Path) -> dict:
    from bench_mitonet_speed import build_mitonet_arch, script_and_fold

    from nbapp.models import load_model

    files = {"default": Path(load_model("default", warm_up=False).weights)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script_and_fold(build_mitonet_arch()).save(str(folder / "mitonet_arch.pt"))
    files["MitoNet_v1 architecture (frozen)"] = folder / "mitonet_arch.pt"
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_guard.json"))
    args = ap.parse_args(argv)

    from nbapp.models import load_model
    from nbapp.models.guard import check_archive, check_module, module_operators

    warnings.simplefilter("ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in model_files(Path(tmp)).items():
            loaded = torch.jit.load(str(path))
            t = timeit({
                "check_archive": lambda: check_archive(path),
                "torch.jit.load": lambda: torch.jit.load(str(path)),
                "check_module": lambda: check_module(loaded, path),
                "load_model": lambda: load_model(path, device="cpu", warm_up=False),
            }, args.repeats)
            checks = t["check_archive"]["median_ms"] + t["check_module"]["median_ms"]
            rows[name] = {"size_mb": path.stat().st_size / 1e6,
                          "operators": len(module_operators(loaded)), "timings": t,
                          "checks_share_of_load": checks / t["load_model"]["median_ms"]}
    result = {"machine": machine(), "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'model':34s} {'MB':>6s} {'ops':>4s} {'source ms':>10s} {'jit.load ms':>12s} "
          f"{'graphs ms':>10s} {'load_model ms':>14s} {'checks':>7s}")
    for name, r in rows.items():
        t = r["timings"]
        print(f"{name:34s} {r['size_mb']:6.1f} {r['operators']:4d} "
              f"{t['check_archive']['median_ms']:10.1f} {t['torch.jit.load']['median_ms']:12.1f} "
              f"{t['check_module']['median_ms']:10.1f} {t['load_model']['median_ms']:14.1f} "
              f"{100 * r['checks_share_of_load']:6.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
