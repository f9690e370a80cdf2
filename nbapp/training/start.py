"""Where training starts from: a checkpoint, or a model nbapp exported (the shipped one
included), whose folded batch norms are rebuilt (:func:`nbapp.models.arch.from_export`)."""

from __future__ import annotations

from pathlib import Path

import torch

from nbapp.errors import ParameterError
from nbapp.models.arch import from_export

__all__ = ["load_init"]


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (it holds code) rather than a torch.save file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_init(spec: str) -> dict:
    """What fine-tuning starts from (``init``: a checkpoint, ``"default"``, an nbapp model's
    config or TorchScript file): ``arch``, ``state_dict``, ``norms``, whether batch norm
    needs ``recalibrate`` (exports have it folded away; checkpoints keep it) and the
    ``pixel_size_nm`` its config records (None for checkpoints)."""
    path = Path(spec)
    export = spec == "default" or path.suffix.lower() in (".yaml", ".yml")
    if not export:
        if not path.is_file():
            raise ParameterError(f"init {spec}: no such file; give a checkpoint (.pth), "
                                 "'default' or an nbapp model (.yaml config or TorchScript .pt)")
        export = _is_torchscript(path)
    if not export:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        return {"arch": ck["arch"], "state_dict": ck["state_dict"], "norms": ck["norms"],
                "recalibrate": False, "pixel_size_nm": None}
    from nbapp.models import load_model

    loaded = load_model(spec, device="cpu", warm_up=False)
    try:
        model, arch = from_export(loaded.module)
    except ValueError as exc:
        raise ParameterError(f"init {spec}: {exc}") from None
    mean, std = loaded.config.norms
    # trained without the export-only smoothing and gating (re-added at export)
    return {"arch": {**arch, "ctr_smooth": 0.0, "ctr_gate": False, "sem_smooth": 0.0},
            "state_dict": model.state_dict(), "norms": {"mean": float(mean), "std": float(std)},
            "recalibrate": True, "pixel_size_nm": loaded.config.pixel_size_nm}
