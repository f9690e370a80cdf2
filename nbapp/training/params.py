"""What a training run is: :class:`TrainParams`, frozen and checked when made."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

from nbapp.errors import ParameterError
from nbapp.params import PLANES

__all__ = ["TrainParams", "AugmentConfig", "EXPORT_DEFAULTS"]


@dataclass
class AugmentConfig:
    """Ranges of the random augmentations."""

    scale_lo: float = 0.75
    scale_hi: float = 1.35
    zoom_out_p: float = 0.2
    zoom_out_hi: float = 3.0
    contrast: tuple = (0.7, 1.4)
    brightness: float = 0.12
    gamma: tuple = (0.7, 1.5)
    noise_p: float = 0.3
    noise_hi: float = 0.06
    blur_p: float = 0.2
    lowres_p: float = 0.2
    pad_p: float = 0.25
    pad_max: float = 0.6
    shading_p: float = 0.0
    shading_max: float = 0.4
    fit: bool = True
    object_p: float = 0.0
    object_shift: tuple = (-0.3, 0.1)
    object_gain: tuple = (0.5, 1.5)
    synthetic_p: float = 0.0
    hard_negatives_p: float = 0.0


_AUG = AugmentConfig()  # the defaults TrainParams exposes

#: Export-only options of the TorchScript written at each best validation (the shipped model's).
EXPORT_DEFAULTS = {"ctr_smooth": 1.0, "ctr_gate": True, "sem_smooth": 1.0}


@dataclass(frozen=True)
class TrainParams:
    """A training run (``nbapp train`` / ``python -m nbapp.train``; one field per option).

    ``raw`` and ``labels`` are a (Z, Y, X) volume and its 3D instance labels; the last
    ``val_slices`` Z slices are held out. ``planes`` is a tuple (or "xy,xz"); ``arch`` a dict
    (or JSON text) overriding :data:`nbapp.models.arch.ARCH_DEFAULTS`; ``time_limit`` and
    ``stop_after`` are minutes; ``init`` starts from a checkpoint or an nbapp model
    (fine-tuning), ``resume`` from ``last.pth``. Bad values raise :class:`ParameterError`
    naming the command-line option.
    """

    raw: str
    labels: str
    out: str
    val_slices: int = 35
    steps: int = 6000
    batch_size: int = 8
    patch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.03
    sigma: float = 6.0
    w_ctr: float = 200.0
    w_off: float = 0.01
    val_every: int = 500
    val_stride: int = 1
    save_minutes: float = 3.0
    time_limit: float | None = None
    stop_after: float | None = None
    resume: str | None = None
    init: str | None = None
    planes: tuple = PLANES
    workers: int = 0
    arch: dict | None = None
    export_ctr_smooth: float = EXPORT_DEFAULTS["ctr_smooth"]
    export_ctr_gate: bool = EXPORT_DEFAULTS["ctr_gate"]
    export_sem_smooth: float = EXPORT_DEFAULTS["sem_smooth"]
    zoom_out_max: float = _AUG.zoom_out_hi
    zoom_in_max: float = 1 / _AUG.scale_lo
    shading_p: float = _AUG.shading_p
    fit_patches: bool = True
    object_contrast_p: float = _AUG.object_p
    synthetic_p: float = _AUG.synthetic_p
    hard_negatives_p: float = _AUG.hard_negatives_p
    zoom_out_p: float = _AUG.zoom_out_p
    gamma: tuple = _AUG.gamma
    pad_p: float = _AUG.pad_p
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        from nbapp.models.arch import ARCH_DEFAULTS, PADDING_FACTOR

        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("raw", "labels", "out"):
            put(name, str(getattr(self, name)))
        for name in ("resume", "init"):
            if getattr(self, name) is not None:
                put(name, str(getattr(self, name)))
        put("planes", _planes(self.planes))
        put("gamma", tuple(float(g) for g in self.gamma))
        if isinstance(self.arch, str):
            put("arch", _arch(self.arch, ARCH_DEFAULTS))
        elif self.arch is not None:
            put("arch", _arch(json.dumps(dict(self.arch)), ARCH_DEFAULTS))
        if self.patch % PADDING_FACTOR or self.patch <= 0:
            raise ParameterError(f"--patch must be a multiple of {PADDING_FACTOR}, got {self.patch}")
        if self.zoom_in_max < 1.0:
            raise ParameterError(f"--zoom-in-max must be >= 1, got {self.zoom_in_max}")
        for name in ("pad_p", "zoom_out_p", "shading_p", "object_contrast_p", "synthetic_p",
                     "hard_negatives_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParameterError(f"--{name.replace('_', '-')} must be a probability in "
                                     f"[0, 1], got {getattr(self, name)}")
        if len(self.gamma) != 2 or not 0 < self.gamma[0] <= self.gamma[1]:
            raise ParameterError(f"--gamma needs 0 < LO <= HI, got "
                                 f"{' '.join(map(str, self.gamma))}")
        if self.zoom_out_max < _AUG.scale_hi:
            raise ParameterError(f"--zoom-out-max must be >= {_AUG.scale_hi}, got "
                                 f"{self.zoom_out_max}")
        for name in ("steps", "batch_size", "val_every", "val_stride"):
            if int(getattr(self, name)) < 1:
                raise ParameterError(f"--{name.replace('_', '-')} must be at least 1, got "
                                     f"{getattr(self, name)}")
        if self.workers < 0 or self.val_slices < 1:
            raise ParameterError(f"--workers must be >= 0 and --val-slices >= 1, got "
                                 f"{self.workers} and {self.val_slices}")
        if not 0.0 <= self.warmup < 1.0:
            raise ParameterError(f"--warmup must be in [0, 1), got {self.warmup}")
        for name in ("lr", "time_limit", "stop_after", "save_minutes"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise ParameterError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")

    @classmethod
    def from_args(cls, args) -> "TrainParams":
        """From the ``argparse.Namespace`` of :func:`nbapp.training.cli.add_arguments`."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["progress"] = not getattr(args, "no_progress", False)
        return cls(**values)

    def replace(self, **changes) -> "TrainParams":
        return TrainParams(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def _planes(value) -> tuple:
    text = value if isinstance(value, str) else ",".join(value)
    planes = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in planes if p not in PLANES]
    if not planes or bad or len(set(planes)) != len(planes):
        raise ParameterError(f"--planes must list distinct planes out of xy, xz, yz separated by "
                             f"commas (e.g. xy or xy,xz,yz), got {text!r}")
    return tuple(p for p in PLANES if p in planes)


def _arch(text: str, known: dict) -> dict:
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParameterError(f"--arch must be a JSON object, e.g. '{{\"depths\": [0, 1, 2, 3, "
                             f"2]}}': {exc}") from None
    if not isinstance(arch, dict):
        raise ParameterError(f"--arch must be a JSON object, got {text!r}")
    unknown = set(arch) - set(known)
    if unknown:
        raise ParameterError(f"--arch: unknown hyper-parameters {sorted(unknown)}; known: "
                             f"{sorted(known)}")
    return arch
