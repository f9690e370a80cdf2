"""Unsupervised adaptation (issue 16 part 4): does re-estimating the default model's batch-norm
statistics on the user's own (unlabelled) images help?

The default model is rebuilt from its export (:func:`nbapp.models.arch.from_export`), its batch
norms are recalibrated on random 256x256 crops of the target images (no labels used), and both
models are scored on the same images (2D F1@0.5, default post-processing): VNC ssTEM (20
slices), the five CEM crops and the Lucchi++ held-out block (z >= 130, every 2nd slice).

Result (bench/results/bench_adapt.json): identical scores on all three. The export folds its
batch norms, and recalibration keeps the exported function (by design: fine-tuning starts from
it), so only the statistics move; true AdaBN would need the statistics of the training data,
which the export does not keep. Re-estimating the intensity normalisation is a no-op too: the
default model standardises each image inside the network. Neither is used by nbapp.

Run: ``python bench/bench_adapt.py [--out bench/results/bench_adapt.json]``.
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
from bench_fewshot import DATA, cem, score  # noqa: E402


def sources():
    import tifffile
    from skimage.measure import label as cc_label

    v = DATA / "vnc_sstem"
    if (v / "raw.tif").exists():
        yield "vnc", list(tifffile.imread(v / "raw.tif")), list(
            tifffile.imread(v / "mito_instances_2d_cc.tif").astype(np.int32))
    c = cem()
    if c is not None:
        yield "cem", c[0] + c[2], c[1] + c[3]
    d = DATA / "lucchi_pp_train"
    if (d / "train_raw.tif").exists():
        raw = tifffile.imread(d / "train_raw.tif")[130::2]
        lab = tifffile.imread(d / "train_mito_instances_3d_cc.tif")[130::2]
        yield "lucchi_block", list(raw), [cc_label(s, connectivity=2) for s in lab]


def adapted(images, seed: int = 0, patches: int = 64, side: int = 256):
    """The default model with batch norm recalibrated on crops of ``images``."""
    import tempfile

    import torch

    from nbapp.intensity import intensity_range, to_unit
    from nbapp.models import load_model
    from nbapp.models.arch import from_export, recalibrate_batchnorm
    from nbapp.train import EXPORT_OPTIONS, export_model

    base = load_model("default", device="cpu", warm_up=False)
    model, arch = from_export(base.module)
    mean, std = base.config.norms
    rng = np.random.default_rng(seed)

    def crops():
        for _ in range(patches // 8):
            batch = []
            for _ in range(8):
                im = images[int(rng.integers(len(images)))]
                lo, hi, _ = intensity_range(im)
                s = min(side, *im.shape) // 32 * 32
                y, x = (int(rng.integers(0, im.shape[i] - s + 1)) for i in (0, 1))
                batch.append((to_unit(im[y:y + s, x:x + s], lo, hi) - mean) / std)
            s = min(b.shape[0] for b in batch)
            yield torch.from_numpy(np.stack([b[:s, :s] for b in batch]))[:, None]

    recalibrate_batchnorm(model, crops())
    folder = Path(tempfile.mkdtemp(prefix="nbapp-adapt-"))
    arch = {**arch, "ctr_smooth": 0.0, "ctr_gate": False, "sem_smooth": 0.0}
    export_model(model.eval(), folder / "adapted.pt", EXPORT_OPTIONS["ctr_smooth"],
                 EXPORT_OPTIONS["ctr_gate"], arch, EXPORT_OPTIONS["sem_smooth"])
    import shutil

    shutil.copy(Path(base.config.config_path), folder / "adapted.yaml")
    text = (folder / "adapted.yaml").read_text().replace("model: nbapp_mito.pt", "model: adapted.pt")
    (folder / "adapted.yaml").write_text(text)
    return load_model(str(folder / "adapted.yaml"), device="cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_adapt.json"))
    args = ap.parse_args(argv)
    import torch

    from nbapp.models import load_model

    torch.set_num_threads(args.threads)
    default = load_model("default", device="cpu")
    out = {"machine": machine(), "sources": {}}
    for name, images, labels in sources():
        before = score(default, images, labels)
        after = score(adapted(images), images, labels)
        out["sources"][name] = {"default": before, "adapted": after}
        print(f"{name}: F1@0.5 {before['f1']:.3f} -> {after['f1']:.3f} (FG IoU "
              f"{before['fg_iou']:.3f} -> {after['fg_iou']:.3f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
