"""3D inference benchmark: single-plane and ortho-plane jobs on two volume sizes.

For each (volume, mode) a fresh subprocess runs the job (so peak memory is its own) and reports
wall time split into network (engine time summed over workers), median, 2D post-processing,
tracking and consensus, the share of the wall time that is not the network, and the peak
resident memory. Volumes: 64x256x256 (synthetic demo data) and 165x768x1024 (Lucchi++ train
volume when ../shared/data is present, else synthetic of the same size).

Run: ``python bench/bench_3d.py [--model default] [--sizes small,large] [--devices cpu]``.
Writes bench/results/bench_3d.json.

Multi-device scaling: ``--devices cuda:0,cuda:1,cuda:2,cuda:3 --scaling`` runs each case on the
first 1, 2, ..., N devices and reports the speed-up over one; mode ``blockwise`` runs the
blockwise job with one worker process per device (``--modes ortho,blockwise``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("NBAPP_DATA", HERE.parents[1] / "shared" / "data"))
SIZES = {"small": (64, 256, 256), "large": (165, 768, 1024)}


def load_volume(size: str) -> tuple[np.ndarray, str]:
    shape = SIZES[size]
    lucchi = DATA / "lucchi_pp_train" / "train_raw.tif"
    if size == "large" and lucchi.exists():
        import tifffile

        return tifffile.imread(lucchi), "Lucchi++ train (real FIB-SEM)"
    from nbapp.samples import demo_volume

    n = max(12, int(np.prod(shape) / 350_000))
    return demo_volume(shape=shape, n_mito=n, seed=11)[0], "synthetic demo volume"


def one(size: str, mode: str, model: str, devices: str) -> dict:
    from nbapp.params import VolumeParams
    from nbapp.run3d import job_steps, make_engines

    vol, source = load_volume(size)
    params = VolumeParams(orthoplane=mode != "single")
    engines = make_engines(model, devices.split(","), batch_size=4)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "blockwise":
        return one_blockwise(vol, source, model, devices, engines, params, rss0)
    t0 = time.perf_counter()
    gen = job_steps(engines, vol, params)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result = stop.value
            break
    wall = time.perf_counter() - t0
    t = result.timings
    not_network = t["median_s"] + t["postprocess_s"] + t["tracking_s"] + t["consensus_s"]
    return {
        "volume": "x".join(map(str, vol.shape)), "source": source, "mode": mode,
        "devices": devices, "wall_s": wall, **{k: v for k, v in t.items()},
        "non_network_cpu_s": not_network,
        # wall time not covered by the network pass: what the user waits for beyond the model
        "non_network_wall_share": max(0.0, wall - t["network_s"]) / wall,
        "objects": int(result.labels.max()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_job_mb": rss0 / 1024,
        "volume_mb": vol.nbytes / 2**20,
    }


def one_blockwise(vol, source, model, devices, engines, params, rss0) -> dict:
    """The blockwise job, one worker process per device, from a file (workers read it)."""
    import tempfile

    from nbapp.blockwise import BlockParams, VolumeSource, blockwise_steps
    from nbapp.run3d import drain

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "vol.npy", vol)
        src = VolumeSource(str(Path(tmp) / "vol.npy"))
        t0 = time.perf_counter()
        res = drain(blockwise_steps(engines, src.open(), Path(tmp) / "out.zarr", params,
                                    BlockParams(), workers="processes", model=model, source=src))
        wall = time.perf_counter() - t0
    zero = {k: 0.0 for k in ("network_s", "median_s", "postprocess_s", "tracking_s",
                             "consensus_s")}
    return {"volume": "x".join(map(str, vol.shape)), "source": source, "mode": "blockwise",
            "devices": devices, "wall_s": wall, **zero, **res.timings,
            "non_network_cpu_s": 0.0, "non_network_wall_share": 0.0, "objects": res.objects,
            "blocks": res.blocks,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_job_mb": rss0 / 1024, "volume_mb": vol.nbytes / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--modes", default="single,ortho")
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--scaling", action="store_true",
                    help="run on the first 1, 2, ..., N of --devices and report the speed-up")
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_3d.json"))
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.model, args.devices)))
        return 0
    rows = []
    devs = args.devices.split(",")
    device_lists = [",".join(devs[:k]) for k in range(1, len(devs) + 1)] if args.scaling \
        else [args.devices]
    cases = [(size, mode, d) for size in args.sizes.split(",") for mode in args.modes.split(",")
             for d in device_lists]
    for size, mode, devices in cases:
        res = subprocess.run([sys.executable, __file__, "--one", size, mode, "--model", args.model,
                              "--devices", devices], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        one_device = [q for q in rows if q["volume"] == r["volume"] and q["mode"] == r["mode"]
                      and "," not in q["devices"]]
        if args.scaling and one_device:
            r["speedup_over_one_device"] = one_device[0]["wall_s"] / r["wall_s"]
        print(f"{r['volume']:>14} {r['mode']:>6}: wall {r['wall_s']:7.1f} s | network "
              f"{r['network_s']:6.1f} median {r['median_s']:5.1f} post {r['postprocess_s']:5.1f} "
              f"tracking {r['tracking_s']:5.1f} consensus {r['consensus_s']:5.1f} s | non-network "
              f"wall share {100 * r['non_network_wall_share']:4.1f} % | peak RSS "
              f"{r['peak_rss_mb']:7.0f} MB (volume {r['volume_mb']:.0f} MB) | {r['objects']} objects"
              f" | {r['devices']}" + (f" | x{r['speedup_over_one_device']:.2f}"
                                      if "speedup_over_one_device" in r else ""),
              flush=True)
    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "model": args.model, "rows": rows}, indent=2))
    print(f"machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
