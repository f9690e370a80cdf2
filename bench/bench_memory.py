"""Memory the network needs per input pixel (CPU), the basis of nbapp.engine's
FORWARD_BYTES_PER_PIXEL, and how well nbapp.volume.job_memory predicts a 3D job's peak.

Each row runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own:
the growth of the peak over the resident memory after loading the model and the input, divided by the
model-input pixels (2D: batch x H x W / downsampling^2) or compared with job_memory (3D).

Run: ``python bench/bench_memory.py``. Writes bench/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS_2D = [(512, 4, 1, False), (1024, 1, 1, False), (1024, 4, 1, False), (1024, 1, 1, True),
           (2048, 1, 1, False), (2048, 1, 2, False), (2048, 1, 4, False)]
ROWS_3D = [((48, 256, 256), True), ((48, 256, 256), False), ((96, 512, 512), True),
           ((96, 512, 512), False)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory now (the peak so far may be higher: model loading, warm-up)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_mb()


def one_2d(side: int, batch: int, ds: int, fine: bool) -> dict:
    import numpy as np

    from nbapp.engine import FORWARD_BYTES_PER_PIXEL, Engine

    engine = Engine("default", device="cpu", batch_size=batch)
    images = np.random.default_rng(0).integers(0, 255, (batch, side, side), dtype=np.uint8)
    engine.infer(images[:, :64, :64])  # warm-up: kernels and allocator
    before = rss_mb()
    engine.infer(images, downsampling=ds, fine_boundaries=fine)
    grown = (peak_mb() - before) * 2**20
    pixels = batch * (side // ds) ** 2
    return {"side": side, "batch": batch, "downsampling": ds, "fine_boundaries": fine,
            "peak_growth_mb": grown / 2**20, "bytes_per_input_pixel": grown / pixels,
            "constant": FORWARD_BYTES_PER_PIXEL}


def one_3d(shape: tuple, ortho: bool) -> dict:
    import numpy as np

    from nbapp.params import VolumeParams
    from nbapp.run3d import job_steps, make_engines
    from nbapp.samples import demo_volume
    from nbapp.volume import job_memory

    n = max(12, int(np.prod(shape) / 350_000))
    vol = demo_volume(shape=shape, n_mito=n, seed=11)[0]
    params = VolumeParams(orthoplane=ortho)
    engines = make_engines("default", ["cpu"])
    before = rss_mb()
    gen = job_steps(engines, vol, params)
    for _ in gen:
        pass
    grown = (peak_mb() - before) * 2**20
    predicted = job_memory(vol.shape, params, engines[0])
    return {"volume": "x".join(map(str, shape)), "mode": "ortho" if ortho else "single",
            "peak_growth_mb": grown / 2**20, "predicted_mb": predicted / 2**20,
            "predicted_over_measured": predicted / grown}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_memory.json"))
    args = ap.parse_args(argv)
    if args.one:
        kind, spec = json.loads(args.one)
        row = one_2d(*spec) if kind == "2d" else one_3d(tuple(spec[0]), spec[1])
        print(json.dumps(row))
        return 0
    rows = {"2d": [], "3d": []}
    for kind, specs in (("2d", ROWS_2D), ("3d", ROWS_3D)):
        for spec in specs:
            res = subprocess.run([sys.executable, __file__, "--one", json.dumps([kind, spec])],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return res.returncode
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows[kind].append(row)
            print(json.dumps(row), flush=True)
    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, **rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
