"""Training and fine-tuning nbapp's own model (:mod:`nbapp.models.arch`).

The parts, each a module:

- :mod:`~nbapp.training.params`: :class:`TrainParams`, what a run is (frozen, checked);
- :mod:`~nbapp.training.data`: volumes to augmented 2D patches and their targets
  (:class:`PatchSampler`), with :mod:`~nbapp.training.targets` (Panoptic-DeepLab targets of a
  label image) and :mod:`~nbapp.training.synth` (synthetic EM patches), both pure numpy;
- :mod:`~nbapp.training.loss`, :mod:`~nbapp.training.evaluate`: the loss and the validation;
- :mod:`~nbapp.training.start`: starting from a checkpoint or an exported model;
- :mod:`~nbapp.training.export`: TorchScript exports and empanada-format configs;
- :mod:`~nbapp.training.recipe`: :func:`run`, the recipe;
- :mod:`~nbapp.training.cli`: ``nbapp train`` / ``python -m nbapp.train``.

Example::

    from nbapp.training import TrainParams, run
    run(TrainParams(raw="train_raw.tif", labels="train_labels.tif", out="runs/mine",
                    init="default", planes="xy", time_limit=20, lr=3e-4))

Importing this package (or its pure parts: targets, synth, params) does not import torch; the
names below are loaded when first used.
"""

from __future__ import annotations

import importlib

__all__ = ["TrainParams", "run", "main", "add_arguments", "PatchSampler", "AugmentConfig",
           "compute_norms", "panoptic_loss", "evaluate", "export_model", "export_checkpoint",
           "config_dict", "EXPORT_OPTIONS", "load_init", "panoptic_targets", "synthetic_patch"]

_WHERE = {
    "TrainParams": "params", "run": "recipe", "main": "cli", "add_arguments": "cli",
    "PatchSampler": "data", "AugmentConfig": "params", "compute_norms": "data",
    "panoptic_loss": "loss", "evaluate": "evaluate", "export_model": "export",
    "export_checkpoint": "export", "config_dict": "export", "EXPORT_OPTIONS": "export",
    "load_init": "start", "panoptic_targets": "targets", "synthetic_patch": "synth",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"nbapp.training.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'nbapp.training' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
