"""Evaluate a model on the held-out block of Lucchi++ train: the numbers of the model card.

The block is the last ``--val-slices`` (35) Z slices of ../shared/data/lucchi_pp_train, never
used in training. Reported, with default parameters unless named:

- 2D, every xy slice of the block on its own, downsampling 1 and 2: FG IoU of the block, and
  F1@0.5, F1@0.75, PQ from objects matched per slice and counted over all slices (ground truth:
  the 2D 8-connected components of the 3D labels);
- 3D, the block as a volume: single-plane (xy) and ortho-plane jobs, F1@0.5, F1@0.75, PQ and FG
  IoU against the 3D instance labels;
- the block as other microscopes might show it: 2D at pixel sizes x2, x3 and x4, with flat and bright
  contrast, and with gamma 2 (real labels; a proxy for transfer);
- other labs and modalities: the five CEM500K crops of ../shared/data/cem_mito_2d, recall,
  precision, F1 at IoU 0.5 and FG IoU, downsampling 1 and 2;
- speed on this machine: network and full 2D inference (network + post-processing) of a
  512x512 crop, medians.

Run: ``python bench/bench_model.py [--model default] [--out bench/results/bench_model.json]``.
Exits 0 with a message when the data is absent. Takes about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = Path(os.environ.get("NBAPP_DATA", HERE.parents[1] / "shared" / "data"))

from bench_2d import machine, timeit  # noqa: E402


def held_out_block(val_slices: int = 35) -> tuple[np.ndarray, np.ndarray] | None:
    """(raw, 3D instance labels) of the last ``val_slices`` slices, or None without the data."""
    folder = DATA / "lucchi_pp_train"
    if not (folder / "train_raw.tif").exists():
        return None
    import tifffile

    raw = tifffile.imread(folder / "train_raw.tif")
    labels = tifffile.imread(folder / "train_mito_instances_3d_cc.tif")
    return raw[-val_slices:], labels[-val_slices:].astype(np.int32)


def evaluate_2d(model, raw: np.ndarray, labels: np.ndarray, downsampling: int) -> dict:
    from skimage.measure import label as cc_label

    from nbapp.inference import SliceSegmenter
    from nbapp.metrics import slice_metrics
    from nbapp.params import SliceParams

    seg = SliceSegmenter(model)
    params = SliceParams(downsampling=downsampling)
    pred = np.stack([seg(s, params) for s in raw])
    gt = np.stack([cc_label(s, connectivity=2) for s in labels])
    return slice_metrics(pred, gt)


def evaluate_3d(model, raw: np.ndarray, labels: np.ndarray, ortho: bool) -> dict:
    from nbapp.metrics import instance_metrics
    from nbapp.params import VolumeParams
    from nbapp.run3d import segment_volume

    t0 = time.perf_counter()
    pred = segment_volume(raw, model, VolumeParams(orthoplane=ortho), devices=["cpu"])
    res = instance_metrics(pred, labels)
    res["pq@0.5"] = res["pq"]
    res["wall_s"] = time.perf_counter() - t0
    return res


def evaluate_cem(model, downsampling: int) -> dict | None:
    """Other labs and modalities: the five CEM500K crops of ../shared/data/cem_mito_2d (mixed EM
    sources, binary masks; instances = their 8-connected components), pooled over the crops."""
    from PIL import Image
    from skimage.measure import label as cc_label

    from nbapp.inference import SliceSegmenter
    from nbapp.metrics import slice_metrics
    from nbapp.params import SliceParams

    files = sorted((DATA / "cem_mito_2d" / "images").glob("*.png"))
    if not files:
        return None
    seg = SliceSegmenter(model)
    preds = [seg(np.asarray(Image.open(f)), SliceParams(downsampling=downsampling))
             for f in files]
    gts = [cc_label(np.asarray(Image.open(f.parent.parent / "masks" / f.name)) > 0,
                    connectivity=2) for f in files]
    keys = ("tp", "fp", "fn", "recall", "precision", "f1", "fg_iou")
    m = slice_metrics(preds, gts, thresholds=(0.5,))
    per = {}
    for f, p, g in zip(files, preds, gts):
        r = slice_metrics([p], [g], thresholds=(0.5,))
        per[f.name] = {k: r[k] for k in keys}
    return {"images": len(files), **{k: m[k] for k in keys}, "per_image": per}


#: Other pixel sizes and contrasts emulated on the held-out block (real labels): name ->
#: (zoom, contrast gain, brightness shift in grey levels, gamma).
VARIANTS = {
    "10 nm pixels (x1/2)": (0.5, 1.0, 0.0, 1.0),
    "15 nm pixels (x1/3)": (1 / 3, 1.0, 0.0, 1.0),
    "20 nm pixels (x1/4)": (0.25, 1.0, 0.0, 1.0),
    "flat and bright (contrast x0.25, +50)": (1.0, 0.25, 50.0, 1.0),
    "gamma 2": (1.0, 1.0, 0.0, 2.0),
}


def emulate(raw: np.ndarray, labels: np.ndarray, zoom: float, gain: float, shift: float,
            gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """The block as another microscope might show it: pixel size times ``1 / zoom``
    (anti-aliased image, nearest-neighbour labels), contrast, brightness and gamma changed."""
    from skimage.transform import rescale

    img = raw.astype(np.float32)
    lab = labels
    if zoom != 1.0:
        img = np.stack([rescale(s, zoom, order=1, anti_aliasing=True, preserve_range=True)
                        for s in img])
        lab = np.stack([rescale(s, zoom, order=0, anti_aliasing=False, preserve_range=True)
                        for s in labels]).astype(labels.dtype)
    mean = float(img.mean())
    img = np.clip((img - mean) * gain + mean + shift, 0, 255)
    img = 255.0 * (img / 255.0) ** gamma
    return np.round(img).astype(np.uint8), lab


def evaluate_variants(model, raw: np.ndarray, labels: np.ndarray) -> dict:
    """2D metrics (ds 1) of the block under each of :data:`VARIANTS`: a transfer proxy with
    real labels, 35 slices and hundreds of objects each (the CEM crops hold 35 objects)."""
    return {name: evaluate_2d(model, *emulate(raw, labels, *v), 1) for name, v in VARIANTS.items()}


def speed_512(model, raw: np.ndarray) -> dict:
    from nbapp.engine import Engine
    from nbapp.inference import SliceSegmenter
    from nbapp.params import SliceParams

    crop = np.ascontiguousarray(raw[0, :512, :512])
    engine = Engine(model)
    seg = SliceSegmenter(model)
    flips = iter(range(10**6))

    def full():  # a new image each call (cache miss): network + post-processing
        seg(crop ^ np.uint8(next(flips) % 256), SliceParams())

    t = timeit({"network": lambda: engine.infer(crop[None]), "full": full}, 15)
    return {"network_ms": t["network"]["median_ms"], "full_2d_ms": t["full"]["median_ms"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default, CONFIG.yaml or FILE.pt")
    ap.add_argument("--val-slices", type=int, default=35)
    ap.add_argument("--skip-3d", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_model.json"))
    args = ap.parse_args(argv)
    block = held_out_block(args.val_slices)
    if block is None:
        print(f"bench_model: no Lucchi++ data under {DATA}; set NBAPP_DATA. Nothing measured.")
        return 0
    from nbapp.models import load_model

    model = load_model(args.model, device="cpu")
    raw, labels = block
    rows = {}
    for ds in (1, 2):
        rows[f"2d_ds{ds}"] = evaluate_2d(model, raw, labels, ds)
    if not args.skip_3d:
        rows["3d_single"] = evaluate_3d(model, raw, labels, ortho=False)
        rows["3d_ortho"] = evaluate_3d(model, raw, labels, ortho=True)
    print(f"model {args.model}: {model.config.description.splitlines()[0]}")
    print(f"held-out block: Lucchi++ train z >= {165 - args.val_slices}, "
          f"{'x'.join(map(str, raw.shape))}\n")
    print("| evaluation | FG IoU | F1@0.5 | F1@0.75 | PQ | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fg_iou']:.3f} | {r['f1']:.3f} | {r['f1@0.75']:.3f} | "
              f"{r['pq']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    variants = evaluate_variants(model, raw, labels)
    print("\nthe block as other microscopes might show it (2D, ds 1):\n")
    print("| variant | FG IoU | F1@0.5 | PQ | precision | recall |")
    print("|---|---|---|---|---|---|")
    for name, r in variants.items():
        print(f"| {name} | {r['fg_iou']:.3f} | {r['f1']:.3f} | {r['pq']:.3f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} |")
    cem = {f"ds{ds}": evaluate_cem(model, ds) for ds in (1, 2)}
    if cem["ds1"] is not None:
        print("\nother EM (5 CEM500K crops, mixed sources), objects matched at IoU 0.5:")
        for k, r in cem.items():
            print(f"  {k}: recall {r['recall']:.3f}, precision {r['precision']:.3f}, F1 "
                  f"{r['f1']:.3f}, FG IoU {r['fg_iou']:.3f} (TP/FP/FN {r['tp']}/{r['fp']}/{r['fn']})")
            print("    per crop TP/FP/FN: " + ", ".join(
                f"{name.split('.')[0]} {c['tp']}/{c['fp']}/{c['fn']}"
                for name, c in r["per_image"].items()))
    speed = speed_512(model, raw)
    print(f"\n512x512 on this machine: network {speed['network_ms']:.1f} ms, full 2D inference "
          f"{speed['full_2d_ms']:.1f} ms (medians)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "model": args.model,
                               "block": list(raw.shape), "metrics": rows, "variants": variants,
                               "other_em": cem,
                               "speed_512": speed},
                              indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
