"""Training-data benchmark: what a synthetic patch costs against a real one and a training step.

Times, on this machine, with the default augmentations of ``nbapp train`` (patch 256):

- real patch: one augmented patch + targets from the bundled demo volume
  (``PatchSampler.sample`` with ``synthetic_p=0``; rotation, scale, intensity, padding band);
- synthetic patch: the same through ``nbapp.training.synth.synthetic_patch`` (``synthetic_p=1``), and
  with hard negatives in every patch (``hard_negatives_p=1``);
- training step: forward + backward + AdamW step of the default architecture on a batch of 8
  (what the data of one step competes with when ``--workers 0``).

Rows are timed in rounds that take turns (``bench_2d.timeit``). Writes
``bench/results/bench_train_data.json``.

Run: ``python bench/bench_train_data.py [--repeats 15] [--threads 2]``.
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
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_train_data.json"))
    args = ap.parse_args(argv)
    import torch

    from nbapp.models.arch import build_model
    from nbapp.samples import demo_volume
    from nbapp.train import AugmentConfig, PatchSampler, compute_norms, panoptic_loss, to_unit_range

    torch.set_num_threads(args.threads)
    raw, labels = demo_volume()
    unit, _ = to_unit_range(raw)
    labels = labels.astype(np.int32)
    norms = compute_norms(unit)

    def sampler(synthetic_p: float, hard_negatives_p: float = 0.0) -> PatchSampler:
        return PatchSampler(unit, labels, 256, np.random.default_rng(0),
                            aug=AugmentConfig(synthetic_p=synthetic_p,
                                              hard_negatives_p=hard_negatives_p))

    real, synth, hard = sampler(0.0), sampler(1.0), sampler(1.0, 1.0)
    model = build_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = real.batch(args.batch_size, norms)

    def step():
        out = model(batch["image"], 2, False)
        loss, _ = panoptic_loss(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rows = timeit({"real patch": real.sample, "synthetic patch": synth.sample,
                   "synthetic patch, hard negatives": hard.sample}, args.repeats)
    rows.update(timeit({f"training step (batch {args.batch_size})": step},
                       max(3, args.repeats // 3)))
    step_ms = rows[f"training step (batch {args.batch_size})"]["median_ms"]
    hard_ms = rows["synthetic patch, hard negatives"]["median_ms"]
    ratios = {"synthetic / real patch": rows["synthetic patch"]["median_ms"]
              / rows["real patch"]["median_ms"],
              "hard negatives / synthetic patch": hard_ms / rows["synthetic patch"]["median_ms"],
              "synthetic patch / training step": rows["synthetic patch"]["median_ms"] / step_ms,
              "real patch / training step": rows["real patch"]["median_ms"] / step_ms}
    print("nbapp training-data benchmark, 256x256 patches")
    report(machine(), rows, ratios, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
