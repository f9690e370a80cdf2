"""Per-device speed of the engine: one 1024x1024 slice and a batch of slices on each device.

For every device named (default: cpu plus every CUDA GPU) it times, on the same run:

- network: ``Engine.infer`` of one 1024x1024 slice (normalise, pad, forward, crop, to host);
- full 2D inference: network + default post-processing (``SliceSegmenter``, cache miss);
- batch throughput: slices per second for ``--batch`` slices of 1024x1024 through ``infer``;
- the 3D demo volume, ortho-plane, on each device alone and on all of them together
  (``nbapp.segment_volume(devices=...)``), wall time.

CUDA timings synchronise the device before reading the clock. Run:
``python bench/bench_devices.py [--devices cpu,cuda:0] [--out bench/results/bench_devices.json]``.
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

from bench_2d import machine, timeit  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    import torch

    from nbapp.engine import Engine
    from nbapp.inference import SliceSegmenter
    from nbapp.models import load_model
    from nbapp.params import SliceParams, VolumeParams
    from nbapp.samples import demo_volume
    from nbapp.run3d import available_devices, segment_volume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default=None, help="comma list; default cpu + all GPUs")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_devices.json"))
    args = ap.parse_args(argv)
    devices = (args.devices.split(",") if args.devices
               else ["cpu"] + [d for d in available_devices() if d != "cpu"])
    vol = demo_volume()[0]
    rng = np.random.default_rng(0)
    tile = np.tile(vol[vol.shape[0] // 2], (4, 4))
    stack = np.stack([np.roll(tile, int(s), axis=1) for s in rng.integers(0, 1024, args.batch)])
    rows = []
    for dev in devices:
        engine = Engine(load_model("default", device=dev), batch_size=8)
        seg = SliceSegmenter(engine.model)
        flips = iter(range(10**6))

        def full():  # a new image each call (cache miss): network + post-processing
            seg(stack[0] ^ np.uint8(next(flips) % 256), SliceParams())

        t = timeit({"net": lambda: (engine.infer(stack[:1]), _sync(dev)), "full": full},
                    args.repeats)
        net, full_t = t["net"], t["full"]
        engine.infer(stack)  # warm: batch shapes (cuDNN picks its algorithms once per shape)
        _sync(dev)
        t0 = time.perf_counter()
        engine.infer(stack)
        _sync(dev)
        batch_s = time.perf_counter() - t0
        rows.append({"device": dev, "network_ms": net["median_ms"],
                     "full_2d_ms": full_t["median_ms"],
                     "batch_slices_per_s": len(stack) / batch_s,
                     "name": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"})
        print(f"{dev:>8}: network {net['median_ms']:7.1f} ms | full 2D {full_t['median_ms']:7.1f} "
              f"ms | batch {rows[-1]['batch_slices_per_s']:6.1f} slices/s (1024x1024)", flush=True)
    jobs = [[d] for d in devices] + ([devices] if len(devices) > 1 else [])
    vol_rows = []
    for devs in jobs:
        segment_volume(vol[:32, :64, :64], params=VolumeParams(orthoplane=True), devices=devs)  # warm
        t0 = time.perf_counter()
        labels = segment_volume(vol, params=VolumeParams(orthoplane=True), devices=devs)
        wall = time.perf_counter() - t0
        vol_rows.append({"devices": ",".join(devs), "wall_s": wall,
                         "objects": int(labels.max()), "volume": "x".join(map(str, vol.shape))})
        print(f"3D demo ortho on {','.join(devs):>14}: {wall:6.2f} s, {labels.max()} objects",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "slices": rows, "volume": vol_rows},
                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
