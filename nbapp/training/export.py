"""What training writes: TorchScript exports and empanada-format configs."""

from __future__ import annotations

from pathlib import Path

import torch

from nbapp.errors import ParameterError
from nbapp.models.arch import PADDING_FACTOR, build_model, save_torchscript
from nbapp.training.params import EXPORT_DEFAULTS

__all__ = ["config_dict", "EXPORT_OPTIONS", "export_model", "export_checkpoint", "write_yaml"]


def config_dict(norms: dict, description: str, model_file: str = "nbapp_mito.pt") -> dict:
    """The empanada-format YAML config of a model trained here."""
    return {
        "class_names": {1: "mito"},
        "labels": [1],
        "thing_list": [1],
        "model": model_file,
        # empanada-napari's "Register new model" reads this key unguarded (no quantized model)
        "model_quantized": None,
        "padding_factor": PADDING_FACTOR,
        "norms": {"mean": float(norms["mean"]), "std": float(norms["std"])},
        "description": description,
    }


#: Export-only options of ``nbapp train``'s TorchScript (the shipped model's): heat-map smoothing
#: and gating, semantic smoothing; the CLI's ``--export-*`` defaults.
EXPORT_OPTIONS = dict(EXPORT_DEFAULTS)


def export_model(model: torch.nn.Module, path: str | Path, ctr_smooth: float = 0.0,
                 ctr_gate: bool = False, arch: dict | None = None,
                 sem_smooth: float = 0.0) -> None:
    """Save ``model`` as TorchScript (eval mode, batch norm folded into the convolutions).

    ``ctr_smooth``, ``ctr_gate`` and ``sem_smooth`` set the export-only heat-map smoothing,
    foreground gating and semantic smoothing of :class:`nbapp.models.arch.NBMitoNet` (they have
    no weights).
    """
    if ctr_smooth or ctr_gate or sem_smooth:
        shipped = build_model(**{**(arch or {}), "ctr_smooth": ctr_smooth, "ctr_gate": ctr_gate,
                                 "sem_smooth": sem_smooth})
        shipped.load_state_dict(model.state_dict())
        model = shipped
    save_torchscript(model, path)


def export_checkpoint(checkpoint: str | Path, path: str | Path, **options) -> dict:
    """Export a training checkpoint (``last.pth``, ``best.pth``) as TorchScript at ``path``, with
    :data:`EXPORT_OPTIONS` updated by ``options``; return the checkpoint."""
    unknown = set(options) - set(EXPORT_OPTIONS)
    if unknown:
        raise ParameterError(f"unknown export options {sorted(unknown)}; known: "
                             f"{sorted(EXPORT_OPTIONS)}")
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build_model(**ck["arch"])
    model.load_state_dict(ck["state_dict"])
    opts = {**EXPORT_OPTIONS, **options}
    export_model(model.eval(), path, opts["ctr_smooth"], opts["ctr_gate"], ck["arch"],
                 opts["sem_smooth"])
    return ck


def write_yaml(cfg: dict, path: Path) -> None:
    import yaml

    class _Block(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, s: str) -> yaml.Node:
        style = "|" if "\n" in s else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    _Block.add_representer(str, _str)
    path.write_text(yaml.dump(cfg, Dumper=_Block, sort_keys=False, allow_unicode=True))
