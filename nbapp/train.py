"""``python -m nbapp.train``: the training command line (documented in the model card and the
README). The trainer itself is the :mod:`nbapp.training` package; this module keeps the
command and the names earlier code imported from here."""

from __future__ import annotations

import sys

from nbapp.training.cli import add_arguments, main
from nbapp.training.data import AugmentConfig, PatchSampler, collate, compute_norms, \
    to_unit_range
from nbapp.training.export import EXPORT_OPTIONS, config_dict, export_checkpoint, export_model
from nbapp.training.loss import panoptic_loss
from nbapp.training.params import TrainParams
from nbapp.training.recipe import run

__all__ = ["add_arguments", "main", "run", "TrainParams", "AugmentConfig", "PatchSampler",
           "collate", "compute_norms", "to_unit_range", "EXPORT_OPTIONS", "config_dict",
           "export_checkpoint", "export_model", "panoptic_loss"]

if __name__ == "__main__":
    sys.exit(main())
