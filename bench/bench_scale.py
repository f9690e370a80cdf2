"""Scale matching: what the suggested Image Downsampling changes on real EM.

The default model was trained at 5 nm. For each source the 2D F1@0.5 (default post-processing,
pooled over slices) is measured at every factor from 0.25 (enlarge 4x) to 4, and the factor
nbapp suggests from the data's pixel size (:func:`nbapp.objects.suggest_downsampling`) is marked:

- ``lucchi_10nm`` / ``lucchi_20nm``: the Lucchi++ held-out block (z >= 130) as a microscope with
  2x / 4x larger pixels shows it (anti-aliased; the model's own lab, other pixel size);
- ``vnc``: Drosophila VNC ssTEM at 4.6 nm (another lab; the suggestion is 1);
- ``cem``: the five CEM500K crops (mixed sources, pixel size not recorded: no suggestion).

Run: ``python bench/bench_scale.py [--out bench/results/bench_scale.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_2d import machine  # noqa: E402
from bench_fewshot import DATA, cem  # noqa: E402
from bench_model import emulate  # noqa: E402

FACTORS = (0.25, 0.5, 1, 2, 4)


def sources():
    import tifffile
    from skimage.measure import label as cc_label

    d = DATA / "lucchi_pp_train"
    if (d / "train_raw.tif").exists():
        raw = tifffile.imread(d / "train_raw.tif")[130:165:2]
        lab = tifffile.imread(d / "train_mito_instances_3d_cc.tif")[130:165:2].astype(np.int32)
        for zoom, nm in ((0.5, 10.0), (0.25, 20.0)):
            small, slab = emulate(raw, lab, zoom, 1.0, 0.0, 1.0)
            yield (f"lucchi_{nm:g}nm", nm, list(np.clip(small, 0, 255).astype(np.uint8)),
                   [cc_label(s, connectivity=2) for s in slab])
    v = DATA / "vnc_sstem"
    if (v / "raw.tif").exists():
        raw = tifffile.imread(v / "raw.tif")[::4]
        lab = tifffile.imread(v / "mito_instances_2d_cc.tif")[::4].astype(np.int32)
        yield "vnc", 4.6, list(raw), list(lab)
    c = cem()
    if c is not None:
        yield "cem", None, c[0] + c[2], c[1] + c[3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_scale.json"))
    args = ap.parse_args(argv)
    import torch

    from nbapp.errors import NbappError
    from nbapp.fewshot import score_slices
    from nbapp.models import load_model
    from nbapp.objects import suggest_downsampling

    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    out = {"machine": machine(), "model_pixel_nm": model.config.pixel_size_nm, "sources": {}}
    for name, nm, images, labels in sources():
        suggested = suggest_downsampling(nm, model.config.pixel_size_nm)
        row = {"pixel_nm": nm, "suggested": suggested, "slices": len(images), "f1": {},
               "precision": {}, "recall": {}}
        for ds in FACTORS:
            try:
                m = score_slices(model, images, labels, ds)
            except NbappError as exc:  # too small at this factor
                row["f1"][str(ds)] = None
                print(f"{name} ds {ds}: {exc}")
                continue
            for k in ("f1", "precision", "recall"):
                row[k][str(ds)] = round(float(m[k]), 4)
        f1 = {k: v for k, v in row["f1"].items() if v is not None}
        row["best"] = max(f1, key=f1.get)
        out["sources"][name] = row
        print(f"{name} ({nm} nm): suggested {suggested}, F1@0.5 " + ", ".join(
            f"{k}: {v:.3f}" for k, v in f1.items()) + f"; best {row['best']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
