"""Empanada-format model configs (YAML) and the download cache for model files.

A config names the classes, the TorchScript file (local path or URL), the padding factor and
the intensity normalisation. MitoNet_v1.yaml, MitoNet_v1_mini.yaml and user-made configs in that
format load unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nbapp.errors import ModelError

__all__ = ["ModelConfig", "read_config", "cache_dir", "fetch", "confine_model_path", "is_url",
           "default_config_path", "MIRROR_ENV"]

#: Environment variable naming a facility's own copy of the models (also trusted).
MIRROR_ENV = "NBAPP_MODEL_MIRROR"

REQUIRED_FIELDS = ("class_names", "labels", "thing_list", "model", "padding_factor", "norms")


@dataclass(frozen=True)
class ModelConfig:
    """What nbapp knows about a model besides its weights.

    Attributes
    ----------
    name : str
        Short name (the YAML's file stem, or the model file's stem).
    class_names : dict of int to str
        Semantic class ids and names (background 0 is implicit).
    labels : tuple of int
        Class ids the model predicts.
    thing_list : tuple of int
        Classes with instances; the others are "stuff".
    model : str
        Path or URL of the TorchScript file.
    padding_factor : int
        Input height and width must be multiples of this.
    norms : tuple of (float, float)
        (mean, std) of intensities, as fractions of the intensity range.
    description : str
        Free text from the config.
    config_path : str or None
        The YAML the config came from.
    model_quantized : str or None
        Optional quantized model path or URL.
    sha256 : str or None
        Expected SHA-256 of the model file, if the config gives one.
    pixel_size_nm : float or None
        The pixel size (nm) the model works best at (nbapp's ``pixel_size_nm`` field), if known.
    """

    name: str
    class_names: dict = field(default_factory=lambda: {1: "mito"})
    labels: tuple = (1,)
    thing_list: tuple = (1,)
    model: str = ""
    padding_factor: int = 16
    norms: tuple = (0.57571, 0.12765)
    description: str = ""
    config_path: str | None = None
    model_quantized: str | None = None
    sha256: str | None = None
    pixel_size_nm: float | None = None

    def __hash__(self) -> int:
        return hash((self.name, self.model, self.config_path, self.padding_factor, self.norms))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "class_names": {int(k): str(v) for k, v in self.class_names.items()},
            "labels": list(self.labels),
            "thing_list": list(self.thing_list),
            "model": self.model,
            "padding_factor": self.padding_factor,
            "norms": {"mean": self.norms[0], "std": self.norms[1]},
            "description": self.description,
            "config": self.config_path,
            "pixel_size_nm": self.pixel_size_nm,
        }


def _fail(path, msg: str) -> ModelError:
    return ModelError(f"model config {path}: {msg}")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Read and check an empanada-format YAML config.

    Relative model paths are resolved against the YAML's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise _fail(path, f"is not valid YAML ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise _fail(path, f"must be a mapping of fields, got {type(raw).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise _fail(path, f"missing required field(s): {', '.join(missing)} "
                          f"(an empanada config needs {', '.join(REQUIRED_FIELDS)})")
    class_names = raw["class_names"]
    if not isinstance(class_names, dict) or not class_names:
        raise _fail(path, "class_names must be a non-empty mapping {id: name}")
    try:
        class_names = {int(k): str(v) for k, v in class_names.items()}
        labels = tuple(int(v) for v in raw["labels"])
        thing_list = tuple(int(v) for v in (raw["thing_list"] or ()))
    except (TypeError, ValueError):
        raise _fail(path, "class_names keys, labels and thing_list must be integer class ids") from None
    if not labels:
        raise _fail(path, "labels must list at least one class id")
    unknown = [t for t in thing_list if t not in labels]
    if unknown:
        raise _fail(path, f"thing_list has classes {unknown} that are not in labels {list(labels)}")
    pf = raw["padding_factor"]
    if isinstance(pf, bool) or not isinstance(pf, int) or pf < 1:
        raise _fail(path, f"padding_factor must be a positive integer, got {pf!r}")
    norms = raw["norms"]
    if not isinstance(norms, dict) or "mean" not in norms or "std" not in norms:
        raise _fail(path, "norms must be a mapping with 'mean' and 'std'")
    try:
        mean, std = float(norms["mean"]), float(norms["std"])
    except (TypeError, ValueError):
        raise _fail(path, f"norms mean and std must be numbers, got {norms!r}") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise _fail(path, f"norms mean must be finite and std finite and > 0, got {mean}, {std}")
    model = raw["model"]
    if not isinstance(model, str) or not model:
        raise _fail(path, "model must be a path or URL of a TorchScript file")
    quant = raw.get("model_quantized")
    pixel = raw.get("pixel_size_nm")
    if pixel is not None:
        try:
            pixel = float(pixel)
        except (TypeError, ValueError):
            pixel = float("nan")
        if not (math.isfinite(pixel) and pixel > 0):
            raise _fail(path, f"pixel_size_nm must be a positive number of nm, got {raw['pixel_size_nm']!r}")
    return ModelConfig(
        name=path.stem,
        class_names=class_names,
        labels=labels,
        thing_list=thing_list,
        model=_resolve(model, path.parent),
        padding_factor=pf,
        norms=(mean, std),
        description=str(raw.get("description") or "").strip(),
        config_path=str(path.resolve()),
        model_quantized=_resolve(quant, path.parent) if isinstance(quant, str) and quant else None,
        sha256=raw.get("sha256"),
        pixel_size_nm=pixel,
    )


def is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https", "ftp", "file")


def _resolve(model: str, base: Path) -> str:
    if is_url(model):
        return model
    p = Path(os.path.expanduser(model))
    return str(p if p.is_absolute() else (base / p).resolve())


def default_config_path() -> Path:
    """Path of the YAML config of the model shipped inside the package."""
    return Path(__file__).resolve().parent / "default" / "nbapp_mito.yaml"


def confine_model_path(path, root, what: str) -> Path:
    """:func:`nbapp.confine.confine` for model files: its error as a :class:`ModelError`."""
    from nbapp.confine import confine
    from nbapp.errors import InputError

    try:
        return confine(path, root, what)
    except InputError as exc:
        raise ModelError(str(exc)) from None


def cache_dir() -> Path:
    """Where downloaded model files live: ``$NBAPP_CACHE`` or ``~/.cache/nbapp``."""
    return Path(os.environ.get("NBAPP_CACHE") or Path.home() / ".cache" / "nbapp")


def fetch(location: str, sha256: str | None = None, progress=True, cancel=None) -> Path:
    """Return a local path for ``location``; download an http(s) URL once into
    :func:`cache_dir` (see :func:`nbapp.models.download.download`: hash checked, atomic,
    resumable, cancellable). ``file://`` URLs and paths are used where they are.
    """
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        location = urllib.request.url2pathname(parsed.path)
    elif is_url(location):
        if parsed.scheme not in ("http", "https"):
            raise ModelError(f"cannot download {location}: only http(s) and file URLs are supported")
        from nbapp.models.download import download

        name = Path(urllib.parse.unquote(parsed.path)).name or "model.pt"
        key = hashlib.sha256(location.encode()).hexdigest()[:16]
        return download(location, cache_dir() / key / name, sha256, progress=progress,
                        cancel=cancel)
    p = Path(location)
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    if sha256:
        from nbapp.models.download import file_sha256

        digest = file_sha256(p)
        if digest != sha256.lower():
            raise ModelError(f"model file {p} has SHA-256 {digest}, the config expects {sha256}")
    return p
