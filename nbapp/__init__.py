"""nbapp: panoptic segmentation of organelles in electron microscopy.

The public API is small; torch-backed names are imported on first use so that ``import nbapp``
stays light.

>>> import nbapp
>>> nbapp.SliceParams().seg_threshold
0.5
"""

from __future__ import annotations

import importlib

from nbapp.errors import InputError, LabelOverflowError, ModelError, NbappError, ParameterError
from nbapp.params import ConsensusParams, SliceParams, VolumeParams

__version__ = "0.1.0"

_LAZY = {
    "load_model": "nbapp.models",
    "Model": "nbapp.models",
    "Engine": "nbapp.engine",
    "SliceSegmenter": "nbapp.inference",
    "segment_image": "nbapp.inference",
    "segment_heads": "nbapp.postprocess",
    "Heads": "nbapp.heads",
    "read_image": "nbapp.io",
    "write_labels": "nbapp.io",
    "segment_volume": "nbapp.run3d",
    "segment_blockwise": "nbapp.run3d",
    "consensus_blockwise": "nbapp.run3d",
    "BlockParams": "nbapp.blockwise",
    "run_consensus": "nbapp.volume",
    "JobRunner": "nbapp.jobs",
    "finetune": "nbapp.fewshot",
    "FinetuneParams": "nbapp.fewshot",
}

__all__ = [
    "ConsensusParams",
    "Engine",
    "FinetuneParams",
    "finetune",
    "JobRunner",
    "VolumeParams",
    "run_consensus",
    "segment_volume",
    "segment_blockwise",
    "consensus_blockwise",
    "BlockParams",
    "Heads",
    "InputError",
    "LabelOverflowError",
    "Model",
    "ModelError",
    "NbappError",
    "ParameterError",
    "SliceParams",
    "SliceSegmenter",
    "load_model",
    "read_image",
    "segment_heads",
    "segment_image",
    "write_labels",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, "consensus" if name == "run_consensus" else name)
    if name == "consensus":  # the submodule nbapp.consensus, until something imports it
        raise AttributeError("module 'nbapp' has no attribute 'consensus': the consensus of "
                             "stored stacks is nbapp.run_consensus(stacks, params)")
    raise AttributeError(f"module 'nbapp' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
