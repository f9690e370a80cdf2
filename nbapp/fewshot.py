"""Few-shot fine-tuning: adapt a model to the user's own EM from a few labelled (or proofread)
2D slices, in minutes on a CPU.

The recipe (:func:`finetune`): the slices are scaled as inference will see them
(``downsampling``), every slice is a source of augmented patches (:class:`nbapp.training.data.PatchSampler`:
rotations, flips, scale, contrast, noise), the whole network trains with AdamW at a constant
learning rate after a short warm-up, batch norm statistics frozen at values recalibrated on the
user's images (a batch of 4 patches is too small to estimate them), and pixels the user
corrected (``weights``) weigh more in the semantic loss. The result is an empanada-format model
(TorchScript + YAML) that ``--model``, the app and empanada-napari load.

Fine-tuning needs a model in nbapp's architecture: ``default`` or a model fine-tuned from it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nbapp.errors import InputError, ParameterError

__all__ = ["FinetuneParams", "FinetuneResult", "finetune", "corrected_weights", "score_slices",
           "tune_thresholds", "THRESHOLD_GRID", "held_out_band", "held_out_text", "weights_model"]


@dataclass(frozen=True)
class FinetuneParams:
    """Settings of :func:`finetune` (the defaults are the measured recipe, bench/bench_fewshot.py).

    Attributes
    ----------
    minutes : float
        Time limit (the run stops at the first of ``minutes`` and ``max_steps``).
    max_steps : int
        Step limit.
    patch : int
        Side of the square training patches (a multiple of 32).
    batch_size : int
        Patches per step.
    lr : float
        Peak learning rate (AdamW).
    weight_decay : float
    warmup_steps : int
        Linear warm-up of the learning rate.
    corrected_weight : float
        Weight, in the semantic loss, of pixels whose label the user changed (1 = no emphasis).
    freeze_bn : bool
        Keep batch-norm statistics fixed (recalibrated once on the user's images).
    downsampling : int
        Scale the slices down by this factor first: train at the scale inference will run at.
    synthetic_p : float
        Share of synthetic EM patches (:mod:`nbapp.training.synth`) mixed in, so that the model keeps
        what it knew about other EM while it learns the user's.
    held_out : float
        Share of each labelled slice kept apart as a band along one edge (the band with the most
        objects) and never trained on: the model is scored there (F1@0.5) before training and
        every ``val_every`` steps, and the best-scoring weights are the result, the starting
        model's included (fine-tuning never returns a model worse there than it started).
        0 trains on everything and returns the last weights.
    val_every : int
        Steps between two scorings of the held-out bands.
    patience : int
        Stop early after this many scorings without a better held-out score (0: never).
    seed : int
    """

    minutes: float = 5.0
    max_steps: int = 100_000
    patch: int = 256
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    corrected_weight: float = 4.0
    freeze_bn: bool = True
    downsampling: int | float = 1
    synthetic_p: float = 0.0
    held_out: float = 0.2
    val_every: int = 100
    patience: int = 6
    seed: int = 0

    def __post_init__(self):
        from nbapp.params import DOWNSAMPLING_FACTORS

        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise ParameterError(f"minutes must be a positive number, got {self.minutes!r}")
        if self.max_steps < 1:
            raise ParameterError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.patch < 64 or self.patch % 32:
            raise ParameterError(f"patch must be a multiple of 32 and >= 64, got {self.patch}")
        if self.batch_size < 1:
            raise ParameterError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ParameterError(f"lr must be > 0, got {self.lr}")
        if self.corrected_weight < 1:
            raise ParameterError(f"corrected_weight must be >= 1, got {self.corrected_weight}")
        if not 0.0 <= self.synthetic_p <= 1.0:
            raise ParameterError(f"synthetic_p must be a probability in [0, 1], got "
                                 f"{self.synthetic_p}")
        if not 0.0 <= self.held_out <= 0.5:
            raise ParameterError(f"held_out must be a share of each slice in [0, 0.5], got "
                                 f"{self.held_out}")
        if self.val_every < 1:
            raise ParameterError(f"val_every must be >= 1 step, got {self.val_every}")
        if self.patience < 0:
            raise ParameterError(f"patience must be >= 0 scorings (0: never stop early), got "
                                 f"{self.patience}")
        if self.downsampling not in DOWNSAMPLING_FACTORS:
            raise ParameterError(f"downsampling must be one of {DOWNSAMPLING_FACTORS}, "
                                 f"got {self.downsampling!r}")


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the tuned model (loaded, in eval mode), where it was
    saved (``config``: the YAML), the loss curve and how long it took."""

    model: object
    config: Path | None
    steps: int
    seconds: float
    losses: list = field(default_factory=list)
    stopped: str = "done"  # "done", "time limit", "cancelled" or "no gain" (early stop)
    #: the held-out bands' scores (None without bands): ``slices`` (how many slices gave a band),
    #: ``objects``, ``start`` and ``best`` (F1@0.5, PQ, FG IoU), ``best_step`` (0: the starting
    #: model was kept), ``curve`` ([(step, f1), ...])
    held_out: dict | None = None
    #: best-so-far weights at the steps asked for with ``snapshot_steps`` (benchmarks)
    snapshots: dict = field(default_factory=dict)

    @property
    def kept_start(self) -> bool:
        """True when no training step beat the starting model on the held-out bands."""
        return self.held_out is not None and self.held_out["best_step"] == 0


def corrected_weights(labels: np.ndarray, predicted: np.ndarray, weight: float) -> np.ndarray:
    """Per-pixel loss weights: ``weight`` where the user's labels and the model's prediction
    disagree on foreground (pixels added or erased in proofreading), 1 elsewhere.

    >>> corrected_weights(np.array([[1, 0, 0]]), np.array([[1, 1, 0]]), 4.0).tolist()
    [[1.0, 4.0, 1.0]]
    """
    changed = (np.asarray(labels) > 0) != (np.asarray(predicted) > 0)
    return np.where(changed, np.float32(weight), np.float32(1.0)).astype(np.float32)


def _as_slices(images, labels, weights) -> list[tuple]:
    """(image, labels, weights or None) per 2D slice, checked."""
    def split(x, what):
        if x is None:
            return None
        if isinstance(x, np.ndarray) and x.ndim == 3:
            return list(x)
        if isinstance(x, np.ndarray) and x.ndim == 2:
            return [x]
        if isinstance(x, (list, tuple)):
            return [np.asarray(a) for a in x]
        raise InputError(f"{what} must be a 2D image, a (N, H, W) stack or a list of 2D "
                         f"images, got {type(x).__name__}")

    imgs, labs = split(images, "images"), split(labels, "labels")
    wts = split(weights, "weights")
    if not imgs:
        raise InputError("fine-tuning needs at least one labelled slice")
    if len(imgs) != len(labs) or (wts is not None and len(wts) != len(imgs)):
        raise InputError(f"got {len(imgs)} images but {len(labs)} label images"
                         + (f" and {len(wts)} weight maps" if wts is not None else ""))
    out = []
    for i, (im, la) in enumerate(zip(imgs, labs)):
        w = None if wts is None else wts[i]
        if im.ndim != 2 or im.shape != la.shape or (w is not None and w.shape != im.shape):
            raise InputError(f"slice {i}: image {im.shape} and labels {la.shape}"
                             + (f" and weights {w.shape}" if w is not None else "")
                             + " must be 2D and of one shape")
        if not np.issubdtype(la.dtype, np.integer) and not np.issubdtype(la.dtype, np.bool_):
            raise InputError(f"slice {i}: labels must be integers (0 background), got {la.dtype}")
        if min(im.shape) < 16:
            raise InputError(f"slice {i} of {im.shape[0]}x{im.shape[1]} pixels is too small "
                             "to train on (at least 16x16)")
        out.append((im, la.astype(np.int32), w))
    if not any(np.any(la > 0) for _, la, _ in out):
        raise InputError("the labelled slices hold no objects: label (or keep) at least one "
                         "object, else the model learns that there is nothing to find")
    return out


#: The narrowest held-out band, in pixels of the model's input (a band must hold whole objects).
MIN_BAND = 48


def held_out_band(labels: np.ndarray, share: float, downsampling=1) -> tuple | None:
    """``(keep, band)``: two index expressions splitting a 2D slice into the part to train on
    and a band along one edge to score on, or None when no band of ``share`` of the slice (at
    least :data:`MIN_BAND` model pixels, at most half the slice) holds a whole object (one its
    inner edge does not cut). Of the four edges, the band with the most whole objects wins
    (ties: bottom, right, top, left).

    >>> lab = np.zeros((100, 100), int); lab[90:95, 10:20] = 1
    >>> keep, band = held_out_band(lab, 0.2)
    >>> lab[keep].shape, lab[band].shape, int(lab[band].max())
    ((52, 100), (48, 100), 1)
    """
    if share <= 0:
        return None
    best, most = None, 0
    for axis in (0, 1):
        n = labels.shape[axis]
        size = max(int(round(share * n)), int(math.ceil(MIN_BAND * downsampling)))
        if size > n // 2:
            continue
        for at_end in (True, False):
            cut = slice(n - size, n) if at_end else slice(0, size)
            rest = slice(0, n - size) if at_end else slice(size, n)
            band = (cut, slice(None)) if axis == 0 else (slice(None), cut)
            keep = (rest, slice(None)) if axis == 0 else (slice(None), rest)
            inner = (cut.start if at_end else cut.stop - 1)  # the line facing the rest
            edge = (inner, slice(None)) if axis == 0 else (slice(None), inner)
            count = len(np.setdiff1d(np.unique(labels[band]), np.unique(labels[edge])))
            if count > most:
                best, most = (keep, band), count
    return best


def _split_held_out(items: list[tuple], share: float, ds) -> tuple[list, list]:
    """The slices to train on (each less its held-out band) and the bands to score on:
    ``(image, labels, band, edge)``, the image and labels of the band widened by as much
    context again from the training side (``band``: where the band lies in them; the network
    sees the context, only the band is scored; ``edge``: the band's line that faces the
    context, as an index of the band)."""
    train, bands = [], []
    for im, la, w in items:
        cut = held_out_band(la, share, ds)
        if cut is None:
            train.append((im, la, w))
            continue
        keep, band = cut
        train.append((im[keep], la[keep], None if w is None else w[keep]))
        axis = 0 if band[1] == slice(None) else 1
        n, b = la.shape[axis], band[axis]
        size = b.stop - b.start
        lo, hi = (max(0, b.start - size), n) if b.stop == n else (0, min(n, b.stop + size))
        wide = tuple(slice(lo, hi) if a == axis else slice(None) for a in (0, 1))
        inner = tuple(slice(b.start - lo, b.stop - lo) if a == axis else slice(None)
                      for a in (0, 1))
        line = 0 if b.stop == n else size - 1  # (a bottom or right band: its first line)
        edge = (line, slice(None)) if axis == 0 else (slice(None), line)
        bands.append((im[wide], la[wide], inner, edge))
    return train, bands


def score_held_out(model, bands: list[tuple], downsampling=1) -> dict:
    """F1@0.5, precision, recall, FG IoU and PQ of ``model`` on held-out bands
    (``(image, labels, band, edge)`` as :func:`_split_held_out` gives them; ``edge`` None:
    nothing cut): each image is segmented whole, then only its band is scored, without the
    objects (true or found) that the band's inner edge cuts: a piece of an object is not an object to count (a 48-px band of small
    mitochondria scored 0.44 at the start where whole slices scored 0.82)."""
    from nbapp.inference import SliceSegmenter
    from nbapp.metrics import slice_metrics
    from nbapp.params import SliceParams

    seg = SliceSegmenter(model)
    preds, truths = [], []
    for im, la, band, edge in bands:
        pred = seg(im, SliceParams(downsampling=downsampling))[band].copy()
        truth = la[band].copy()
        for lab in (pred, truth):
            cut = np.unique(lab[edge]) if edge is not None else np.zeros(0, lab.dtype)
            lab[np.isin(lab, cut[cut > 0])] = 0
        preds.append(pred)
        truths.append(truth)
    m = slice_metrics(preds, truths)
    return {k: float(m[k]) for k in ("f1", "precision", "recall", "fg_iou", "pq")}


def _prepare(items: list[tuple], ds) -> list[tuple]:
    """Unit-range images at the scale the engine shows them to the model (its intensity
    mapping and :func:`nbapp.engine.resize_for_model`), with labels and weights to match."""
    import torch

    from nbapp.engine import resize_for_model
    from nbapp.intensity import intensity_range, to_unit

    def match(a):  # labels / weights: nearest neighbour to the model's grid
        if a is None or ds == 1:
            return a
        if ds > 1:
            return a[::ds, ::ds]
        k = int(round(1 / ds))
        return np.repeat(np.repeat(a, k, 0), k, 1)

    out = []
    for im, la, w in items:
        lo, hi, _ = intensity_range(im)
        unit = resize_for_model(torch.from_numpy(to_unit(im, lo, hi))[None, None], ds)[0, 0]
        w = match(w)
        out.append((np.ascontiguousarray(unit.numpy(), np.float32), match(la),
                    None if w is None else np.ascontiguousarray(w, np.float32)))
    return out


def weights_model(weights: dict, arch: dict, norms: dict, device="cpu", name: str = "weights"):
    """A loaded :class:`nbapp.models.loader.Model` of nbapp's architecture from training weights
    (a state dict), with the export-only smoothing the saved model gets: what the app would run,
    without writing a file (held-out scoring, benchmarks)."""
    from nbapp.models import resolve_device
    from nbapp.models.arch import PADDING_FACTOR, build_model
    from nbapp.models.config import ModelConfig
    from nbapp.models.loader import Model
    from nbapp.training.export import EXPORT_OPTIONS

    dev = resolve_device(device)
    net = build_model(**{**arch, "ctr_smooth": EXPORT_OPTIONS["ctr_smooth"],
                         "ctr_gate": EXPORT_OPTIONS["ctr_gate"],
                         "sem_smooth": EXPORT_OPTIONS["sem_smooth"]})
    net.load_state_dict(weights)
    config = ModelConfig(name=name, padding_factor=PADDING_FACTOR,
                         norms=(float(norms["mean"]), float(norms["std"])))
    return Model(net.to(dev).eval(), config, dev)


def finetune(images, labels, init="default", minutes: float | None = None,
             params: FinetuneParams | None = None, weights=None, out=None,
             name: str = "finetuned", progress: Callable | None = None,
             cancel: threading.Event | None = None, device: str = "cpu",
             threads: int | None = None, pixel_size_nm: float | None = None,
             snapshot_steps=()) -> FinetuneResult:
    """Fine-tune ``init`` on labelled 2D slices; return the tuned model.

    Parameters
    ----------
    images, labels : (H, W) array, (N, H, W) stack or list of 2D arrays
        The slices and their instance (or 0/1) labels, 0 background.
    init : str
        The model to start from: ``default`` or a model fine-tuned from it (YAML or TorchScript).
    minutes : float, optional
        Time limit; overrides ``params.minutes``.
    params : FinetuneParams
    weights : like ``labels``, optional
        Per-pixel weights of the semantic loss (see :func:`corrected_weights`).
    out : path, optional
        Folder to save the model in (``NAME.pt`` + ``NAME.yaml``); a temporary folder if None.
    progress : callable, optional
        ``progress(step, max_steps, {"loss": [...], "minutes": m})`` after each step.
    cancel : threading.Event, optional
        Set to stop early; the model trained so far is saved and returned.
    pixel_size_nm : float, optional
        The slices' pixel size: the tuned model records ``pixel_size_nm * downsampling`` as the
        pixel size it works at (else the starting model's, when it records one).
    snapshot_steps : iterable of int
        Steps at which to keep a copy of the best weights so far (``result.snapshots``): one
        run gives a learning curve (bench/bench_fewshot_curve.py).

    Raises
    ------
    InputError
        Bad slices (shapes, dtypes, no objects).
    ParameterError
        Bad settings, or ``init`` is not in nbapp's architecture.
    """
    import tempfile

    import torch

    from nbapp.models import load_model, resolve_device
    from nbapp.models.arch import build_model, recalibrate_batchnorm
    from nbapp.training.data import AugmentConfig, PatchSampler, collate
    from nbapp.training.export import EXPORT_OPTIONS, config_dict, export_model, write_yaml
    from nbapp.training.loss import panoptic_loss
    from nbapp.training.start import load_init

    p = params or FinetuneParams()
    if minutes is not None:
        p = FinetuneParams(**{**p.__dict__, "minutes": float(minutes)})
    train_items, bands = _split_held_out(_as_slices(images, labels, weights), p.held_out,
                                         p.downsampling)
    slices = _prepare(train_items, p.downsampling)
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.monotonic()
    from nbapp.models import zoo

    entry = zoo.find(str(init))
    if entry is not None and not entry.bundled:
        raise ParameterError(f"{init} cannot be fine-tuned here: nbapp trains its own "
                             "architecture only (start from 'default', or a model fine-tuned "
                             "from it); fine-tune MitoNet models in empanada-napari")
    start = load_init(str(init))
    arch = start["arch"]
    model = build_model(**arch).to(dev)
    model.load_state_dict(start["state_dict"])
    norms = dict(start["norms"])
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    aug = AugmentConfig(pad_p=0.1, zoom_out_p=0.1, synthetic_p=p.synthetic_p)
    weighted = any(w is not None for _, _, w in slices)
    samplers = [PatchSampler(u[None], la[None], p.patch, rng, aug=aug, planes=("xy",),
                             weights=(w if w is not None else np.ones_like(u))[None]
                             if weighted else None)
                for u, la, w in slices]
    area = np.array([u.size for u, _, _ in slices], float)
    chance = area / area.sum()

    def batch():
        picks = rng.choice(len(samplers), size=p.batch_size, p=chance)
        return collate([samplers[i].sample() for i in picks], norms)

    if start["recalibrate"]:
        recalibrate_batchnorm(model, (batch()["image"].to(dev) for _ in range(8)))
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    losses: list = []
    step, stopped = 0, "done"
    model.train()
    if p.freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    snapshot_steps = {int(s) for s in snapshot_steps}
    snapshots: dict = {}

    def state():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def score_bands(weights_now) -> dict:
        """F1@0.5, PQ and FG IoU of these weights on the held-out bands, as the app runs them."""
        return score_held_out(weights_model(weights_now, arch, norms, dev, name), bands,
                              p.downsampling)

    on = "held-out bands"
    if p.held_out > 0 and not bands:  # no slice has room for a band: guard against a collapse
        # on what it trains on (12 steps took a small demo slice from 0.89 to 0.57)
        bands = [(im, la.copy(), (slice(None), slice(None)), None) for im, la, _ in train_items]
        on = "trained slices"
    held = None
    if bands:
        first = score_bands(state())  # recalibrated batch norm computes the same function
        held = {"on": on, "slices": len(bands),
                "objects": int(sum(np.count_nonzero(np.unique(b[1][b[2]])) for b in bands)),
                "start": first, "best": first, "best_step": 0, "curve": [(0, first["f1"])]}
        best_state, since_best = state(), 0

    def key(m):
        return (round(m["f1"], 6), round(m["pq"], 6))

    # the budget is training time: set-up, batch-norm recalibration (45 s on a CPU for a large
    # slice) and the held-out scorings do not count (issue 30 item 7)
    t_train = time.monotonic()
    limit = t_train + 60 * p.minutes
    while step < p.max_steps:
        if cancel is not None and cancel.is_set():
            stopped = "cancelled"
            break
        if time.monotonic() >= limit:
            stopped = "time limit"
            break
        for g in opt.param_groups:
            g["lr"] = p.lr * min(1.0, (step + 1) / max(1, p.warmup_steps))
        b = {k: v.to(dev) for k, v in batch().items()}
        loss, _ = panoptic_loss(model(b["image"], 2, False), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        losses.append(float(loss.item()))
        if held is not None and (step % p.val_every == 0 or step in snapshot_steps):
            t_val = time.monotonic()
            m = score_bands(state())
            held["curve"].append((step, m["f1"]))
            if key(m) > key(held["best"]):
                held["best"], held["best_step"], best_state, since_best = m, step, state(), 0
            else:
                since_best += 1
            limit += time.monotonic() - t_val
        if step in snapshot_steps:
            snapshots[step] = best_state if held is not None else state()
        if progress is not None:
            progress(step, p.max_steps, {"loss": losses, "minutes": (time.monotonic() - t0) / 60,
                                         "held_out": held})
        if held is not None and p.patience and since_best >= p.patience:
            stopped = "no gain"
            break
    model.eval()
    if held is not None and step and held["curve"][-1][0] != step:
        m = score_bands(state())
        held["curve"].append((step, m["f1"]))
        if key(m) > key(held["best"]):
            held["best"], held["best_step"], best_state = m, step, state()
    if held is not None:
        model.load_state_dict(best_state)
    if step == 0 and stopped == "time limit":
        raise ParameterError(f"no training step fitted in {p.minutes:g} min (one step takes "
                             f"longer here); give more minutes, or smaller patches "
                             f"(patch {p.patch}) or batches (batch size {p.batch_size})")
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="nbapp-finetune-"))
    folder.mkdir(parents=True, exist_ok=True)
    pt, yml = folder / f"{name}.pt", folder / f"{name}.yaml"
    tmp = folder / f".{name}.pt.part"
    export_model(model.cpu(), tmp, EXPORT_OPTIONS["ctr_smooth"], EXPORT_OPTIONS["ctr_gate"], arch,
                 EXPORT_OPTIONS["sem_smooth"])
    tmp.replace(pt)
    n_obj = sum(int(np.count_nonzero(np.unique(la))) for _, la, _ in slices)
    desc = (f"{name}: fine-tuned by nbapp from {init} on {len(slices)} labelled slice(s) "
            f"({n_obj} objects) at downsampling {p.downsampling}, {step} steps in "
            f"{(time.monotonic() - t0) / 60:.1f} min ({stopped})")
    if held is not None:
        desc += (f"; {held['on']} of {held['slices']} slice(s): F1@0.5 "
                 f"{held['start']['f1']:.3f} at the start, {held['best']['f1']:.3f} kept (step "
                 f"{held['best_step']})")
    desc += "."
    cfg = config_dict(norms, desc, model_file=pt.name)
    works_at = pixel_size_nm * p.downsampling if pixel_size_nm else start["pixel_size_nm"]
    if works_at:
        cfg["pixel_size_nm"] = round(float(works_at), 3)
    write_yaml(cfg, yml)
    tuned = load_model(str(yml), device=dev)
    return FinetuneResult(tuned, yml, step, time.monotonic() - t0, losses, stopped, held,
                          snapshots)


def held_out_text(held: dict | None) -> str:
    """One sentence on what chose the weights of a fine-tune (:attr:`FinetuneResult.held_out`).

    >>> held_out_text({"on": "held-out bands", "slices": 2, "objects": 9, "start": {"f1": 0.5},
    ...                "best": {"f1": 0.5}, "best_step": 0, "curve": [(0, 0.5), (100, 0.4)]})
    'no step beat the starting model (F1@0.5 0.50) on the held-out bands of 2 slice(s) (9 objects, never trained on): it is kept unchanged; proofread more slices (or others) to give it more to learn from'
    """
    if held is None:
        return "the last weights are kept (no held-out band asked for)"
    where = (f"the held-out bands of {held['slices']} slice(s) ({held['objects']} objects, never "
             "trained on)" if held["on"] == "held-out bands" else
             f"the {held['slices']} slice(s) it trained on ({held['objects']} objects; too small "
             "for a held-out band)")
    if held["best_step"] == 0:
        return (f"no step beat the starting model (F1@0.5 {held['start']['f1']:.2f}) on "
                f"{where}: it is kept unchanged; proofread more slices (or others) to give it "
                "more to learn from")
    return (f"on {where} F1@0.5 {held['start']['f1']:.2f} -> {held['best']['f1']:.2f}, the "
            f"weights of step {held['best_step']} kept")


def score_slices(model, images, labels, downsampling=1, params=None, segmenter=None) -> dict:
    """F1@0.5, precision, recall, FG IoU and PQ of ``model`` on labelled 2D slices (counts
    pooled over the slices): the before / after of fine-tuning. ``params``: the
    post-processing to score with (default: the defaults at ``downsampling``)."""
    from nbapp.inference import SliceSegmenter
    from nbapp.metrics import slice_metrics
    from nbapp.params import SliceParams

    seg = segmenter or SliceSegmenter(model)
    params = params if params is not None else SliceParams(downsampling=downsampling)
    m = slice_metrics([seg(im, params) for im in images], [np.asarray(la) for la in labels])
    return {k: float(m[k]) for k in ("f1", "precision", "recall", "fg_iou", "pq")}


#: The post-processing grid a tuned model's thresholds are chosen from (issue 30 item 4).
THRESHOLD_GRID = {"seg_threshold": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                  "center_threshold": (0.05, 0.1, 0.15, 0.2, 0.3)}


def tune_thresholds(model, images, labels, params) -> dict:
    """The segmentation and centre thresholds that score best (F1@0.5, pooled) for ``model`` on
    labelled slices, from :data:`THRESHOLD_GRID` and the current ``params`` (the network runs
    once per slice; every setting reuses its outputs).

    Returns ``{"seg_threshold", "center_threshold", "f1", "current_f1"}``; the current values
    when nothing scores higher.
    """
    from nbapp.inference import SliceSegmenter

    seg = SliceSegmenter(model, cache_size=max(16, len(images)))
    best = {"seg_threshold": params.seg_threshold, "center_threshold": params.center_threshold}
    current = score_slices(model, images, labels, params=params, segmenter=seg)["f1"]
    top = current
    for s in THRESHOLD_GRID["seg_threshold"]:
        for c in THRESHOLD_GRID["center_threshold"]:
            f1 = score_slices(model, images, labels, segmenter=seg,
                              params=params.replace(seg_threshold=s, center_threshold=c))["f1"]
            if f1 > top + 1e-9:
                top, best = f1, {"seg_threshold": s, "center_threshold": c}
    return {**best, "f1": top, "current_f1": current}
