"""Fine-tuning the shipped model on another pixel size: what ``nbapp train --init default`` buys.

Lucchi++ train is shown as a microscope with 4x larger pixels would show it (20 nm in xy,
anti-aliased image, nearest-neighbour labels; the "20 nm pixels" variant of bench_model.py, where
the default model is weakest), slices kept at 5 nm, so the volume is anisotropic and patches come
from the xy plane only. The default model is then fine-tuned on its slices z < 130 for
``--minutes`` with the training CLI, as a user with labelled data from their own microscope
would, and both models are scored on the held-out block (z >= 130, never trained on), at 20 nm
and at the original 5 nm (to see what the fine-tuned model forgets). The LAST checkpoint is
scored, not the one with the best validation score, which was chosen on this very block.

Run: ``python bench/bench_finetune.py [--minutes 10] [--out bench/results/bench_finetune.json]``.
Exits 0 with a message when the data is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_2d import machine  # noqa: E402
from bench_model import DATA, emulate, evaluate_2d  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="fine-tuning time limit")
    ap.add_argument("--zoom", type=float, default=0.25, help="in-plane scale (0.25: 20 nm)")
    ap.add_argument("--val-slices", type=int, default=35)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_finetune.json"))
    args = ap.parse_args(argv)
    folder = DATA / "lucchi_pp_train"
    if not (folder / "train_raw.tif").exists():
        print(f"bench_finetune: no Lucchi++ data under {DATA}; set NBAPP_DATA. Nothing measured.")
        return 0
    import tifffile
    import torch

    from nbapp.models import load_model
    from nbapp.train import export_checkpoint
    from nbapp.train import main as train_main

    torch.set_num_threads(args.threads)
    raw = tifffile.imread(folder / "train_raw.tif")
    labels = tifffile.imread(folder / "train_mito_instances_3d_cc.tif").astype(np.int32)
    small_raw, small_lab = emulate(raw, labels, args.zoom, 1.0, 0.0, 1.0)
    v = args.val_slices
    block = {"5 nm": (raw[-v:], labels[-v:]), "shifted": (small_raw[-v:], small_lab[-v:])}
    nm = f"{5 / args.zoom:g} nm"

    def score(model) -> dict:
        return {(nm if k == "shifted" else k): evaluate_2d(model, *b, 1) for k, b in block.items()}

    base = score(load_model("default", device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        rp, lp, out = Path(tmp) / "raw.tif", Path(tmp) / "labels.tif", Path(tmp) / "run"
        tifffile.imwrite(rp, small_raw)
        tifffile.imwrite(lp, small_lab.astype(np.uint16))
        command = ["--raw", str(rp), "--labels", str(lp), "--out", str(out), "--init", "default",
                   "--planes", "xy", "--patch", "128", "--batch-size", "8", "--lr", "3e-4",
                   "--steps", "1000000", "--time-limit", str(args.minutes), "--val-every",
                   "500", "--val-slices", str(v), "--threads", str(args.threads),
                   "--no-progress"]
        t0 = time.perf_counter()
        train_main(command)
        minutes = (time.perf_counter() - t0) / 60
        ck = export_checkpoint(out / "last.pth", out / "last.pt")  # the shipped export options
        (out / "last.yaml").write_text((out / "nbapp_mito.yaml").read_text().replace(
            "model: nbapp_mito.pt", "model: last.pt"))
        tuned = score(load_model(out / "last.yaml", device="cpu"))
    keys = ("fg_iou", "f1", "precision", "recall", "pq")
    rows = {name: {"default": {k: base[name][k] for k in keys},
                   "fine-tuned": {k: tuned[name][k] for k in keys}} for name in base}
    print(f"fine-tuned {minutes:.1f} min, {ck['step']} steps of 8 x 128^2 on {nm} slices z < "
          f"{raw.shape[0] - v}; held-out block, 2D, downsampling 1:\n")
    print("| block | model | FG IoU | F1@0.5 | precision | recall | PQ |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        for which, m in r.items():
            print(f"| {name} | {which} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    result = {"machine": machine(), "minutes": round(minutes, 2), "steps": int(ck["step"]),
              "zoom": args.zoom, "train_command": "nbapp train " + " ".join(
                  c if not c.startswith("/") else Path(c).name for c in command),
              "held_out_2d_ds1": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
