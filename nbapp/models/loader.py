"""One loader for every kind of model: the shipped default, empanada YAML configs, TorchScript
files and in-memory ``nn.Module`` objects. It always returns an eval-mode :class:`Model` that
knows its config and checks the model contract on first use.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import torch
import yaml

from nbapp.errors import ModelError
from nbapp.models.config import (ModelConfig, confine_model_path, default_config_path, fetch,
                                 read_config)
from nbapp.models.guard import check_archive, check_module

__all__ = ["Model", "load_model", "resolve_device", "default_config_path", "check_outputs",
           "gpu_devices", "device_names"]

_EXTRA_CONFIG = "nbapp_config.yaml"


def gpu_devices() -> list[str]:
    """Every CUDA device torch sees: ``["cuda:0", "cuda:1", ...]`` (empty without a GPU)."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def device_names() -> list[str]:
    """Every device a model can run on here: ``cpu``, each CUDA GPU, then ``mps`` if present.

    >>> device_names()[0]
    'cpu'
    """
    mps = getattr(torch.backends, "mps", None)
    return ["cpu", *gpu_devices()] + (["mps"] if mps is not None and mps.is_available() else [])


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Check a device name and return it; ``None`` picks CUDA, then MPS, then CPU.

    Raises :class:`ModelError` naming the problem for unknown or unavailable devices.
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ModelError(f"device {device!r} requested but no CUDA GPU is available; use cpu")
        if dev.index is not None and dev.index >= n:
            raise ModelError(f"device {device!r} requested but only {n} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError("device 'mps' requested but Apple MPS is not available; use cpu")
    elif dev.type != "cpu":
        raise ModelError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or mps")
    return dev


def check_outputs(out, x_shape: tuple, render_steps: int, interpolate_ins: bool) -> None:
    """Raise :class:`ModelError` unless ``out`` honours the model contract for input ``x_shape``.

    Expected: a dict with "sem_logits" (N, C, H*s, W*s) for s a power of two up to
    2**(render_steps - 2) (at least input size), "ctr_hmp" (N, 1, h, w) and "offsets"
    (N, 2, h, w) with (h, w) = (H, W) if ``interpolate_ins`` else (H/4, W/4).
    """
    n, _, hgt, wid = x_shape
    if not isinstance(out, dict):
        raise ModelError(
            "model must return a dict with keys 'sem_logits', 'ctr_hmp', 'offsets'; "
            f"got {type(out).__name__}"
        )
    missing = [k for k in ("sem_logits", "ctr_hmp", "offsets") if k not in out]
    if missing:
        raise ModelError(f"model output is missing key(s) {missing}; expected 'sem_logits', "
                         f"'ctr_hmp', 'offsets', got {sorted(out)}")
    for k in ("sem_logits", "ctr_hmp", "offsets"):
        if not isinstance(out[k], torch.Tensor) or out[k].ndim != 4:
            got = tuple(out[k].shape) if isinstance(out[k], torch.Tensor) else type(out[k]).__name__
            raise ModelError(f"model output {k!r} must be a 4D tensor (N, C, H, W), got {got}")
    sem = out["sem_logits"]
    sn, sc, sh, sw = sem.shape
    scale = sh / hgt
    max_scale = 2 ** max(render_steps - 2, 0)
    if sn != n or sc < 1 or sh * wid != sw * hgt or scale < 1 or scale > max_scale or (
        scale != int(scale) or int(scale) & (int(scale) - 1)
    ):
        raise ModelError(
            f"model output 'sem_logits' has shape {tuple(sem.shape)}; expected ({n}, C, {hgt}*s, "
            f"{wid}*s) with s a power of two <= {max_scale} for input {tuple(x_shape)}"
        )
    gh, gw = (hgt, wid) if interpolate_ins else (hgt // 4, wid // 4)
    for k, c in (("ctr_hmp", 1), ("offsets", 2)):
        if tuple(out[k].shape) != (n, c, gh, gw):
            raise ModelError(
                f"model output {k!r} has shape {tuple(out[k].shape)}; expected {(n, c, gh, gw)} "
                f"for input {tuple(x_shape)} with interpolate_ins={interpolate_ins}"
            )


class Model:
    """An eval-mode segmentation model with its config, on one device.

    Call it like the raw model: ``model(x, render_steps, interpolate_ins)``; the first call for
    each ``interpolate_ins`` value checks the outputs against the contract.

    Attributes
    ----------
    config : ModelConfig
    module : torch.nn.Module
    device : torch.device
    weights : str or None
        Path of the file the weights came from.
    """

    def __init__(self, module: torch.nn.Module, config: ModelConfig, device: torch.device,
                 weights: str | None = None):
        self.module = module.eval()
        self.config = config
        self.device = device
        self.weights = weights
        self._checked: set = set()

    @property
    def parameters(self) -> int:
        """Number of parameters of the network, the packed int8 weights of a quantized model
        included (they are not torch parameters)."""
        n = sum(p.numel() for p in self.module.parameters())
        for _, sub in self.module.named_modules():
            packed = getattr(sub, "_packed_params", None)
            if isinstance(packed, torch.ScriptObject) and hasattr(packed, "unpack"):
                weight, bias = packed.unpack()[:2]
                n += weight.numel() + (0 if bias is None else bias.numel())
        return int(n)

    @property
    def num_classes(self) -> int:
        return len(self.config.labels)

    def __call__(self, x: torch.Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> dict:
        try:
            out = self.module(x, render_steps=render_steps, interpolate_ins=interpolate_ins)
        except (RuntimeError, TypeError) as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            if "out of memory" in text or "can't allocate memory" in text:
                raise MemoryError(f"out of memory running model {self.config.name!r} on an input "
                                  f"of shape {tuple(x.shape)} on {self.device}: {first}") from None
            raise ModelError(
                f"model {self.config.name!r} failed on an input of shape {tuple(x.shape)} "
                f"(it must accept (x, render_steps: int, interpolate_ins: bool)): {first}"
            ) from None
        if interpolate_ins not in self._checked:
            check_outputs(out, tuple(x.shape), render_steps, interpolate_ins)
            self._checked.add(interpolate_ins)
        return out

    def to(self, device) -> "Model":
        """Return this model on ``device`` (a new wrapper sharing nothing mutable)."""
        dev = resolve_device(device)
        if dev == self.device:
            return self
        return Model(_copy_module(self.module).to(dev), self.config, dev, self.weights)

    def info(self) -> dict:
        """Description as a JSON-able dict (what ``nbapp info --json`` prints)."""
        d = self.config.to_dict()
        d.update(weights=self.weights, parameters=self.parameters, device=str(self.device),
                 classes=[self.config.class_names.get(c, str(c)) for c in self.config.labels])
        return d

    def warm_up(self) -> None:
        """Run one small forward pass (checks the contract, primes kernels and allocators)."""
        side = max(self.config.padding_factor, 64)
        side = -(-side // self.config.padding_factor) * self.config.padding_factor
        x = torch.zeros((1, 1, side, side), device=self.device)
        with torch.inference_mode():
            self(x, render_steps=2, interpolate_ins=False)

    def __repr__(self) -> str:
        return (f"Model({self.config.name!r}, parameters={self.parameters:,}, "
                f"device={str(self.device)!r})")


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location="cpu")
    import copy

    return copy.deepcopy(module)


def _load_torchscript(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict | None]:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a TorchScript model file (not a zip archive); "
                         "export the model with torch.jit.script(...).save(path)")
    check_archive(path)  # before loading: loading runs the file's __setstate__ code
    extra = {_EXTRA_CONFIG: ""}
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in torch >= 2.10 but it is the MitoNet / empanada format
            warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated",
                                    category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} is not a loadable TorchScript model ({msg}); a plain state "
                         "dict needs its architecture: export with torch.jit.script") from None
    check_module(module, path)  # before it runs: every operator of every method
    cfg = None
    if extra[_EXTRA_CONFIG]:
        try:
            cfg = yaml.safe_load(extra[_EXTRA_CONFIG])
        except yaml.YAMLError as exc:
            raise ModelError(f"{path}: its embedded {_EXTRA_CONFIG} is not valid YAML "
                             f"({exc.__class__.__name__})") from None
        if cfg is not None and not isinstance(cfg, dict):
            raise ModelError(f"{path}: its embedded {_EXTRA_CONFIG} must be a mapping of fields, "
                             f"got {type(cfg).__name__}")
    return module, cfg


def _config_for_file(path: Path, embedded: dict | None, root=None) -> ModelConfig:
    for ext in (".yaml", ".yml"):
        sibling = path.with_suffix(ext)
        if sibling.is_file():
            if root is not None:
                confine_model_path(sibling, root, "model config")
            return read_config(sibling)
    if embedded:
        try:
            norms = embedded.get("norms") or {}
            config = ModelConfig(
                name=path.stem,
                class_names={int(k): str(v)
                             for k, v in (embedded.get("class_names") or {1: "mito"}).items()},
                labels=tuple(int(v) for v in embedded.get("labels", (1,))),
                thing_list=tuple(int(v) for v in embedded.get("thing_list", (1,))),
                model=str(path),
                padding_factor=int(embedded.get("padding_factor", 16)),
                norms=(float(norms.get("mean", 0.57571)), float(norms.get("std", 0.12765))),
                description=str(embedded.get("description", "")).strip(),
            )
        except (AttributeError, TypeError, ValueError):
            raise ModelError(f"{path}: its embedded {_EXTRA_CONFIG} has fields of the wrong type "
                             "(class_names a mapping, labels and thing_list lists of class ids, "
                             "padding_factor an integer, norms a mapping of numbers)") from None
        if config.padding_factor < 1 or not config.labels:
            raise ModelError(f"{path}: its embedded {_EXTRA_CONFIG} needs padding_factor >= 1 "
                             "and at least one label")
        return config
    return ModelConfig(
        name=path.stem,
        model=str(path),
        description="TorchScript model without a config: assumed one thing class (1), "
                    "padding factor 16 and MitoNet's intensity norms.",
    )


def quantized_engines() -> list[str]:
    """The quantized CPU engines this torch build has (fbgemm / x86 / qnnpack / onednn)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_quantized(device: torch.device) -> None:
    """Refuse to run a quantized model where it cannot run: off the CPU, or on a torch build
    without a quantized CPU engine."""
    if device.type != "cpu":
        raise ModelError(f"quantized models run on the CPU only, not on {device}; drop "
                         "--quantized (untick Quantized) to use the full model on the GPU")
    if not quantized_engines():
        raise ModelError("this torch build's CPU backend cannot run quantized models (no "
                         "quantized engine such as fbgemm, x86 or qnnpack); load the full model "
                         "(drop --quantized)")


def load_model(spec="default", device=None, warm_up: bool = True, root=None,
               quantized: bool = False, progress=True, cancel=None) -> Model:
    """Load a segmentation model and return it in eval mode on ``device``.

    Parameters
    ----------
    spec : str, path, Model or torch.nn.Module
        ``"default"`` (the model shipped with nbapp), a zoo name (``nbapp models`` lists them:
        ``MitoNet_v1``, ``MitoNet_v1_mini`` ... downloaded once into the cache), an
        empanada-format ``.yaml`` config (its
        ``model`` may be a URL, downloaded once into the cache), a TorchScript file (a config
        beside it with the same stem is used when present), a :class:`Model`, or a module.
    device : str or torch.device, optional
        ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; default: the first GPU, else CPU.
    warm_up : bool
        Run one small forward pass now (checks the contract; later calls are fast).
    root : path, optional
        Confine loading to this folder (the app passes its data root): a path spec is taken
        from it and must resolve inside it, and so must the weights a config names (``model``
        and ``model_quantized``) and a config beside a TorchScript file; a config's URLs must
        be the model zoo's (:func:`nbapp.models.zoo.trusted_url`). ``"default"`` and
        in-memory models are always allowed.
    quantized : bool
        Use the zoo model's quantized CPU file (``MITONET_quantized``).
    progress : bool or callable
        Download progress: a tqdm bar, or ``progress(done_bytes, total_bytes)``.
    cancel : threading.Event, optional
        Set it to cancel a download (:class:`nbapp.models.download.DownloadCancelled`).

    Raises
    ------
    ModelError
        The model or its config is missing, invalid, outside ``root``, or breaks the contract.
    """
    from nbapp.models import zoo

    entry = zoo.find(str(spec), quantized) if isinstance(spec, (str, os.PathLike)) else None
    if quantized and entry is None:
        raise ModelError(f"--quantized needs a zoo model name (`nbapp models` lists them), "
                         f"not {str(spec)!r}")
    if entry is not None and entry.quantized and device is None:
        device = "cpu"
    dev = resolve_device(device)
    if entry is not None and not entry.bundled:
        if entry.quantized:
            check_quantized(dev)
        weights = zoo.fetch_model(entry, progress=progress, cancel=cancel)
        module, _ = _load_torchscript(weights, dev)
        model = Model(module, entry.config, dev, str(weights))
        if warm_up:
            model.warm_up()
        return model
    if isinstance(spec, Model):
        return spec.to(dev)
    if isinstance(spec, torch.nn.Module):
        name = type(spec).__name__
        model = Model(spec.to(dev), ModelConfig(name=name, description=f"in-memory {name}"), dev)
    else:
        if not isinstance(spec, (str, os.PathLike)):
            raise ModelError(f"model must be 'default', a path or a torch module, got {type(spec).__name__}")
        if str(spec) == "default":
            root = None  # the shipped model is always allowed
            spec = default_config_path()
            if not spec.is_file():
                raise ModelError(f"the default model is missing from this installation ({spec})")
        elif root is not None:
            spec = confine_model_path(spec, root, "model")
        path = Path(spec)
        if path.suffix.lower() in (".yaml", ".yml"):
            config = read_config(path)
            if root is not None:
                zoo.confine_config(config, root)
            weights = fetch(config.model, config.sha256, progress=progress, cancel=cancel)
            module, _ = _load_torchscript(Path(weights), dev)
            model = Model(module, config, dev, str(weights))
        else:
            if not path.exists():
                raise ModelError(f"model {str(spec)!r} does not exist: give 'default', a model "
                                 "zoo name (`nbapp models` lists them), a .yaml config or a "
                                 "TorchScript file")
            module, embedded = _load_torchscript(path, dev)
            model = Model(module, _config_for_file(path, embedded, root), dev, str(path))
    if warm_up:
        model.warm_up()
    return model
