"""Huge 2D slices in tiles (issue 29 item 2): time and peak memory, tiled against untiled where
untiled fits, and how close the tiled outputs and labels are to the whole image's.

Each case runs in a fresh subprocess (its peak resident memory is its own). The image is real
EM: Lucchi++ FIB-SEM slices (768x1024, 5 nm) mirrored into a mosaic of the asked size (the CEM
crops when Lucchi++ is absent), the default model, default post-processing.

``--part equal``: at sizes where the untiled forward pass fits (``--sizes 2048,4096``, square),
the untiled and the tiled 2D segmentation (the engine's automatic tile size, or ``--core``):
wall time, peak memory, the largest difference of each network output and the share of equal
label pixels.

``--part huge``: a 20,000 x 20,000 px slice (``--sizes 20000``) at ``--downsampling`` 2 (and
whatever else is asked), tiled: network and post-processing time, peak memory, objects found.
The untiled estimate is printed for comparison (it does not fit this machine).

``--part mitonet``: a MitoNet_v1-architecture network with random weights
(bench_mitonet_speed.py; PointRend picks its most uncertain points over the whole input and
ASPP pools all of it, so its tiles cannot be exact and are blended) on a 1024 x 1024 slice in
tiles of 256 and 512: the largest and the 99th-percentile difference of each output from the
untiled outputs, and the share of equal foreground pixels (probability >= 0.5).

Run: ``python bench/bench_tiles.py --part equal``, ``--part huge [--downsampling 2]`` and
``--part mitonet``.
Writes bench/results/bench_tiles_<part>.json.
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


def mosaic(side: int) -> tuple[np.ndarray, str]:
    """A side x side uint8 mosaic of real EM, mirrored at the joins."""
    raw = DATA / "lucchi_pp_train" / "train_raw.tif"
    if raw.exists():
        import tifffile

        with tifffile.TiffFile(raw) as tf:
            tiles = [tf.pages[z].asarray() for z in (20, 48, 80, 120)]
        source = "Lucchi++ train_raw slices 20, 48, 80, 120 (768x1024, 5 nm), mirrored"
    else:
        from nbapp.samples import cem_crops

        tiles = [c[1] for c in cem_crops() if c[1].shape == (224, 224)]
        source = "CEM crops (224x224), mirrored"
    th, tw = tiles[0].shape
    out = np.empty((side, side), np.uint8)
    for i, y in enumerate(range(0, side, th)):
        for j, x in enumerate(range(0, side, tw)):
            t = tiles[(i * 3 + j) % len(tiles)]
            t = t[::-1] if i % 2 else t
            t = t[:, ::-1] if j % 2 else t
            out[y : y + th, x : x + tw] = t[: side - y, : side - x]
    return out, source


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_case(side: int, ds: float, tile, out_npz: str | None) -> dict:
    """One segmentation in this process: the image, the engine, network and post-processing."""
    import torch

    from nbapp.inference import SliceSegmenter
    from nbapp.params import SliceParams

    torch.set_num_threads(os.cpu_count() or 1)
    image, source = mosaic(side)
    before = peak_rss()
    seg = SliceSegmenter("default", device="cpu", cache_size=1, tile=tile)
    params = SliceParams(downsampling=ds)
    t0 = time.perf_counter()
    heads = seg.heads(image, params)
    t1 = time.perf_counter()
    labels = seg.postprocess(heads, params)
    t2 = time.perf_counter()
    objects = int(len(np.unique(labels)) - 1)
    if out_npz:
        np.savez(out_npz, sem=heads.sem, ctr=heads.ctr, offsets=heads.offsets, labels=labels)
    return {"side": side, "downsampling": ds, "tile": tile, "source": source,
            "tiles": heads.meta.get("tiles", 1), "tile_core": heads.meta.get("tile_core"),
            "tiled_exact": heads.meta.get("tiled_exact"), "network_s": round(t1 - t0, 2),
            "postprocess_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
            "objects": objects, "peak_rss_gb": round(peak_rss() / 1e9, 2),
            "rss_before_gb": round(before / 1e9, 2)}


def run_case(side: int, ds: float, tile, out_npz: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--case", f"{side},{ds},{tile},{out_npz or ''}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"side": side, "downsampling": ds, "tile": tile,
                "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_equal(sizes: list[int], ds: float, core) -> list[dict]:
    rows = []
    tmp = Path("/tmp/bench_tiles")
    tmp.mkdir(exist_ok=True)
    for side in sizes:
        a_path, b_path = str(tmp / f"whole_{side}.npz"), str(tmp / f"tiled_{side}.npz")
        whole = run_case(side, ds, 0, a_path)
        tiled = run_case(side, ds, core, b_path)
        row = {"side": side, "downsampling": ds, "untiled": whole, "tiled": tiled}
        if "error" not in whole and "error" not in tiled:
            a, b = np.load(a_path), np.load(b_path)
            row["max_abs_diff"] = {k: float(np.abs(a[k] - b[k]).max())
                                   for k in ("sem", "ctr", "offsets")}
            row["labels_equal_share"] = float((a["labels"] == b["labels"]).mean())
            row["labels_identical"] = bool(np.array_equal(a["labels"], b["labels"]))
            row["time_ratio"] = round(tiled["total_s"] / whole["total_s"], 2)
            row["memory_ratio"] = round(tiled["peak_rss_gb"] / whole["peak_rss_gb"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def part_huge(sizes: list[int], dss: list[float], core) -> list[dict]:
    from nbapp.engine import FORWARD_BYTES_PER_PIXEL, HEADS_BYTES_PER_PIXEL

    rows = []
    for side in sizes:
        for ds in dss:
            row = run_case(side, ds, core)
            hd = -(-side // ds) if ds >= 1 else int(side / ds)
            row["untiled_estimate_gb"] = round((hd * hd * FORWARD_BYTES_PER_PIXEL
                                                + side * side * HEADS_BYTES_PER_PIXEL) / 1e9, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def part_mitonet(cores: list[int]) -> list[dict]:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_mitonet_speed import build_mitonet_arch

    from nbapp.engine import Engine
    from nbapp.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    image, source = mosaic(1024)
    model = load_model(build_mitonet_arch(), device="cpu")
    t0 = time.perf_counter()
    whole = Engine(model, tile=0).infer(image)[0]
    t_whole = time.perf_counter() - t0
    rows = []
    for core in cores:
        t0 = time.perf_counter()
        tiled = Engine(model, tile=core).infer(image)[0]
        row = {"core": core, "source": source, "tiles": tiled.meta["tiles"],
               "tiled_exact": tiled.meta["tiled_exact"],
               "untiled_s": round(t_whole, 1), "tiled_s": round(time.perf_counter() - t0, 1),
               "foreground_equal_share": float(((whole.sem >= 0.5) == (tiled.sem >= 0.5)).mean())}
        for name in ("sem", "ctr", "offsets"):
            a, b = getattr(whole, name), getattr(tiled, name)
            d = np.abs(a - b)
            row[name] = {"max_abs_diff": float(d.max()), "p99_abs_diff": float(np.percentile(d, 99)),
                         "range": [float(a.min()), float(a.max())]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["equal", "huge", "mitonet"])
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--downsampling", default=None)
    ap.add_argument("--core", type=int, default=None, help="tile core (default: the engine's)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        side, ds, tile, out = args.case.split(",")
        tile = None if tile == "None" else int(tile)
        ds = float(ds) if "." in ds and float(ds) < 1 else int(float(ds))
        print(json.dumps(one_case(int(side), ds, tile, out or None)))
        return
    t0 = time.time()
    if args.part == "equal":
        sizes = [int(s) for s in (args.sizes or "2048,4096").split(",")]
        rows = part_equal(sizes, int(args.downsampling or 1), args.core)
    elif args.part == "mitonet":
        rows = part_mitonet([256, 512])
    else:
        sizes = [int(s) for s in (args.sizes or "20000").split(",")]
        dss = [int(d) for d in (args.downsampling or "2").split(",")]
        rows = part_huge(sizes, dss, args.core)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                      f"Python {platform.python_version()}",
           "torch": __import__("torch").__version__, "wall_s": round(time.time() - t0, 1),
           "rows": rows}
    path = HERE / "results" / f"bench_tiles_{args.part}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
