"""The ``nbapp`` command line: ``segment``, ``info``, ``evaluate``, ``train``.

Every user error is one line on stderr, ``nbapp: error: ...``, and a non-zero exit; no output
file is written unless the run completes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from nbapp.errors import InputError, ModelError, NbappError, ParameterError
from nbapp.memory import check_address_space, is_out_of_memory, out_of_memory_message
from nbapp.params import ConsensusParams, SliceParams, VolumeParams

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``nbapp: error: ...``) instead of usage dumps."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        raise NbappError(f"{message} (see {self.prog} --help)")


def _factor(text: str):
    """--downsampling: 1, 2, 4, ... as int, 0.5 / 0.25 as float (checked by SliceParams)."""
    from nbapp.params import as_factor

    try:
        return as_factor(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_2d_options(p: argparse.ArgumentParser) -> None:
    d = SliceParams()
    g = p.add_argument_group("2D inference (SPEC section 2)")
    g.add_argument("--downsampling", type=_factor, default=d.downsampling, metavar="N",
                   help="Image Downsampling: 1, 2, 4, ..., 64, or 0.5 / 0.25 to enlarge data "
                        "whose pixels are coarser than the model's (default %(default)s)")
    g.add_argument("--seg-threshold", type=float, default=d.seg_threshold, metavar="F",
                   help="Segmentation Confidence Threshold, 0.1-0.9 (default %(default)s)")
    g.add_argument("--center-threshold", type=float, default=d.center_threshold, metavar="F",
                   help="Center Confidence Threshold, 0.05-0.9 (default %(default)s)")
    g.add_argument("--min-distance", type=int, default=d.min_distance, metavar="N",
                   help="Centers Minimum Distance, 1-35 (default %(default)s)")
    g.add_argument("--fine-boundaries", action="store_true",
                   help="group pixels at full resolution instead of the 1/4 grid")
    g.add_argument("--label-divisor", type=int, default=d.label_divisor, metavar="N",
                   help="Max objects per class; 0 numbers objects 1..N (default %(default)s)")
    g.add_argument("--semantic-only", action="store_true", help="no instances, classes only")
    g.add_argument("--fill-holes", action="store_true", help="fill holes inside each instance")


def _add_consensus_options(p: argparse.ArgumentParser) -> None:
    d = ConsensusParams()
    g = p.add_argument_group("consensus and 3D filters (SPEC section 3)")
    g.add_argument("--vote", "--vote-threshold", dest="vote", type=int, default=d.vote_threshold,
                   metavar="N",
                   help="Voxel Vote Threshold Out of 3, 1-3 (default %(default)s)")
    g.add_argument("--allow-one-view", action="store_true",
                   help="Permit detections found in 1 stack into consensus")
    g.add_argument("--min-size", type=int, default=d.min_size, metavar="N",
                   help="Min Size in voxels, 0-1e6 (default %(default)s)")
    g.add_argument("--min-extent", type=int, default=d.min_extent, metavar="N",
                   help="Min Box Extent, 0-1000 (default %(default)s)")


def _add_3d_options(p: argparse.ArgumentParser) -> None:
    d = VolumeParams()
    g = p.add_argument_group("3D inference (--mode 3d, SPEC section 3)")
    g.add_argument("--plane", default=d.plane, help="Inference plane: xy, xz or yz (default %(default)s)")
    g.add_argument("--orthoplane", action=argparse.BooleanOptionalAction, default=d.orthoplane,
                   help="Run ortho-plane: xy, xz and yz stacks and their consensus (default: on)")
    g.add_argument("--median", "--median-size", dest="median", type=int, default=d.median_size,
                   metavar="N",
                   help="Median Filter Size: 1, 3, 5, 7, 9 or 11 (default %(default)s)")
    g.add_argument("--return-stacks", action="store_true",
                   help="also write the per-plane stacks beside OUTPUT: OUTPUT_xy, OUTPUT_xz, "
                        "OUTPUT_yz (ortho-plane) or the one plane's (single-plane)")
    g.add_argument("--devices", default=None, metavar="LIST",
                   help="devices for the job, e.g. cpu or cuda:0,cuda:1 (default: all GPUs, else cpu)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a Dask cluster (needs nbapp[dask]), e.g. tcp://10.0.0.1:8786")
    b = _add_blockwise_options(
        p, "volumes larger than memory (blockwise 3D: OME-Zarr output; chosen by itself when "
        "the in-memory job would not fit)", "volume",
        "default: from a 1.2 GB budget per block, 224")
    b.add_argument("--workers", choices=("threads", "processes"), default="threads",
                   help="with several --devices: one worker process per device running whole "
                        "slabs of slices, then whole blocks (processes), or all devices on one "
                        "slab at a time (threads)")
    _add_consensus_options(p)


def _add_blockwise_options(p: argparse.ArgumentParser, title: str, what: str,
                           size_default: str):
    """--blockwise and --block-size in a group of their own; returns the group."""
    b = p.add_argument_group(title)
    b.add_argument("--blockwise", action="store_true",
                   help=f"run block by block even if the {what} would fit in memory; "
                        "re-running the same command resumes an interrupted run")
    b.add_argument("--block-size", type=_block_size, default=None, metavar="N|Z,Y,X",
                   help=f"largest block core side in voxels (implies --blockwise; "
                        f"{size_default})")
    # (blocks need no margin since issue 29: the option is accepted, said to be unused)
    b.add_argument("--halo", type=int, default=None, help=argparse.SUPPRESS)
    return b


def _no_halo(args) -> None:
    if getattr(args, "halo", None) is not None:
        print("nbapp: --halo is no longer used: blocks need no margin (the labels are the "
              "in-memory job's at any block size); ignored", file=sys.stderr)


def _block_size(text: str):
    """``--block-size``: one side or three (``Z,Y,X``)."""
    try:
        sides = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block size: give N or Z,Y,X") from None
    if len(sides) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give one side or three (Z,Y,X)")
    return sides[0] if len(sides) == 1 else sides


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="confine reading to DIR, as the app does: inputs and models are taken "
                        "from it and must resolve inside it (links, HDF5 external storage, "
                        "zarr links and config paths included); model URLs must be the zoo's")


def _consensus_params(args) -> ConsensusParams:
    return ConsensusParams(vote_threshold=args.vote, allow_one_view=args.allow_one_view,
                           min_size=args.min_size, min_extent=args.min_extent)


def build_parser(with_train: bool = True) -> argparse.ArgumentParser:
    """The ``nbapp`` argument parser; ``with_train=False`` leaves out the training options
    (and the torch import they need), for commands other than ``train``."""
    parser = _Parser(prog="nbapp", description="Panoptic segmentation of organelles in EM.")
    from nbapp import __version__

    parser.add_argument("--version", action="version", version=f"nbapp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    seg = sub.add_parser("segment", help="segment an image, a stack of images or a volume")
    seg.add_argument("input", metavar="INPUT",
                     help=".tif/.tiff, .npy, .zarr (array or OME-Zarr), .mrc, FILE.h5:dataset, .png")
    seg.add_argument("-o", "--output", required=True, metavar="OUTPUT", help=".tif/.tiff or .zarr")
    seg.add_argument("--model", default="default",
                     help="'default', a zoo name (`nbapp models` lists them, e.g. MitoNet_v1; "
                          "downloaded once), an empanada-format CONFIG.yaml or a TorchScript FILE")
    _add_quantized(seg)
    seg.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    seg.add_argument("--mode", choices=("2d", "batch", "3d"), default=None,
                     help="2d (default for 2D input), batch (each slice of a stack on its own), 3d")
    seg.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward pass")
    seg.add_argument("--tile", type=int, default=None, metavar="N",
                     help="2d / batch: run the network in tiles of N px (model input; 0: never). "
                          "Default: only images too large for one forward pass. nbapp's own "
                          "models tile exactly; other models' tiles are blended")
    seg.add_argument("--table", default=None, metavar="TABLE.csv",
                     help="also write the object table (id, voxels, bounding box, centroid, "
                          "extent; one row per object) as CSV")
    _add_data_root(seg)
    _add_2d_options(seg)
    _add_3d_options(seg)

    con = sub.add_parser("consensus", help="ortho-plane consensus from stored xy, xz, yz stacks")
    for name in ("xy", "xz", "yz"):
        con.add_argument(name, metavar=name.upper(), help=f"the {name} stack (.tif or .zarr)")
    con.add_argument("-o", "--output", required=True, metavar="OUTPUT", help=".tif/.tiff or .zarr")
    _add_data_root(con)
    _add_consensus_options(con)
    b = _add_blockwise_options(
        con, "stacks larger than memory (block by block into an OME-Zarr output; chosen by "
        "itself when the in-memory consensus would not fit)", "stacks",
        "default: from a 1.2 GB budget per block")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the blocks on a Dask cluster (needs nbapp[dask])")

    demo = sub.add_parser("demo", help="segment the bundled demo volume with the default model")
    demo.add_argument("-o", "--output", default="nbapp_demo_labels.tif", metavar="OUTPUT")
    demo.add_argument("--model", default="default", help="'default', a zoo name, CONFIG.yaml or FILE")
    _add_quantized(demo)
    demo.add_argument("--device", default=None)
    demo.add_argument("--mode", choices=("2d", "batch", "3d"), default="3d",
                      help="3d (default: ortho-plane with consensus), batch, or 2d (middle slice)")

    info = sub.add_parser("info", help="describe a model")
    info.add_argument("model", nargs="?", default="default", metavar="MODEL",
                      help="'default', a zoo name, CONFIG.yaml or a TorchScript file")
    _add_quantized(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--device", default="cpu")
    _add_data_root(info)

    models = sub.add_parser("models", help="list the model zoo (named models that download once)")
    models.add_argument("--json", action="store_true", help="print JSON")
    what = models.add_mutually_exclusive_group()
    what.add_argument("--path", metavar="NAME", default=None,
                      help="print where NAME's file goes (to put it there by hand when offline)")
    what.add_argument("--download", metavar="NAME", default=None,
                      help="download NAME now (with a progress bar), e.g. before going offline")

    app = sub.add_parser("app", help="serve the widget app as a web page (Voila, 127.0.0.1)")
    app.add_argument("--port", type=int, default=8866, metavar="N",
                     help="port on 127.0.0.1 (default %(default)s)")
    app.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    app.add_argument("--data-root", default=None, metavar="DIR",
                     help="the only folder the app's path box may read (default: ~/nbapp-data, "
                          "or $NBAPP_DATA_HOME; made if missing)")
    app.add_argument("--cull-idle-timeout", type=int, default=3600, metavar="S",
                     help="shut down a kernel whose page is gone after S seconds without "
                          "activity (a running 3D job is kept; default %(default)s)")
    token = app.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, metavar="TOKEN",
                       help="the token visitors need (default: $NBAPP_TOKEN, else a new random "
                            "one, printed in the URL); prefer $NBAPP_TOKEN: a command line is "
                            "visible to every account of the machine")
    token.add_argument("--no-token", action="store_true",
                       help="serve without a token (every local account can use the app)")
    app.add_argument("--models", action="append", default=[], metavar="DIR",
                     help="a folder of models visitors may load (outside the data root; "
                          "repeat for several)")
    app.add_argument("--allow-data-root-models", action="store_true",
                     help="let visitors load model files from the data root (a model file is "
                          "code: only where everyone who can write there is trusted)")
    app.add_argument("--max-kernels", type=int, default=12, metavar="N",
                     help="at most N page sessions at once (about 0.4 GB each; default "
                          "%(default)s)")
    app.add_argument("--max-kernels-per-visitor", type=int, default=3, metavar="N",
                     help="at most N page sessions per browser (default %(default)s)")
    app.add_argument("--connect-timeout", type=int, default=120, metavar="S",
                     help="shut down a session whose page never connected after S seconds "
                          "(default %(default)s)")
    app.add_argument("--disconnect-timeout", type=int, default=600, metavar="S",
                     help="shut down a session whose page went away without closing (a crashed "
                          "browser) after S seconds; a running 3D job finishes first (default "
                          "%(default)s)")

    ev = sub.add_parser("evaluate", help="compare predicted labels with ground truth")
    ev.add_argument("pred", metavar="PRED")
    ev.add_argument("gt", metavar="GT")
    ev.add_argument("--json", action="store_true", help="print JSON")
    how = ev.add_mutually_exclusive_group()
    how.add_argument("--per-slice", dest="per_slice", action="store_true", default=None,
                     help="score each slice of a stack on its own, pooled (2D labels); default: "
                          "when GT looks like per-slice labels")
    how.add_argument("--no-per-slice", dest="per_slice", action="store_false",
                     help="score a stack as one 3D volume even when GT looks per-slice")
    _add_data_root(ev)

    ft = sub.add_parser("finetune", help="fine-tune a model on a few labelled 2D slices "
                                         "(images or stacks of slices)")
    ft.add_argument("--images", nargs="+", required=True, metavar="IMAGE",
                    help="2D images or (N, H, W) stacks of 2D slices")
    ft.add_argument("--labels", nargs="+", required=True, metavar="LABELS",
                    help="their instance (or 0/1) labels, one file per IMAGE, same shapes")
    ft.add_argument("--init", default="default",
                    help="the model to start from: default or a model fine-tuned from it")
    ft.add_argument("--minutes", type=float, default=5.0, help="time limit (default 5)")
    ft.add_argument("--downsampling", type=_factor, default=1, metavar="N",
                    help="train at the scale inference will use (default 1; 0.5 and 0.25 "
                         "enlarge)")
    ft.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.pt + NAME.yaml")
    ft.add_argument("--name", default="finetuned", help="model name (default finetuned)")
    ft.add_argument("--test-images", nargs="*", default=[], metavar="IMAGE",
                    help="held-out images to score before / after on (F1@0.5)")
    ft.add_argument("--test-labels", nargs="*", default=[], metavar="LABELS")
    ft.add_argument("--held-out", type=float, default=0.2, metavar="SHARE",
                    help="share of each slice kept apart as a band and never trained on: the "
                         "weights that score best there are kept, the starting ones included "
                         "(default 0.2; 0 keeps the last weights)")
    ft.add_argument("--device", default="cpu")
    ft.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    if importlib.util.find_spec("nbapp.training") is not None:  # optional in minimal installs
        tr = sub.add_parser("train", help="train a model on volumes with instance labels")
        if with_train:
            from nbapp.training.cli import add_arguments

            add_arguments(tr)
    return parser


def _slice_params(args) -> SliceParams:
    return SliceParams(
        downsampling=args.downsampling,
        seg_threshold=args.seg_threshold,
        center_threshold=args.center_threshold,
        min_distance=args.min_distance,
        fine_boundaries=args.fine_boundaries,
        label_divisor=args.label_divisor,
        semantic_only=args.semantic_only,
        fill_holes=args.fill_holes,
        batch_mode=args.mode == "batch",
    )


def _check_output(out: Path, source: str | None = None) -> None:
    """Fail before any work when OUTPUT cannot be written (unknown type, missing or read-only
    folder) or would overwrite the input."""
    from nbapp.io import WRITE_FORMATS, check_writable

    if out.suffix.lower() not in WRITE_FORMATS:
        raise InputError(f"cannot write {str(out)!r}: OUTPUT must end with "
                         f"{' or '.join(WRITE_FORMATS)}")
    check_writable(out)
    if source is None:
        return
    src, dst = Path(source).resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise InputError(f"OUTPUT {str(out)!r} would overwrite the input {source!r}; "
                         "choose another name")


def _input_path(args, text: str) -> str:
    """An input as the readers get it: taken from --data-root (and checked there) when given."""
    if args.data_root is None:
        return text
    from nbapp.confine import confine
    from nbapp.io import source_file

    source = source_file(text)
    return str(confine(source, args.data_root, "input")) + text[len(source):]


def _add_quantized(p) -> None:
    p.add_argument("--quantized", action="store_true",
                   help="use the zoo model's quantized file (CPU only; smaller and faster there)")


def _prepare_model(args) -> None:
    """Resolve --quantized into the zoo name (``NAME_quantized``, run on the CPU) and download a
    zoo model here, with one progress bar, before any worker loads it by name."""
    spec = getattr(args, "model", None) or getattr(args, "init", None)
    if not isinstance(spec, str):
        return
    from nbapp.models import zoo

    quantized = bool(getattr(args, "quantized", False))
    entry = zoo.find(spec, quantized)
    if entry is None:
        if quantized:
            raise ModelError(f"--quantized needs a zoo model name (`nbapp models` lists them), "
                             f"not {spec!r}")
        return
    if quantized:
        args.model = entry.name
        if getattr(args, "device", None) is None:
            args.device = "cpu"
    if not entry.bundled:
        zoo.fetch_model(entry, progress=True)


def _model(args, device):
    """The --model spec, loaded now (confined to --data-root) when a data root is given."""
    if args.data_root is None:
        return args.model
    from nbapp.models import load_model

    return load_model(args.model, device=device, root=args.data_root)


def _table_classes(args, cfg=None) -> tuple[int, dict]:
    """(label divisor, {class id: name}) for the object table, from the model config ``cfg``
    (loaded here when the caller has none): 3D ids are 1..N, of the model's thing classes."""
    if cfg is None:
        from nbapp.models import load_model

        try:
            cfg = load_model(args.model, device="cpu", warm_up=False, root=args.data_root,
                             progress=False).config
        except NbappError:
            return 0, {}
    if args.mode == "3d":
        return 0, {c: cfg.class_names.get(c, str(c)) for c in cfg.thing_list}
    return args.label_divisor, dict(cfg.class_names)


def _write_table(args, labels, cfg=None) -> None:
    """``--table``: one CSV row per object of the labels just written (``cfg``: the model's
    config, for the class column). A 2D image is one slice (z0 = 0, z1 = 1); in batch mode each
    image's objects are its own (z is the image index)."""
    if args.table is None:
        return
    from nbapp.objects import object_table, write_table

    lab = np.asarray(labels)
    divisor, names = _table_classes(args, cfg)
    if lab.ndim == 2:
        rows = object_table(lab[None], divisor, names)
    elif args.mode == "batch":  # ids restart in every image
        rows = []
        for z, image in enumerate(lab):
            for r in object_table(image[None], divisor, names):
                b, c = r["bbox"], r["centroid"]
                rows.append({**r, "bbox": (z, *b[1:3], z + 1, *b[4:6]),
                             "centroid": (float(z), *c[1:])})
    else:
        rows = object_table(lab, divisor, names)
    write_table(args.table, rows)


def _cmd_segment(args) -> int:
    from nbapp.io import read_image, source_file, write_labels

    params = _slice_params(args)
    out = Path(args.output)
    args.input = _input_path(args, args.input)
    _check_output(out, source_file(args.input))
    if args.table is not None:
        if Path(args.table).suffix.lower() != ".csv":
            raise InputError(f"--table is written as CSV: give a .csv name, not {args.table!r}")
        from nbapp.io import check_writable

        check_writable(Path(args.table))
    if args.batch_size < 1:
        raise ParameterError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(source_file(args.input)).exists():
        raise InputError(f"input {args.input!r} does not exist")
    _prepare_model(args)  # a zoo model is downloaded once the command is known to be valid
    if args.mode == "3d":
        return _segment_3d(args, params, out)
    image, meta = read_image(args.input, root=args.data_root)
    image = np.asarray(image)
    mode = args.mode
    if image.size == 0:
        raise InputError(f"{args.input} is empty (shape {image.shape})")
    if image.ndim == 3 and image.shape[-1] in (3, 4) and min(image.shape[:2]) > 4:
        raise InputError(f"{args.input} looks like an RGB(A) image of shape {image.shape}; "
                         "save it as a single-channel grey image")
    if image.ndim not in (2, 3):
        raise InputError(f"{args.input} has shape {image.shape}: expected a 2D image (H, W) or "
                         "a stack / volume (Z, Y, X)")
    if mode is None:
        if image.ndim == 3:
            raise InputError(f"{args.input} is a 3D stack of shape {image.shape}: use --mode 3d "
                             "for volume inference, or --mode batch to segment each slice as an "
                             "unrelated 2D image")
        mode = "2d"
    if mode == "2d" and image.ndim != 2:
        raise InputError(f"--mode 2d needs a 2D image, got shape {image.shape}; use --mode batch")

    from nbapp.inference import SliceSegmenter

    t0 = time.perf_counter()
    if args.tile is not None and args.tile < 0:
        raise ParameterError(f"--tile must be 0 (never) or a tile side in pixels, got {args.tile}")
    seg = SliceSegmenter(_model(args, args.device), device=args.device, cache_size=1,
                         batch_size=args.batch_size, tile=args.tile)
    seg.engine.tile_progress = _print_tiles
    t_load = time.perf_counter() - t0
    if mode == "batch":
        labels = seg.segment_batch(image if image.ndim == 3 else image[None], params)
        n = sum(int(np.count_nonzero(np.unique(s))) for s in labels)
        labels = labels.reshape(image.shape)  # a 2D input gives a 2D output
    else:
        labels = seg(image, params)
        n = int(np.count_nonzero(np.unique(labels)))
    write_labels(out, labels)
    cfg = seg.engine.model.config
    _write_table(args, labels, cfg)
    t = seg.timings
    from nbapp.objects import per_class_note

    per_class = per_class_note(labels, params.label_divisor, dict(cfg.class_names))
    tiles = seg.info.get("tiles") if mode == "2d" else None
    tiled = (f", network in {tiles} tiles ({'exact' if seg.info.get('tiled_exact') else 'blended'})"
             if tiles else "")
    print(f"nbapp: wrote {out} {labels.shape} {labels.dtype}, {n} objects{per_class} "
          f"(model load {t_load:.2f} s, network {t.get('network_s', 0):.2f} s, "
          f"post-processing {t.get('postprocess_s', 0):.2f} s{tiled})", file=sys.stderr)
    return 0


def _print_tiles(done: int, total: int) -> None:
    """Progress of an image that runs in tiles, on one line of stderr."""
    end = "\n" if done == total else ""
    print(f"\rnbapp: network tile {done}/{total}", end=end, file=sys.stderr, flush=True)


def _segment_3d(args, sp: SliceParams, out: Path) -> int:
    from nbapp.io import read_image, source_file, stack_paths, write_labels

    params = VolumeParams(slice=sp.replace(batch_mode=False), plane=args.plane,
                          orthoplane=args.orthoplane, median_size=args.median,
                          consensus=_consensus_params(args), return_stacks=args.return_stacks)
    if args.return_stacks:
        for p in stack_paths(out).values():
            _check_output(p, source_file(args.input))
    volume, meta = read_image(args.input, lazy=True, root=args.data_root)
    if len(volume.shape) != 3:
        raise InputError(f"--mode 3d needs a volume (Z, Y, X); {args.input} has shape "
                         f"{tuple(volume.shape)}")
    if _blockwise(args, params, volume, out):
        return _segment_blockwise(args, params, out, meta)
    client = _dask_client(args.scheduler) if args.scheduler else None
    from nbapp.run3d import segment_volume

    progress, close_bars = _progress_bars()
    t0 = time.perf_counter()
    try:
        if client is None:
            model = _model(args, None)
        else:  # the workers load the model by name; with --data-root it is checked here first
            model = args.model
            _model(args, "cpu")
        result = segment_volume(volume, model, params, devices=args.devices or args.device,
                                client=client, progress=progress, batch_size=args.batch_size)
    finally:
        close_bars()
        if client is not None:
            client.close()
    labels, stacks = result if args.return_stacks else (result, {})
    written = []
    for plane, path in stack_paths(out).items():
        if plane in stacks:
            write_labels(path, stacks[plane])
            written.append(path.name)
    write_labels(out, labels)
    _write_table(args, labels, getattr(model, "config", None))  # a loaded model's, or loaded
    n = int(labels.max())
    also = f", and the {'/'.join(stacks)} stack{'s' if len(stacks) > 1 else ''} " \
           f"({', '.join(written)})" if written else ""
    print(f"nbapp: wrote {out} {labels.shape} {labels.dtype}, {n} objects in "
          f"{time.perf_counter() - t0:.1f} s{also}", file=sys.stderr)
    return 0


_TO_ZARR = "write to a .zarr output, which runs it block by block in bounded memory"


def _blockwise(args, params: VolumeParams, volume, out: Path) -> bool:
    """Whether this 3D job runs block by block: asked for, or too large for memory."""
    asked = args.blockwise or args.block_size is not None
    if asked:
        return True
    from nbapp.blockwise import needs_blockwise

    if not needs_blockwise(tuple(volume.shape), params):
        return False
    if out.suffix.lower() != ".zarr":
        from nbapp.memory import does_not_fit
        from nbapp.volume import job_memory

        raise does_not_fit(job_memory(tuple(volume.shape), params),
                           f"the {'ortho-plane' if params.orthoplane else 'single-plane'} 3D job "
                           f"on a {'x'.join(map(str, volume.shape))} volume", _TO_ZARR)
    print("nbapp: the volume is too large for one in-memory job: running it block by block",
          file=sys.stderr)
    return True


def _segment_blockwise(args, params: VolumeParams, out: Path, meta: dict) -> int:
    from nbapp.blockwise import BlockParams
    from nbapp.run3d import segment_blockwise

    if out.suffix.lower() != ".zarr":
        raise InputError(f"a blockwise run writes OME-Zarr: give an output ending in .zarr, "
                         f"not {str(out)!r}")
    _no_halo(args)
    blocks = BlockParams(block_size=args.block_size)
    client = _dask_client(args.scheduler) if args.scheduler else None
    t0 = time.perf_counter()
    progress, close_bar = _blocks_bar()
    try:
        model = _model(args, None)  # with --data-root: loaded (and checked) here
        result = segment_blockwise(args.input, out, model, params, blocks,
                                   devices=args.devices or args.device, client=client,
                                   workers=args.workers, progress=progress,
                                   batch_size=args.batch_size, root=args.data_root,
                                   voxel_size=meta.get("voxel_size"))
    finally:
        close_bar()
        if client is not None:
            client.close()
    if args.table is not None:  # the joined objects' table: the labels are not read again
        from nbapp.objects import class_name, write_table

        divisor, names = _table_classes(args, getattr(model, "config", None))
        write_table(args.table, [{**r, "class": class_name(r["id"], divisor, names)}
                                 for r in result.table])
    _say_blockwise(out, result, t0)
    return 0


def _say_blockwise(out: Path, result, t0: float) -> None:
    resumed = result.resumed_text()
    stacks = result.stacks
    also = f", and the {'/'.join(stacks)} stack{'s' if len(stacks) > 1 else ''} " \
           f"({', '.join(p.name for p in stacks.values())})" if stacks else ""
    print(f"nbapp: wrote {out} {result.shape} int32 (OME-Zarr), {result.objects} objects in "
          f"{time.perf_counter() - t0:.1f} s ({result.blocks} blocks of up to "
          f"{'x'.join(map(str, result.block_size))}{resumed}){also}", file=sys.stderr)


def _blocks_bar():
    """A progress callback drawing a tqdm bar of blocks done on stderr, and its closer."""
    from tqdm.auto import tqdm

    bar = None

    def progress(p) -> None:
        nonlocal bar
        if getattr(p, "note", None):  # e.g. why an earlier run's blocks were not resumed
            print(f"nbapp: {p.note}", file=sys.stderr)
        if p.stage != "network":
            close()
            return
        if bar is None:
            bar = tqdm(total=p.total, desc="blocks", unit="block", file=sys.stderr,
                       initial=p.done)
        bar.update(p.done - bar.n)

    def close() -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None

    return progress, close


def _progress_bars():
    """A progress callback drawing one tqdm bar per (plane, stage) on stderr, and its closer.

    Called in the main thread (segment_volume calls ``progress`` in the calling thread).
    """
    from tqdm.auto import tqdm

    bars: dict = {}

    def progress(p) -> None:
        bar = bars.get((p.plane, p.stage))
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[(p.plane, p.stage)] = tqdm(total=p.total, desc=f"{p.plane} {p.stage}",
                                                  unit="slice" if p.stage == "network" else "step",
                                                  leave=True, file=sys.stderr)
        bar.update(p.done - bar.n)  # redraws at most every 0.1 s (refresh() on each slice
        # flooded logs and pipes with one line per slice)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def _dask_client(address: str):
    try:
        from dask.distributed import Client
    except ImportError:
        raise NbappError("--scheduler needs Dask: pip install 'nbapp[dask]'") from None
    try:
        return Client(address, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise NbappError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def _cmd_consensus(args) -> int:
    from nbapp.io import read_image, write_labels
    from nbapp.volume import consensus

    params = _consensus_params(args)
    out = Path(args.output)
    for name in ("xy", "xz", "yz"):
        setattr(args, name, _input_path(args, getattr(args, name)))
        _check_output(out, getattr(args, name))
    stacks, meta = {}, {}
    for name in ("xy", "xz", "yz"):
        arr, meta = read_image(getattr(args, name), lazy=True, root=args.data_root)
        if len(arr.shape) != 3:
            raise InputError(f"the {name} stack must be a volume (Z, Y, X), got shape "
                             f"{tuple(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"the {name} stack must hold integer labels, got dtype {arr.dtype}")
        stacks[name] = arr
    shapes = {k: tuple(v.shape) for k, v in stacks.items()}
    if len(set(shapes.values())) != 1:
        raise InputError(f"the stacks have different shapes {shapes}: they must come from the "
                         "same volume")
    t0 = time.perf_counter()
    if _consensus_blockwise(args, shapes["xy"], out):
        from nbapp.blockwise import BlockParams

        _no_halo(args)
        from nbapp.run3d import consensus_blockwise

        client = _dask_client(args.scheduler) if args.scheduler else None
        progress, close_bar = _blocks_bar()
        try:
            result = consensus_blockwise({p: getattr(args, p) for p in stacks}, out, params,
                                         BlockParams(block_size=args.block_size),
                                         client=client, progress=progress, root=args.data_root,
                                         voxel_size=meta.get("voxel_size"))
        finally:
            close_bar()
            if client is not None:
                client.close()
        _say_blockwise(out, result, t0)
        return 0
    labels = consensus({k: np.asarray(v) for k, v in stacks.items()}, params)
    write_labels(out, labels)
    print(f"nbapp: wrote {out} {labels.shape} {labels.dtype}, {int(labels.max())} objects "
          f"(consensus {time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


def _consensus_blockwise(args, shape: tuple, out: Path) -> bool:
    """Whether ``nbapp consensus`` runs block by block: asked for, a Dask cluster given, or
    stacks too large for memory (then the output must be .zarr)."""
    from nbapp.memory import available_bytes, does_not_fit
    from nbapp.volume import JOB_BYTES_PER_VOXEL

    asked = args.blockwise or args.block_size is not None or args.scheduler is not None
    # the in-memory consensus holds the three stacks, their filtered copies and its own work:
    # about what an ortho-plane job holds per voxel
    need = JOB_BYTES_PER_VOXEL["ortho"] * int(np.prod(shape))
    room = available_bytes()
    if not asked and need <= 0.9 * room:
        return False
    if out.suffix.lower() != ".zarr":
        if asked:
            raise InputError(f"a blockwise consensus writes OME-Zarr: give an output ending in "
                             f".zarr, not {str(out)!r}")
        raise does_not_fit(need, f"the consensus of {'x'.join(map(str, shape))} stacks",
                           _TO_ZARR, room)
    if not asked:
        print("nbapp: the stacks are too large for one in-memory consensus: running it block "
              "by block", file=sys.stderr)
    return True


def _cmd_demo(args) -> int:
    from nbapp.io import write_labels
    from nbapp.metrics import instance_metrics
    from nbapp.samples import demo_volume

    out = Path(args.output)
    _check_output(out)
    image, truth = demo_volume()
    print(f"nbapp demo: synthetic EM-like volume {image.shape} with {int(truth.max())} "
          f"mitochondria (nbapp.samples.demo_volume)", file=sys.stderr)
    t0 = time.perf_counter()
    if args.mode == "3d":
        from nbapp.run3d import segment_volume

        progress, close_bars = _progress_bars()
        try:
            labels = segment_volume(image, args.model, VolumeParams(), devices=args.device,
                                    progress=progress)
        finally:
            close_bars()
        gt = truth
    else:
        from skimage.measure import label as cc

        from nbapp.inference import SliceSegmenter

        seg = SliceSegmenter(args.model, device=args.device)
        if args.mode == "batch":
            labels = seg.segment_batch(image)
            gt = np.stack([cc(t, connectivity=2) for t in truth])
        else:
            z = image.shape[0] // 2
            labels, gt = seg(image[z]), cc(truth[z], connectivity=2)
    elapsed = time.perf_counter() - t0
    write_labels(out, labels)
    if args.mode == "batch":
        scores = [instance_metrics(p, g) for p, g in zip(labels, gt)]
        m = {k: float(np.mean([s[k] for s in scores])) for k in ("fg_iou", "f1", "f1@0.75", "pq")}
    else:
        m = instance_metrics(labels, gt)
    print(f"nbapp demo: wrote {out} {labels.shape} in {elapsed:.1f} s; against the ground truth: "
          f"FG IoU {m['fg_iou']:.3f}, F1@0.5 {m['f1']:.3f}, F1@0.75 {m['f1@0.75']:.3f}, "
          f"PQ {m['pq']:.3f}", file=sys.stderr)
    return 0


def _cmd_info(args) -> int:
    from nbapp.models import load_model

    model = load_model(args.model, device=args.device, root=args.data_root)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    cfg = model.config
    print(f"{cfg.name}: {info['parameters']:,} parameters on {info['device']}")
    print(f"  config:         {cfg.config_path or '(none)'}")
    print(f"  weights:        {model.weights or '(in memory)'}")
    print(f"  classes:        {', '.join(f'{k}={v}' for k, v in cfg.class_names.items())}")
    print(f"  thing classes:  {list(cfg.thing_list)}")
    print(f"  padding factor: {cfg.padding_factor}")
    print(f"  norms:          mean {cfg.norms[0]:g}, std {cfg.norms[1]:g}")
    if cfg.description:
        print()
        print(cfg.description)
    return 0


def _cmd_evaluate(args) -> int:
    from nbapp.io import read_image

    try:
        from nbapp import metrics
    except ImportError:
        raise NbappError("evaluation needs nbapp.metrics, which this installation lacks") from None
    pred = np.asarray(read_image(args.pred, root=args.data_root)[0])
    gt = np.asarray(read_image(args.gt, root=args.data_root)[0])
    if pred.shape != gt.shape:
        raise InputError(f"PRED has shape {pred.shape} but GT has shape {gt.shape}")
    for name, a in (("PRED", pred), ("GT", gt)):
        if not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"{name} must hold integer labels, got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise InputError(f"{name} holds negative labels (min {a.min()}); 0 is background")
    per_slice, why = args.per_slice, None
    if per_slice is None and gt.ndim == 3:
        why = metrics.per_slice_truth(gt)
        per_slice = why is not None
    if per_slice and gt.ndim != 3:
        raise InputError(f"--per-slice needs stacks of 2D slices (Z, Y, X), got shape {gt.shape}")
    if per_slice:
        print(f"nbapp evaluate: scored slice by slice ({len(gt)} slices, "
              f"{metrics.count_objects(gt, True)} objects)"
              + (f": GT looks like per-slice labels ({why}); --no-per-slice scores in 3D"
                 if why else ""), file=sys.stderr)
        scores = metrics.slice_metrics(pred, gt)
    else:
        scores = metrics.instance_metrics(pred, gt)
    if args.json:
        print(json.dumps(scores, indent=2, default=float))
    else:
        for k, v in scores.items():
            print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    return 0


def _cmd_models(args) -> int:
    from nbapp.models import zoo

    name = args.path or args.download
    if name is not None:
        entry = zoo.find(name)
        if entry is None:
            raise ModelError(f"unknown model {name!r}; `nbapp models` lists the zoo")
        if entry.bundled:
            from nbapp.models import default_config_path

            print(f"{name} is bundled with nbapp: {default_config_path().parent}")
            return 0
        if args.download:
            path = zoo.fetch_model(entry, progress=True)
            print(f"{name}: {path}")
            return 0
        print(f"{zoo.model_path(name)}")
        print(f"  (download {zoo.download_url(entry)} and save it there; then {name} works offline)")
        return 0
    rows = zoo.zoo_listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<27} {'classes':<10} {'pad':>4} {'pixel':>6}  status")
    for r in rows:
        status = ("bundled" if r["bundled"] else "downloaded" if r["downloaded"]
                  else "downloads on first use")
        pixel = f"{r['pixel_size_nm']:g} nm" if r["pixel_size_nm"] else "-"
        print(f"{r['name']:<27} {','.join(r['classes']):<10} {r['padding_factor']:>4} "
              f"{pixel:>6}  {status}")
    print("\nuse: nbapp segment IMAGE -o OUT --model NAME [--quantized]; "
          "nbapp models --path NAME prints where the file goes")
    return 0


def _slices(paths: list, root) -> list:
    """2D slices from images and (N, H, W) stacks."""
    from nbapp.io import read_image

    out = []
    for p in paths:
        arr = np.asarray(read_image(p, root=root)[0])
        if arr.ndim == 2:
            out.append(arr)
        elif arr.ndim == 3:
            out.extend(list(arr))
        else:
            raise InputError(f"{p}: expected a 2D image or a (N, H, W) stack, got shape {arr.shape}")
    return out


def _cmd_finetune(args) -> int:
    from nbapp.fewshot import FinetuneParams, finetune, held_out_text, score_slices

    if len(args.images) != len(args.labels):
        raise InputError(f"give one --labels file per --images file ({len(args.images)} images, "
                         f"{len(args.labels)} label files)")
    if len(args.test_images) != len(args.test_labels):
        raise InputError("give one --test-labels file per --test-images file")
    images, labels = _slices(args.images, None), _slices(args.labels, None)
    params = FinetuneParams(minutes=args.minutes, downsampling=args.downsampling,
                            held_out=args.held_out)
    last = [0.0]

    def progress(step, total, detail):
        if detail["minutes"] - last[0] >= 0.5 or step == 1:
            last[0] = detail["minutes"]
            recent = detail["loss"][-20:]
            print(f"nbapp finetune: step {step}, {detail['minutes']:.1f} min, loss "
                  f"{sum(recent) / len(recent):.4f}", file=sys.stderr, flush=True)

    res = finetune(images, labels, args.init, params=params, out=args.out, name=args.name,
                   progress=progress, device=args.device, threads=args.threads)
    print(f"nbapp finetune: {res.steps} steps in {res.seconds / 60:.1f} min ({res.stopped}); "
          f"{held_out_text(res.held_out)}; wrote {res.config} (use --model {res.config})",
          file=sys.stderr)
    if args.test_images:
        from nbapp.models import load_model

        ti, tl = _slices(args.test_images, None), _slices(args.test_labels, None)
        for label, model in (("before", load_model(args.init, device=args.device)),
                             ("after", res.model)):
            m = score_slices(model, ti, tl, args.downsampling)
            print(f"nbapp finetune: {label}: F1@0.5 {m['f1']:.3f} (precision "
                  f"{m['precision']:.3f}, recall {m['recall']:.3f}) on {len(ti)} test slice(s)",
                  file=sys.stderr)
    return 0


def _cmd_app(args) -> int:
    from nbapp.serve import serve

    return serve(port=args.port, open_browser=not args.no_browser, data_root=args.data_root,
                 cull_idle_timeout=args.cull_idle_timeout, token=args.token,
                 no_token=args.no_token, models=args.models,
                 allow_root_models=args.allow_data_root_models, max_kernels=args.max_kernels,
                 per_visitor=args.max_kernels_per_visitor, connect_timeout=args.connect_timeout,
                 disconnect_timeout=args.disconnect_timeout)


def _one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message onto one line.

    >>> _one_line("bad YAML\\n  in line 2:\\n    ^")
    'bad YAML in line 2: ^'
    """
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nbapp`` console script; returns the exit status."""
    try:
        words = sys.argv[1:] if argv is None else list(argv)
        command = next((w for w in words if not w.startswith("-")), None)
        parser = build_parser(with_train=command == "train")
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else 0
        handler = {"segment": _cmd_segment, "info": _cmd_info, "evaluate": _cmd_evaluate,
                   "consensus": _cmd_consensus, "demo": _cmd_demo,
                   "app": _cmd_app, "models": _cmd_models,
                   "finetune": _cmd_finetune}.get(args.command)
        if args.command in ("segment", "info", "demo", "train", "finetune"):  # these start torch
            check_address_space()
            if args.command != "segment":  # segment checks its input and output first
                _prepare_model(args)
        if handler is None:
            from nbapp.training import TrainParams, run

            return int(run(TrainParams.from_args(args)) or 0)
        return handler(args)
    except MemoryError as exc:  # nbapp's own checks say what needs the memory
        print(f"nbapp: error: {_one_line(out_of_memory_message(exc))}", file=sys.stderr)
        return 1
    except NbappError as exc:
        print(f"nbapp: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        if not is_out_of_memory(exc):  # torch's (GPU) out-of-memory error is a RuntimeError
            raise
        print(f"nbapp: error: {out_of_memory_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nbapp: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nbapp models --json | head`: the reader has what it wanted
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's exit flush does not raise again on the
    closed pipe (the way the Python documentation recommends for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to flush
        pass


if __name__ == "__main__":
    sys.exit(main())
