"""The training command line: ``nbapp train`` and ``python -m nbapp.train`` (its flags are
documented in the model card and the README: they stay as they are)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from nbapp.training.params import _AUG, TrainParams

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (``nbapp train`` and ``python -m nbapp.train``);
    the defaults are :class:`TrainParams`'."""
    d = {f.name: f.default for f in fields(TrainParams)}
    parser.add_argument("--raw", required=True, help="image volume (TIFF or .zarr), (Z, Y, X)")
    parser.add_argument("--labels", required=True, help="3D instance labels, same shape")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--val-slices", type=int, default=d["val_slices"],
                        help="last Z slices held out for validation (never trained on)")
    parser.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps (LR schedule)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--patch", type=int, default=d["patch"], help="patch side (multiple of 32)")
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    parser.add_argument("--warmup", type=float, default=d["warmup"], help="warm-up fraction of steps")
    parser.add_argument("--sigma", type=float, default=d["sigma"], help="heat-map Gaussian sigma (px)")
    parser.add_argument("--w-ctr", type=float, default=d["w_ctr"])
    parser.add_argument("--w-off", type=float, default=d["w_off"])
    parser.add_argument("--val-every", type=int, default=d["val_every"], help="validate every N steps")
    parser.add_argument("--val-stride", type=int, default=d["val_stride"], help="use every Nth val slice")
    parser.add_argument("--save-minutes", type=float, default=d["save_minutes"],
                        help="write last.pth at least this often")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop gracefully after this many minutes of training in total "
                             "(including minutes before --resume) and still save; the learning "
                             "rate schedule then follows max(step / steps, minutes / limit), so "
                             "it anneals in time even on a slow or busy machine")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="end this run gracefully after this many minutes (saving "
                             "last.pth) without changing the schedule; resume later")
    parser.add_argument("--resume", default=None, help="checkpoint (last.pth) to resume from")
    parser.add_argument("--init", default=None,
                        help="fine-tune: start from the weights, architecture and normalisation "
                             "of this checkpoint (.pth), or of a model nbapp exported: 'default' "
                             "(the shipped model), its .yaml config or its TorchScript file; a "
                             "fresh optimiser and schedule")
    parser.add_argument("--planes", default=",".join(d["planes"]),
                        help="comma-separated planes to cut training patches from: xy,xz,yz "
                             "for isotropic volumes, xy for anisotropic ones (serial sections) "
                             "or a stack of unrelated 2D images")
    parser.add_argument("--workers", type=int, default=d["workers"],
                        help="data-loading worker processes (0: sample in the training process)")
    parser.add_argument("--arch", default=None,
                        help="JSON architecture hyper-parameters overriding the defaults of "
                             "nbapp.models.arch.ARCH_DEFAULTS (ignored with --resume, which keeps "
                             "its checkpoint's; with --init only weight-free options such as "
                             "input_norm may change)")
    parser.add_argument("--export-ctr-smooth", type=float, default=d["export_ctr_smooth"],
                        help="heat-map Gaussian smoothing (1/4-grid cells) of the exported model")
    parser.add_argument("--no-export-ctr-gate", dest="export_ctr_gate", action="store_false",
                        help="do not gate the exported heat-map by the foreground probability")
    parser.add_argument("--export-sem-smooth", type=float, default=d["export_sem_smooth"],
                        help="Gaussian smoothing of the exported model's semantic logits "
                             "(pixels of the 1/2-resolution map; 0 = none): removes specks that "
                             "become tiny false objects")
    parser.add_argument("--zoom-out-max", type=float, default=d["zoom_out_max"],
                        help="largest zoom-out factor (objects shrink up to this much)")
    parser.add_argument("--zoom-in-max", type=float, default=d["zoom_in_max"],
                        help="largest zoom-in factor (objects grow up to this much)")
    parser.add_argument("--shading-p", type=float, default=d["shading_p"],
                        help="probability of uneven illumination (a linear intensity ramp of "
                             f"up to +-{_AUG.shading_max * 50:.0f} per cent)")
    parser.add_argument("--no-fit-patches", dest="fit_patches", action="store_false",
                        help="let patches reach beyond the plane (mirrored) anywhere and draw "
                             "zoomed-out patches from every plane (how v0.1 and v0.2 were "
                             "trained); by default patches stay inside the plane where they fit")
    parser.add_argument("--object-contrast-p", type=float, default=d["object_contrast_p"],
                        help="probability that the objects of a patch get another contrast to "
                             "their surroundings and another inner texture (other stainings)")
    parser.add_argument("--synthetic-p", type=float, default=d["synthetic_p"],
                        help="probability that a patch is synthetic EM with random appearance, "
                             "object sizes and distractors (nbapp.synth) instead of a real one")
    parser.add_argument("--hard-negatives-p", type=float, default=d["hard_negatives_p"],
                        help="probability that a synthetic patch also gets unlabelled "
                             "look-alikes: vesicle clusters, multilamellar bodies, dense bodies, "
                             "dark smudges")
    parser.add_argument("--zoom-out-p", type=float, default=d["zoom_out_p"],
                        help="probability of a zoom-out patch")
    parser.add_argument("--gamma", type=float, nargs=2, default=d["gamma"],
                        metavar=("LO", "HI"), help="range of the random gamma of the intensities")
    parser.add_argument("--pad-p", type=float, default=d["pad_p"],
                        help="probability of a padding band in a patch (0 disables)")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--device", default=d["device"], help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m nbapp.train --help``."""
    from nbapp.training.recipe import run

    parser = argparse.ArgumentParser(prog="python -m nbapp.train",
                                     description="Train nbapp's mitochondria model on an EM "
                                                 "volume with 3D instance labels.")
    return run(TrainParams.from_args(add_arguments(parser).parse_args(argv)))
