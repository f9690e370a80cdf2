"""Few-shot fine-tuning on real EM from three sources: what ``nbapp.finetune`` buys.

For each source a user labels (or proofreads) a few 2D slices; the default model is fine-tuned
on them with :func:`nbapp.finetune` for ``--minutes`` on this CPU and both models are scored on
the OTHER slices (never trained on), 2D, default post-processing, F1@0.5 pooled over slices:

- ``vnc``: Drosophila VNC ssTEM (4.6 nm, another lab and modality): 3 slices, scored on 17;
- ``cem``: the five CEM500K crops (mixed sources): 2 crops, scored on the other 3;
- ``lucchi20``: Lucchi++ shown at 20 nm (anti-aliased 4x smaller): 3 slices of z < 130, scored
  on the held-out block z >= 130.

Run: ``python bench/bench_fewshot.py [--minutes 5] [--sources vnc,cem,lucchi20]
[--out bench/results/bench_fewshot.json]``. Sources whose data is absent are skipped.
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
from bench_model import DATA, emulate  # noqa: E402


def vnc():
    import tifffile

    d = DATA / "vnc_sstem"
    if not (d / "raw.tif").exists():
        return None
    raw = tifffile.imread(d / "raw.tif")
    lab = tifffile.imread(d / "mito_instances_2d_cc.tif").astype(np.int32)
    train = [2, 9, 16]
    test = [i for i in range(raw.shape[0]) if i not in train]
    return [raw[i] for i in train], [lab[i] for i in train], [raw[i] for i in test], \
        [lab[i] for i in test]


def cem():
    from PIL import Image
    from skimage.measure import label as cc_label

    d = DATA / "cem_mito_2d"
    if not (d / "images").is_dir():
        return None
    names = sorted(p.name for p in (d / "images").glob("*.png"))
    imgs = [np.asarray(Image.open(d / "images" / n).convert("L")) for n in names]
    labs = [cc_label(np.asarray(Image.open(d / "masks" / n).convert("L")) > 0, connectivity=2)
            .astype(np.int32) for n in names]
    train = [0, 1]
    test = [i for i in range(len(names)) if i not in train]
    return [imgs[i] for i in train], [labs[i] for i in train], [imgs[i] for i in test], \
        [labs[i] for i in test]


def lucchi_at_20nm(keep: list[int]):
    """Lucchi++ train slices ``keep`` shown at 20 nm (anti-aliased 4x smaller), with their
    per-slice instance labels; None without the data."""
    import tifffile
    from skimage.measure import label as cc_label

    d = DATA / "lucchi_pp_train"
    if not (d / "train_raw.tif").exists():
        return None
    raw = tifffile.imread(d / "train_raw.tif")
    lab = tifffile.imread(d / "train_mito_instances_3d_cc.tif").astype(np.int32)
    small, slab = emulate(raw[keep], lab[keep], 0.25, 1.0, 0.0, 1.0)
    small = np.clip(small, 0, 255).astype(np.uint8)
    return small, np.stack([cc_label(s, connectivity=2) for s in slab]).astype(np.int32)


def lucchi20():
    got = lucchi_at_20nm([20, 65, 110] + list(range(130, 165, 5)))
    if got is None:
        return None
    small, slab = got
    return list(small[:3]), list(slab[:3]), list(small[3:]), list(slab[3:])


SOURCES = {"vnc": vnc, "cem": cem, "lucchi20": lucchi20}


def score(model, images, labels, ds: int = 1) -> dict:
    from nbapp.fewshot import score_slices

    return {k: round(v, 4) for k, v in score_slices(model, images, labels, ds).items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--sources", default="vnc,cem,lucchi20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a FinetuneParams field (repeatable), e.g. --set lr=3e-4")
    ap.add_argument("--proofread", action="store_true",
                    help="as in the app: the training labels are the default model's result "
                         "corrected to the truth, and the corrected pixels weigh "
                         "corrected_weight in the loss")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_fewshot.json"))
    args = ap.parse_args(argv)
    import torch

    from nbapp.fewshot import FinetuneParams, finetune
    from nbapp.models import load_model

    torch.set_num_threads(args.threads)
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = type(getattr(FinetuneParams, k))(v) if not isinstance(
            getattr(FinetuneParams, k), bool) else v.lower() in ("1", "true", "yes")
    params = FinetuneParams(minutes=args.minutes, **overrides)
    default = load_model("default", device="cpu")
    results = {"machine": machine(), "params": params.__dict__, "proofread": args.proofread,
               "sources": {}}
    for name in args.sources.split(","):
        data = SOURCES[name]()
        if data is None:
            print(f"{name}: data absent, skipped")
            continue
        tr_i, tr_l, te_i, te_l = data
        before = score(default, te_i, te_l, params.downsampling)
        weights = None
        if args.proofread:
            from nbapp.fewshot import corrected_weights
            from nbapp.inference import SliceSegmenter
            from nbapp.params import SliceParams

            seg = SliceSegmenter(default)
            predicted = [seg(im, SliceParams(downsampling=params.downsampling)) for im in tr_i]
            weights = [corrected_weights(la, pr, params.corrected_weight)
                       for la, pr in zip(tr_l, predicted)]
        t0 = time.monotonic()
        res = finetune(tr_i, tr_l, "default", params=params, name=f"fewshot_{name}",
                       weights=weights)
        minutes = (time.monotonic() - t0) / 60
        after = score(res.model, te_i, te_l, params.downsampling)
        row = {"train_slices": len(tr_i), "test_slices": len(te_i),
               "test_objects": int(sum(np.count_nonzero(np.unique(l)) for l in te_l)),
               "before": before, "after": after, "steps": res.steps,
               "minutes": round(minutes, 2), "final_loss": round(float(np.mean(res.losses[-20:])), 4)}
        results["sources"][name] = row
        print(f"{name}: F1@0.5 {before['f1']:.3f} -> {after['f1']:.3f} (P {after['precision']:.3f}"
              f" R {after['recall']:.3f}) in {minutes:.1f} min, {res.steps} steps", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
