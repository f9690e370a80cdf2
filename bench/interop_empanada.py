"""Interop check: nbapp's default model config run by empanada-napari 1.2.4's own 2D engine.

What it does
------------
1. Imports empanada-napari 1.2.4's 2D inference code (``empanada_napari.inference.Engine2d``,
   ``empanada_napari.utils`` and the bundled ``empanada`` package) WITHOUT napari or Qt: the
   package's ``__init__`` (which builds the napari widgets) is skipped, and if napari is not
   installed a stand-in ``napari.qt.threading.thread_worker`` (an identity decorator) is put in
   ``sys.modules`` only while ``empanada_napari.inference`` is imported (``Engine2d`` never
   uses it; only the 3D helpers are decorated with it).
2. Registers nbapp's ``nbapp/models/default/nbapp_mito.yaml`` the way a napari user does
   ("Register new model" widget = ``empanada_napari.utils.add_new_model``) in a throw-away
   ``HOME``, reads it back with ``get_configs()`` + ``read_yaml`` exactly as the 2D widget does,
   and records which registration routes work.
3. Runs ``Engine2d.infer`` (the widget's non-tiled path: ``resize_by_factor`` -> ``Preprocessor``
   -> ``PanopticDeepLabRenderEngine`` -> ``force_connected``) and nbapp's ``SliceSegmenter`` on
   the same images with the same parameters (empanada ``confidence_thr`` = nbapp
   ``seg_threshold``, ``nms_threshold`` = ``center_threshold``, ``nms_kernel`` =
   ``min_distance``, ``label_divisor``, ``fine_boundaries``, ``inference_scale`` =
   ``downsampling``), at downsampling 1 and 2, coarse and fine boundaries.
4. Compares empanada's labels with nbapp's (``nbapp.metrics.slice_metrics``: F1@0.5, F1@0.75,
   PQ, foreground IoU, pooled over slices) and both with the ground truth where there is one.

Images: the Lucchi++ held-out slices (``/work/shared/data/lucchi_pp_train/train_raw.tif``,
z >= 130; skipped if absent) and nbapp's synthetic demo volume.

Downsampling > 1: empanada's ``PanopticDeepLabRenderEngine`` multiplies the semantic map with
instance cells upsampled to the ORIGINAL size, so the model must return ``sem_logits`` at
``2 ** (render_steps - 2)`` times its input (an earlier export that ignored ``render_steps``
failed there with a shape error; ``NBMitoNet`` now renders). A failure is recorded per row.
At ds > 1 empanada is also run with nbapp's anti-aliased resize in place of its own (a
diagnostic that isolates that FIX).

Setting up empanada without napari (nothing is added to nbapp's dependencies)
------------------------------------------------------------------------------
::

    pip install --no-deps --target /tmp/empsite empanada-napari==1.2.4 \\
        'opencv-python-headless<5' cztile joblib
    # (or the downloaded wheel: pip install --no-deps --target /tmp/empsite
    #  empanada_napari-1.2.4-py3-none-any.whl ...)

The other modules these files import are nbapp's dependencies (torch, numpy, scipy,
scikit-image, zarr, pyyaml, tqdm) or its test extras (dask; numba via stardist) or common
(requests). ``--empanada-site`` (default ``$EMPANADA_SITE`` or ``/tmp/empsite``) is appended to
``sys.path``, after the environment's own packages.

What a napari user does with nbapp's model (what step 2 found): "Register new model" with the
config ``nbapp/models/default/nbapp_mito.yaml`` AND the model file ``.../nbapp_mito.pt`` (the
config's relative ``model: nbapp_mito.pt`` is resolved by empanada from the current directory,
not the YAML's folder); ``add_new_model`` reads ``config['model_quantized']`` unguarded, hence
``model_quantized: null`` in nbapp's config.

Run
---
::

    python bench/interop_empanada.py                 # every 5th held-out Lucchi slice, 8 demo slices
    python bench/interop_empanada.py --lucchi-step 1 # all 35 held-out slices (slower)

Prints a table and writes ``bench/results/interop_empanada.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUCCHI = Path("/work/shared/data/lucchi_pp_train")
LUCCHI_FIRST_HELD_OUT = 130
DEFAULT_SITE = os.environ.get("EMPANADA_SITE", "/tmp/empsite")

#: nbapp SliceParams field -> empanada Engine2d argument (same meaning, same widget default)
PARAM_MAP = {
    "downsampling": "inference_scale",
    "seg_threshold": "confidence_thr",
    "center_threshold": "nms_threshold",
    "min_distance": "nms_kernel",
    "label_divisor": "label_divisor",
    "fine_boundaries": "fine_boundaries",
}


# ---------------------------------------------------------------------------------------------
# empanada without napari
# ---------------------------------------------------------------------------------------------

def import_empanada(site: str | None = DEFAULT_SITE) -> types.SimpleNamespace:
    """Import empanada-napari's 2D engine and utilities without napari, Qt or magicgui.

    Raises ImportError when empanada-napari (or one of its modules' imports) is missing.
    """
    if site and os.path.isdir(site) and site not in sys.path:
        sys.path.append(site)  # last: never shadows nbapp's own environment
    spec = importlib.util.find_spec("empanada_napari")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("empanada_napari is not importable (install the wheel with "
                          "pip install --no-deps --target /tmp/empsite empanada-napari==1.2.4)")
    if "empanada_napari" not in sys.modules:
        # the package __init__ builds the napari dock widgets; its submodules do not need it
        pkg = types.ModuleType("empanada_napari")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = None
        sys.modules["empanada_napari"] = pkg
    stubbed = []
    if importlib.util.find_spec("napari") is None:
        for name in ("napari", "napari.qt", "napari.qt.threading"):
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                stubbed.append(name)
        if "napari.qt.threading" in stubbed:
            sys.modules["napari.qt.threading"].thread_worker = lambda fn=None, **kw: fn
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            utils = importlib.import_module("empanada_napari.utils")
            inference = importlib.import_module("empanada_napari.inference")
            config_loaders = importlib.import_module("empanada.config_loaders")
    finally:
        for name in stubbed:  # leave no fake napari behind for other code in this process
            sys.modules.pop(name, None)
    version = "unknown"
    with contextlib.suppress(Exception):  # the wheel's _version.py is stale; its metadata is not
        from importlib import metadata

        version = metadata.version("empanada-napari")
    return types.SimpleNamespace(
        Engine2d=inference.Engine2d,
        inference=inference,
        utils=utils,
        read_yaml=config_loaders.read_yaml,
        version=version,
        location=str(Path(spec.submodule_search_locations[0]).parent),
        napari_stubbed=bool(stubbed),
    )


@contextlib.contextmanager
def temp_home(home: Path):
    """Point ``~`` (empanada's ``~/.empanada``) and torch's hub dir at a throw-away folder."""
    old_home, old_hub = os.environ.get("HOME"), torch.hub.get_dir()
    os.environ["HOME"] = str(home)
    torch.hub.set_dir(str(home / ".empanada"))
    try:
        yield
    finally:
        if old_home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old_home
        torch.hub.set_dir(old_hub)


def _outcome(fn) -> tuple[bool, str]:
    """Run ``fn``; return (ok, what happened) with stdout/stderr chatter and warnings swallowed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
            result = (True, "ok")
        except Exception as exc:  # noqa: BLE001 - we report whatever empanada raises
            text = str(exc).strip()
            result = (False, f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")
        # torch.hub leaves its temporary file open when a download fails: let it close here,
        # where its ResourceWarning is ignored
        gc.collect()
    return result


def register_in_empanada(emp, config_path: Path, home: Path, name: str = "nbapp_mito") -> tuple[dict, dict]:
    """Register ``config_path`` the way the napari "Register new model" widget does and read it
    back as the 2D widget does. Returns (model_config, notes on each route tried)."""
    config_path = Path(config_path).resolve()
    model_file = str((config_path.parent / emp.read_yaml(str(config_path))["model"]).resolve())
    notes = {}
    with temp_home(home):
        # the config as shipped, read directly (what Engine2d would get if the YAML were simply
        # copied into ~/.empanada/configs): the relative 'model' is looked up from the CWD,
        # then taken for a URL
        raw = emp.read_yaml(str(config_path))
        notes["copy_yaml_to_configs_dir"] = dict(zip(
            ("ok", "outcome"), _outcome(lambda: emp.utils.load_model_to_device(raw["model"], "cpu"))))
        notes["copy_yaml_to_configs_dir"]["cwd"] = os.getcwd()
        # widget with only the config file
        ok, msg = _outcome(lambda: emp.utils.add_new_model(name + "_a", str(config_path)))
        notes["register_config_only"] = {"ok": ok, "outcome": msg}
        # widget with config + model file (the route the widget suggests for a local model)
        ok, msg = _outcome(lambda: emp.utils.add_new_model(name + "_b", str(config_path), model_file))
        notes["register_config_and_model_file"] = {"ok": ok, "outcome": msg}
        # workaround: also give the "quantized model file" (the same float model)
        ok, msg = _outcome(lambda: emp.utils.add_new_model(name, str(config_path), model_file, model_file))
        notes["register_config_model_and_quantized_file"] = {"ok": ok, "outcome": msg}
        configs = emp.utils.get_configs()
        if name not in configs:
            raise RuntimeError(f"registering {config_path} in empanada failed: {notes}")
        model_config = emp.read_yaml(configs[name])
        notes["registered_as"] = str(Path(configs[name]).relative_to(home))
        notes["registered_model"] = model_config["model"]
    return model_config, notes


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def datasets(lucchi_step: int, demo_step: int, max_slices: int | None = None) -> dict:
    """{name: (images (N, H, W), ground truth (N, H, W) or None, z indices)}."""
    from nbapp.samples import demo_volume

    out = {}
    raw = LUCCHI / "train_raw.tif"
    if raw.is_file():
        import tifffile

        vol = tifffile.imread(raw)
        zs = list(range(LUCCHI_FIRST_HELD_OUT, vol.shape[0], lucchi_step))[:max_slices]
        gt_path = LUCCHI / "train_mito_instances_3d_cc.tif"
        gt = tifffile.imread(gt_path)[zs] if gt_path.is_file() else None
        out["lucchi_pp_heldout"] = (vol[zs], gt, zs)
    img, lab = demo_volume()
    zs = list(range(demo_step // 2, img.shape[0], demo_step))[:max_slices]
    out["demo"] = (img[zs], lab[zs], zs)
    return out


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------

def engine_kwargs(params) -> dict:
    """Engine2d keyword arguments with the same meaning as nbapp's ``SliceParams``."""
    return {emp_name: getattr(params, nb_name) for nb_name, emp_name in PARAM_MAP.items()}


def _antialiased_resize(image: np.ndarray, scale_factor: int = 1) -> np.ndarray:
    """nbapp's step 1 (bilinear with anti-aliasing to ceil(h/ds) x ceil(w/ds)) in the place of
    empanada's ``resize_by_factor`` (cv2 bilinear, no anti-aliasing); float32 on the image's own
    grey scale, which empanada's ``Preprocessor`` then divides by 255 like a uint8 image."""
    if scale_factor == 1:
        return image
    h, w = image.shape
    x = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    y = torch.nn.functional.interpolate(x, size=(-(-h // scale_factor), -(-w // scale_factor)),
                                        mode="bilinear", antialias=True, align_corners=False)
    return y[0, 0].numpy()


@contextlib.contextmanager
def nbapp_resize(emp):
    """Diagnostic only: make ``Engine2d.infer`` resize like nbapp (isolates the resize FIX)."""
    old = emp.inference.resize_by_factor
    emp.inference.resize_by_factor = _antialiased_resize
    try:
        yield
    finally:
        emp.inference.resize_by_factor = old


def run_empanada(engine, images: np.ndarray, params) -> np.ndarray:
    """Engine2d.infer on each image after ``update_params`` (what the 2D widget does when the
    model is unchanged); fill_holes and semantic_only are off."""
    kw = engine_kwargs(params)
    engine.update_params(semantic_only=params.semantic_only, tile_size=0, **kw)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return np.stack([engine.infer(im) for im in images])


def make_engine(emp, model_config: dict, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return emp.Engine2d(model_config, semantic_only=False, tile_size=0, use_gpu=False,
                            use_quantized=False, **engine_kwargs(params))


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def compare(pred: np.ndarray, ref: np.ndarray) -> dict:
    from nbapp.metrics import slice_metrics

    m = slice_metrics(pred, ref, thresholds=(0.5, 0.75))
    return _round({k: m[k] for k in ("f1", "f1@0.75", "pq", "fg_iou", "tp", "fp", "fn")})


def unmatched(pred: np.ndarray, ref: np.ndarray) -> dict:
    """The objects of ``pred`` without an IoU >= 0.5 partner in ``ref``: how many, their areas
    and how many touch another object of ``pred`` (8-neighbours), i.e. look like a piece split
    off a neighbour rather than a missed or extra object."""
    from scipy import ndimage as ndi

    from nbapp.metrics import match_instances

    areas, touching = [], 0
    for p, r in zip(pred, ref):
        m = match_instances(p, r, 0.5)
        ids = np.setdiff1d(np.unique(p[p > 0]), m.pred_ids)
        for i in ids.tolist():
            mask = p == i
            ring = ndi.binary_dilation(mask, np.ones((3, 3), bool)) & ~mask
            areas.append(int(mask.sum()))
            touching += bool(np.any(p[ring] > 0))
    return {"n": len(areas), "touching_another": touching,
            "median_area_px": float(np.median(areas)) if areas else None,
            "areas_px": sorted(areas)}


def count(labels: np.ndarray) -> int:
    return int(sum(len(np.unique(s[s > 0])) for s in labels))


def run(args) -> dict:
    from nbapp.inference import SliceSegmenter
    from nbapp.models import default_config_path
    from nbapp.params import SliceParams

    torch.set_num_threads(args.threads)
    emp = import_empanada(args.empanada_site)
    import cv2  # from the empanada site: after import_empanada
    work = Path(tempfile.mkdtemp(prefix="nbapp_interop_"))
    try:
        cfg_path = default_config_path()
        model_config, notes = register_in_empanada(emp, cfg_path, work / "home")

        base = SliceParams(label_divisor=args.label_divisor)
        nb = SliceSegmenter("default", device="cpu", cache_size=4)
        emp_engine = make_engine(emp, model_config, base)

        rows, data = [], datasets(args.lucchi_step, args.demo_step, args.max_slices)
        for dname, (images, gt, zs) in data.items():
            for ds in (1, 2):
                for fine in (False, True):
                    p = SliceParams(downsampling=ds, fine_boundaries=fine,
                                    label_divisor=args.label_divisor)
                    t0 = time.perf_counter()
                    nb_lab = np.stack([nb(im, p) for im in images])
                    t_nb = time.perf_counter() - t0
                    row = {"data": dname, "slices": len(zs), "z": zs, "shape": list(images.shape[1:]),
                           "downsampling": ds, "mode": "fine" if fine else "coarse",
                           "params": {k: getattr(p, k) for k in PARAM_MAP}, "nbapp_s": round(t_nb, 2)}
                    # empanada with the model exactly as shipped
                    t0 = time.perf_counter()
                    ok, msg = _outcome(lambda: run_empanada(emp_engine, images[:1], p))
                    row["shipped_model_in_empanada"] = msg
                    if not ok:
                        rows.append(row)
                        print_row(row, header=len(rows) == 1)
                        continue
                    emp_lab = run_empanada(emp_engine, images, p)
                    row["empanada_s"] = round(time.perf_counter() - t0, 2)
                    row["n_empanada"], row["n_nbapp"] = count(emp_lab), count(nb_lab)
                    row["empanada_vs_nbapp"] = compare(emp_lab, nb_lab)
                    row["foreground_pixels_differ"] = round(float(np.mean((emp_lab > 0) != (nb_lab > 0))), 6)
                    row["unmatched_empanada"] = unmatched(emp_lab, nb_lab)
                    row["unmatched_nbapp"] = unmatched(nb_lab, emp_lab)
                    if ds > 1:
                        with nbapp_resize(emp):  # diagnostic: same resize as nbapp
                            aa_lab = run_empanada(emp_engine, images, p)
                        row["empanada_nbapp_resize_vs_nbapp"] = compare(aa_lab, nb_lab)
                    if gt is not None:
                        row["gt"] = {"empanada": compare(emp_lab, gt), "nbapp": compare(nb_lab, gt)}
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reverse = reverse_direction(emp)
    failing = sorted({r["downsampling"] for r in rows if r["shipped_model_in_empanada"] != "ok"})
    summary = {
        "shipped_config_registers_as_is": notes["register_config_and_model_file"]["ok"],
        "shipped_model_fails_in_empanada_at_downsampling": failing,
        "min_f1_empanada_vs_nbapp": min((r["empanada_vs_nbapp"]["f1"] for r in rows
                                         if "empanada_vs_nbapp" in r), default=None),
    }
    return {
        "what": "nbapp default model config run by empanada-napari 1.2.4's Engine2d vs nbapp",
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "opencv": cv2.__version__, "empanada_napari": emp.version,
                    "empanada_location": emp.location, "napari_stubbed": emp.napari_stubbed,
                    "cpu_threads": args.threads, "platform": platform.platform()},
        "config": str(default_config_path().relative_to(ROOT)),
        "summary": summary,
        "registration": notes,
        "param_map": PARAM_MAP,
        "rows": rows,
        "reverse_direction": reverse,
    }


def reverse_direction(emp) -> dict:
    """nbapp's loader on the empanada configs bundled with empanada-napari (no download)."""
    from nbapp.models import read_config

    cfg_dir = Path(emp.location) / "empanada_napari" / "configs"
    out = {}
    for p in sorted(cfg_dir.glob("*.yaml")):
        ok, msg = _outcome(lambda: read_config(p))
        if ok:
            c = read_config(p)
            msg = f"ok: padding_factor {c.padding_factor}, norms {c.norms}, model URL kept"
        out[p.name] = msg
    return out


def print_row(row: dict, header: bool = False) -> None:
    if header:
        print(f"{'data':18s} {'ds':>2s} {'mode':6s} {'F1@.5':>6s} "
              f"{'F1@.75':>6s} {'FG IoU':>7s} {'n emp':>6s} {'n nb':>5s} {'GT F1 emp/nb':>13s}")
    if row["shipped_model_in_empanada"] != "ok":
        print(f"{row['data']:18s} {row['downsampling']:2d} {row['mode']:6s} the shipped model "
              f"fails in empanada: {row['shipped_model_in_empanada'][:100]}")
        return
    a = row["empanada_vs_nbapp"]
    g = row.get("gt")
    gt = f"{g['empanada']['f1']:.3f}/{g['nbapp']['f1']:.3f}" if g else "-"
    print(f"{row['data']:18s} {row['downsampling']:2d} {row['mode']:6s} "
          f"{a['f1']:6.3f} {a['f1@0.75']:6.3f} {a['fg_iou']:7.4f} {row['n_empanada']:6d} "
          f"{row['n_nbapp']:5d} {gt:>13s}")
    for key, what in (("empanada_nbapp_resize_vs_nbapp",
                       "empanada with nbapp's anti-aliased resize vs nbapp"),):
        if key in row:
            b = row[key]
            print(f"{'':10s}{what:58s} F1 {b['f1']:.3f}  F1@.75 {b['f1@0.75']:.3f}  "
                  f"FG IoU {b['fg_iou']:.4f}")
    ue, un = row["unmatched_empanada"], row["unmatched_nbapp"]
    print(f"{'':10s}unmatched objects: empanada {ue['n']} ({ue['touching_another']} touching another, "
          f"median {ue['median_area_px']} px), nbapp {un['n']} ({un['touching_another']} touching, "
          f"median {un['median_area_px']} px)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--empanada-site", default=DEFAULT_SITE,
                    help="folder holding empanada_napari/ and empanada/ (pip --target)")
    ap.add_argument("--lucchi-step", type=int, default=5, help="every Nth held-out Lucchi++ slice")
    ap.add_argument("--demo-step", type=int, default=6, help="every Nth demo-volume slice")
    ap.add_argument("--max-slices", type=int, default=None, help="at most this many per data set")
    ap.add_argument("--label-divisor", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "interop_empanada.json"))
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except ImportError as exc:
        print(f"empanada-napari is not importable: {exc}\n(see this script's docstring for setup)")
        return 2
    print("\nsummary:", result["summary"])
    r = result["registration"]
    print("registration in empanada-napari (throw-away HOME):")
    for k, v in r.items():
        print(f"  {k}: {v}")
    print("nbapp reading empanada-napari's bundled configs:")
    for k, v in result["reverse_direction"].items():
        print(f"  {k}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
