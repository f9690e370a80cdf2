"""Blockwise 3D benchmark: bounded memory as volumes grow, time against the in-memory job, and
how close the blockwise labels are to the in-memory ones.

Two parts, each case in a fresh subprocess (so that peak memory is its own):

``--part scale``: ortho-plane jobs on volumes of 64 M, 256 M and 1 G voxels, tiled from the
synthetic demo volume into a zarr store on disk (read lazily by both paths): wall time and peak
resident memory of the blockwise job (default block size, OME-Zarr output) and of the in-memory
job where its estimate fits in the memory this machine has.

``--part fidelity``: F1@0.5 between the blockwise and the in-memory labels, and of each against
the ground truth: the default model on the real Lucchi++ FIB-SEM volume (a 165x512x512 crop in
4 blocks at downsampling 1 and 2 (2 is the scale suggestion for its 5 nm voxels); the whole
volume with the default blocks), and a perfect network (ideal heads of each slice's
instances, tests/models.py) on UroCell label volumes (64-voxel blocks).

``--part invariance`` (issue 29): whole Lucchi++ (165x768x1024) with the default model at
downsampling 1 and 2, in memory once and blockwise at three block sizes (the default budget's,
256 and 96; the network stage runs once and its per-slice labels are reused by the other two):
F1@0.5 and the share of equal voxels between blockwise and in-memory labels, and the F1 of each
against the truth; and a MitoNet_v1-architecture network with random weights (global pooling
in its ASPP; bench_mitonet_speed.py) on a 32x192x192 crop at blocks of 64 and 48.

``--part blockmem``: peak memory of counting and writing one ortho-plane block (192 and 256
voxels a side), bytes per voxel: what sizes the default blocks.

``--part crop``: why the real network's blockwise labels differ: the share of pixels whose
foreground probability changes by more than 0.25 when an xz slice is cropped to a block.

``--part consensus``: the consensus re-run from stored per-plane stacks (``nbapp consensus``)
in memory and block by block, on stacks of 64 M and 256 M voxels (``--sizes``) in zarr stores:
three views of the UroCell mitochondria labels that disagree (xz misses every 5th object, yz
every 7th and sees the others one voxel thinner), tiled mirrored with new ids per tile. Wall
time, peak resident memory, objects, and the share of voxels on which the two results agree.

Run: ``python bench/bench_blockwise.py --part scale [--sizes 64M,256M,1G] [--downsampling 2]``,
``--part fidelity``, ``--part invariance [--cases lucchi1,lucchi2,mitonet]``, ``--part crop`` and ``--part consensus [--sizes 64M,256M]``. Writes bench/results/bench_blockwise_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("NBAPP_DATA", HERE.parents[1] / "shared" / "data"))
SIZES = {"64M": (256, 512, 512), "256M": (256, 1024, 1024), "1G": (1024, 1024, 1024)}


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def tiled_store(shape: tuple, folder: Path) -> Path:
    """The demo volume tiled (mirrored at every seam, so no edge is a cut) into a zarr array."""
    import zarr

    from nbapp.samples import demo_volume

    path = folder / f"vol_{'x'.join(map(str, shape))}.zarr"
    if path.exists():
        return path
    tile = demo_volume()[0]
    reps = [int(np.ceil(s / t)) for s, t in zip(shape, tile.shape)]
    arr = zarr.create_array(str(path), shape=shape, chunks=(32, 256, 256), dtype="uint8")
    for z in range(0, shape[0], 32):
        zs = np.arange(z, min(shape[0], z + 32))
        zi = np.where((zs // tile.shape[0]) % 2 == 0, zs % tile.shape[0],
                      tile.shape[0] - 1 - zs % tile.shape[0])
        slab = tile[zi]
        row = np.concatenate([slab if i % 2 == 0 else slab[:, ::-1] for i in range(reps[1])],
                             axis=1)[:, : shape[1]]
        row = np.concatenate([row if i % 2 == 0 else row[:, :, ::-1] for i in range(reps[2])],
                             axis=2)[:, :, : shape[2]]
        arr[z : z + len(zs)] = row
    return path


def child_scale(store: str, mode: str, downsampling: int, out: str) -> dict:
    from nbapp.blockwise import BlockParams, blockwise_steps
    from nbapp.io import read_image
    from nbapp.params import SliceParams, VolumeParams
    from nbapp.run3d import drain, job_steps, make_engines

    vol = read_image(store, lazy=True)[0]
    params = VolumeParams(slice=SliceParams(downsampling=downsampling))
    engines = make_engines("default", "cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "blockwise":
        res = drain(blockwise_steps(engines, vol, out, params, BlockParams()))
        objects, extra = res.objects, {"blocks": res.blocks, "block_size": res.block_size,
                                       "timings": res.timings}
    else:
        res = drain(job_steps(engines, vol, params))
        from nbapp.io import write_labels

        write_labels(out, res.labels)
        objects, extra = int(res.labels.max()), {}
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_rss_mb": peak / 1024, "rss_before_job_mb": rss0 / 1024,
            "objects": objects, **extra}


def consensus_stacks(shape: tuple, folder: Path) -> dict:
    """Three disagreeing views of the UroCell labels tiled to ``shape``, as zarr stores."""
    import tifffile
    import zarr
    from scipy import ndimage as ndi

    paths = {p: folder / f"stack_{'x'.join(map(str, shape))}_{p}.zarr" for p in ("xy", "xz", "yz")}
    if all(p.exists() for p in paths.values()):
        return paths
    base = tifffile.imread(DATA / "urocell_mito_labels" / "mito_instance_fib1-3-2-1.tif").astype(np.int32)
    ids = np.arange(base.max() + 1)
    xz = np.where(np.isin(base, ids[ids % 5 == 0]), 0, base)
    thin = np.zeros_like(base)
    for i in ids[1:]:
        if i % 7:
            thin[ndi.binary_erosion(base == i)] = i
    views = {"xy": base, "xz": xz, "yz": thin}
    n = int(base.max()) + 1
    reps = [int(np.ceil(s / t)) for s, t in zip(shape, base.shape)]
    for plane, view in views.items():
        arr = zarr.create_array(str(paths[plane]), shape=shape, chunks=(64, 256, 256), dtype="int32",
                                fill_value=0)
        k = 0
        for a in range(reps[0]):
            for b in range(reps[1]):
                for c in range(reps[2]):
                    tile = view[:: (-1 if a % 2 else 1), :: (-1 if b % 2 else 1), :: (-1 if c % 2 else 1)]
                    tile = np.where(tile > 0, tile + k * n, 0)
                    k += 1
                    lo = [i * s for i, s in zip((a, b, c), base.shape)]
                    sl = tuple(slice(l, min(l + s, S)) for l, s, S in zip(lo, base.shape, shape))
                    arr[sl] = tile[tuple(slice(0, x.stop - x.start) for x in sl)]
    return paths


def child_consensus(folder: str, size: str, mode: str, out: str) -> dict:
    from nbapp.blockwise import BlockParams, VolumeSource, consensus_blockwise_steps
    from nbapp.io import read_image, write_labels
    from nbapp.params import ConsensusParams
    from nbapp.run3d import drain
    from nbapp.volume import consensus

    paths = consensus_stacks(SIZES[size], Path(folder))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stacks = {p: read_image(path, lazy=True)[0] for p, path in paths.items()}
    extra = {}
    if mode == "blockwise":
        res = drain(consensus_blockwise_steps(stacks, out, ConsensusParams(), BlockParams(),
                                              sources={p: VolumeSource(str(v)) for p, v in paths.items()}))
        objects, extra = res.objects, {"blocks": res.blocks, "block_size": res.block_size,
                                       "timings": res.timings}
    else:
        labels = consensus({p: np.asarray(s[...]) for p, s in stacks.items()}, ConsensusParams())
        write_labels(out, labels)
        objects = int(labels.max())
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_rss_mb": peak / 1024, "rss_before_job_mb": rss0 / 1024,
            "objects": objects, **extra}


def agreement(a_path: Path, b_path: Path) -> float:
    """Share of voxels with the same label in two outputs (read slab by slab)."""
    from nbapp.io import read_image

    a, b = read_image(a_path, lazy=True)[0], read_image(b_path, lazy=True)[0]
    same = 0
    for z in range(0, a.shape[0], 32):
        same += int((np.asarray(a[z:z + 32]) == np.asarray(b[z:z + 32])).sum())
    return same / float(np.prod(a.shape))


def child_fidelity(case: str, ds: int = 2, block: int = 0) -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tifffile
    from models import LabelEngine, f1_score

    from nbapp.blockwise import BlockParams, blockwise_steps
    from nbapp.params import SliceParams, VolumeParams
    from nbapp.run3d import drain, job_steps, make_engines

    with tempfile.TemporaryDirectory() as tmp:
        if case.startswith("lucchi"):
            vol = tifffile.imread(DATA / "lucchi_pp_train" / "train_raw.tif")
            gt = tifffile.imread(DATA / "lucchi_pp_train" / "train_mito_instances_3d_cc.tif")
            if case == "lucchi_crop":  # 165 x 512 x 512: 4 blocks of 256
                vol, gt = vol[:, :512, :512], gt[:, :512, :512]
            params = VolumeParams(slice=SliceParams(downsampling=ds))
            engines = make_engines("default", "cpu")
            blocks = BlockParams(block_size=block or None)
        else:
            gt = tifffile.imread(DATA / "urocell_mito_labels" / case)
            vol = gt.astype(np.float32)
            params = VolumeParams()
            engines = [LabelEngine()]
            blocks = BlockParams(block_size=block)
        t0 = time.perf_counter()
        mem = drain(job_steps(engines, vol, params)).labels
        t1 = time.perf_counter()
        res = drain(blockwise_steps(engines, vol, Path(tmp) / "out.zarr", params, blocks))
        t2 = time.perf_counter()
        lab = np.asarray(res.labels()[...])
    return {"case": case, "downsampling": ds,
            "blocks": res.blocks, "block_size": res.block_size,
            "objects_in_memory": int(mem.max()), "objects_blockwise": int(lab.max()),
            "f1_blockwise_vs_in_memory": f1_score(lab, mem),
            "f1_in_memory_vs_truth": f1_score(mem, gt), "f1_blockwise_vs_truth": f1_score(lab, gt),
            # (not the timing benchmark: see --part scale)
            "in_memory_s": t1 - t0, "blockwise_s": t2 - t1}


def child_invariance(case: str) -> list:
    """Blockwise against in-memory labels at three block sizes (see the module docstring)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tifffile
    from models import f1_score

    from nbapp.blockwise import BlockParams, blockwise_steps
    from nbapp.engine import Engine
    from nbapp.params import SliceParams, VolumeParams
    from nbapp.run3d import drain, job_steps

    if case.startswith("lucchi"):
        ds = int(case[-1])
        vol = tifffile.imread(DATA / "lucchi_pp_train" / "train_raw.tif")
        gt = tifffile.imread(DATA / "lucchi_pp_train" / "train_mito_instances_3d_cc.tif")
        engines = [Engine("default", device="cpu", batch_size=4)]
        sizes = [None, 256, 96]
    else:
        from bench_mitonet_speed import build_mitonet_arch

        ds = 1
        vol = tifffile.imread(DATA / "lucchi_pp_train" / "train_raw.tif")[:32, :192, :192]
        gt = None
        engines = [Engine(build_mitonet_arch(), device="cpu", batch_size=4)]
        sizes = [64, 48]
    params = VolumeParams(slice=SliceParams(downsampling=ds))
    t0 = time.perf_counter()
    mem = drain(job_steps(engines, vol, params)).labels
    rows = [{"case": case, "downsampling": ds, "mode": "in-memory", "objects": int(mem.max()),
             "wall_s": time.perf_counter() - t0,
             "f1_vs_truth": None if gt is None else f1_score(mem, gt)}]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            t0 = time.perf_counter()
            res = drain(blockwise_steps(engines, vol, Path(tmp) / "out.zarr", params,
                                        BlockParams(block_size=size), keep_work=True))
            wall = time.perf_counter() - t0
            lab = np.asarray(res.labels()[...])
            rows.append({"case": case, "downsampling": ds, "mode": "blockwise",
                         "block_size": res.block_size, "blocks": res.blocks,
                         "objects": int(lab.max()), "wall_s": wall,
                         "network_reused": res.slabs_skipped == res.slabs,
                         "timings": res.timings,
                         "f1_vs_in_memory": f1_score(lab, mem),
                         "equal_voxels": float((lab == mem).mean()),
                         "identical": bool(np.array_equal(lab, mem)),
                         "f1_vs_truth": None if gt is None else f1_score(lab, gt)})
            print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
    return rows


def child_blockmem(side: int) -> dict:
    """Peak memory of counting and writing one ortho-plane block of ``side``^3 voxels (three
    views of 400 synthetic ellipsoids as tracked labels), bytes per voxel above the views."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from models import ellipsoids

    from nbapp.blockwise.blocks import count_block, decide, write_block
    from nbapp.blockwise.store import WorkStore
    from nbapp.params import PLANES, ConsensusParams

    shape = (side,) * 3
    lab = ellipsoids(shape, n=400, seed=1).astype(np.int64)
    views = {"xy": lab, "xz": np.where(lab > 0, lab + 1000, 0), "yz": np.roll(lab, 1, axis=2)}
    with tempfile.TemporaryDirectory() as tmp:
        store = WorkStore(Path(tmp) / "o.zarr")
        store.open({"bench": 1}, shape, shape)

        def read(plane, box):
            return views[plane][tuple(slice(a, b) for a, b in box)]

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        count_block(read, store, store.grid[0], PLANES, True)
        t1 = time.perf_counter()
        peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        decide(store, PLANES, ConsensusParams(), True)
        write_block(read, store, store.grid[0], PLANES, True, False)
        t2 = time.perf_counter()
        peak2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"side": side, "objects": int(lab.max()),
            "count_bytes_per_voxel": (peak1 - base) * 1024 / side ** 3,
            "write_bytes_per_voxel": (peak2 - base) * 1024 / side ** 3,
            "count_s": t1 - t0, "write_s": t2 - t1}


def crop_sensitivity() -> list:
    """How much the network's output on a block differs from its output on the whole slice:
    the share of pixels whose foreground probability moves by more than 0.25, 48 pixels or
    more inside a 336-pixel crop of four Lucchi++ xz slices (165 x 1024), for 16 crop offsets."""
    import tifffile

    from nbapp.engine import Engine
    from nbapp.volume import get_slice, volume_intensity

    vol = tifffile.imread(DATA / "lucchi_pp_train" / "train_raw.tif")
    intensity = volume_intensity(vol)
    engine = Engine("default", device="cpu", batch_size=4)
    full = np.stack([get_slice(vol, "xz", y) for y in (300, 400, 500, 600)])
    w, m = 336, 48
    rows = []
    for ds in (1, 2):
        whole = engine.infer(full, ds, False, intensity)
        shares = []
        for off in range(192, 320, 8):
            crop = engine.infer(np.ascontiguousarray(full[:, :, off:off + w]), ds, False, intensity)
            shares.append(float(np.mean([
                (np.abs(a.sem[0][:, off + m:off + w - m] - b.sem[0][:, m:w - m]) > 0.25).mean()
                for a, b in zip(whole, crop)])))
        rows.append({"downsampling": ds, "offsets": list(range(192, 320, 8)),
                     "share_changed": shares, "mean": float(np.mean(shares)),
                     "max": float(np.max(shares))})
    return rows


def with_median(row: dict, runs: list) -> dict:
    """``row`` with the last run's results; with several runs, every wall time, their median
    and the largest peak memory."""
    row = {**row, **runs[-1]}
    if len(runs) > 1 and all("wall_s" in r for r in runs):
        row["wall_s_runs"] = [r["wall_s"] for r in runs]
        row["wall_s"] = float(np.median(row["wall_s_runs"]))
        row["peak_rss_mb"] = float(max(r["peak_rss_mb"] for r in runs))
    return row


def run_child(args: list) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("scale", "fidelity", "crop", "consensus", "invariance",
                                       "blockmem"),
                    default="scale")
    ap.add_argument("--sizes", default="64M,256M,1G")
    ap.add_argument("--downsampling", type=int, default=2)
    ap.add_argument("--folder", default=None, help="where the tiled volumes go (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each scale case (the row keeps every wall time and the median)")
    ap.add_argument("--out", default=None, help="results file (default: results/bench_blockwise_PART.json)")
    ap.add_argument("--cases", default=None,
                    help="fidelity: only these cases (comma-separated, e.g. lucchi)")
    ap.add_argument("--child", nargs="*", default=None)
    a = ap.parse_args()
    if a.child is not None:
        kind, *rest = a.child
        if kind == "scale":
            store, mode, ds, out = rest
            print(json.dumps(child_scale(store, mode, int(ds), out), default=str))
        elif kind == "consensus":
            print(json.dumps(child_consensus(*rest), default=str))
        elif kind == "blockmem":
            print(json.dumps(child_blockmem(int(rest[0]))))
        elif kind == "invariance":
            print(json.dumps(child_invariance(*rest), default=str))
        else:
            case, ds, block = rest
            print(json.dumps(child_fidelity(case, int(ds), int(block)), default=str))
        return
    rows = []
    if a.part == "crop":
        rows = crop_sensitivity()
        for r in rows:
            print(f"downsampling {r['downsampling']}: mean {100 * r['mean']:.2f} %, max "
                  f"{100 * r['max']:.2f} % of the pixels", flush=True)
    elif a.part == "scale":
        from nbapp.memory import available_bytes
        from nbapp.params import SliceParams, VolumeParams
        from nbapp.volume import job_memory

        folder = Path(a.folder or tempfile.mkdtemp(prefix="nbapp-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        for size in a.sizes.split(","):
            shape = SIZES[size]
            store = tiled_store(shape, folder)
            need = job_memory(shape, VolumeParams(slice=SliceParams(downsampling=a.downsampling)))
            modes = ["blockwise"] + (["in-memory"] if need < 0.8 * available_bytes() else [])
            for mode in modes:
                out = folder / f"out_{size}_{mode}.zarr"
                shutil.rmtree(out, ignore_errors=True)
                runs = []
                for _ in range(a.repeat):
                    runs.append(run_child(["scale", store, mode, a.downsampling, out]))
                    shutil.rmtree(out, ignore_errors=True)
                row = with_median({"size": size, "shape": shape, "voxels": int(np.prod(shape)),
                                   "mode": mode, "in_memory_estimate_gb": need / 1e9}, runs)
                print(json.dumps(row, default=str), flush=True)
                rows.append(row)
        if a.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    elif a.part == "blockmem":
        rows = [run_child(["blockmem", side]) for side in (192, 256)]
        for r in rows:
            print(json.dumps(r), flush=True)
    elif a.part == "invariance":
        for case in (a.cases or "lucchi2,lucchi1,mitonet").split(","):
            out = subprocess.run([sys.executable, __file__, "--child", "invariance", case],
                                 stdout=subprocess.PIPE, text=True)
            got = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 \
                else [{"case": case, "error": f"exit {out.returncode}"}]
            rows += got
    elif a.part == "consensus":
        folder = Path(a.folder or tempfile.mkdtemp(prefix="nbapp-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        for size in a.sizes.split(","):
            consensus_stacks(SIZES[size], folder)
            outs = {}
            for mode in ("blockwise", "in-memory"):
                outs[mode] = folder / f"consensus_{size}_{mode}.zarr"
                shutil.rmtree(outs[mode], ignore_errors=True)
                runs = [run_child(["consensus", folder, size, mode, outs[mode]])
                        for _ in range(a.repeat)]
                row = with_median({"size": size, "shape": SIZES[size], "mode": mode}, runs)
                print(json.dumps(row, default=str), flush=True)
                rows.append(row)
            if all(p.exists() for p in outs.values()):
                rows[-1]["voxels_agreeing_with_blockwise"] = agreement(*outs.values())
                print(f"{size}: agreement {rows[-1]['voxels_agreeing_with_blockwise']:.6f}", flush=True)
            for p in outs.values():
                shutil.rmtree(p, ignore_errors=True)
        if a.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        cases = []
        if (DATA / "lucchi_pp_train").exists():  # (case, downsampling, block (0: default))
            cases += [("lucchi_crop", ds, 256) for ds in (1, 2)]
            cases += [("lucchi", 2, 0)]  # the whole volume, default blocks
        uro = sorted((DATA / "urocell_mito_labels").glob("*.tif"))[:3]
        cases += [(p.name, 1, 64) for p in uro]
        if a.cases:
            cases = [c for c in cases if c[0] in a.cases.split(",")]
        for case in cases:
            row = run_child(["fidelity", *case])
            print(json.dumps(row, default=str), flush=True)
            rows.append(row)
    (HERE / "results").mkdir(exist_ok=True)
    Path(a.out or HERE / "results" / f"bench_blockwise_{a.part}.json").write_text(
        json.dumps({"machine": machine(), "downsampling": a.downsampling, "rows": rows},
                   indent=1, default=str))


if __name__ == "__main__":
    main()
