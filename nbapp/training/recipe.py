"""The training recipe: :func:`run` reads the data, builds (or resumes, or fine-tunes) the
model and trains it on augmented patches with periodic validation and exports.

Loss: binary cross-entropy on the hardest pixels plus a soft Dice term (semantic), MSE on the
centre heat-map (weight 200), L1 on the offsets of foreground pixels (weight 0.01), the two 1/4
heads being upsampled x4 to the targets' resolution. AdamW with a warm-up then cosine schedule.

Outputs in ``out``: ``last.pth`` (resumable), ``best.pth`` (best validation score; state
dict + architecture hyper-parameters + normalisation, loadable with
``torch.load(..., weights_only=True)``), ``nbapp_mito.pt`` (TorchScript, batch norm folded),
``nbapp_mito.yaml`` (empanada-format config) and ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nbapp.errors import InputError, ParameterError
from nbapp.models.arch import ARCH_DEFAULTS, PADDING_FACTOR, build_model, count_parameters, \
    recalibrate_batchnorm
from nbapp.training.data import (AugmentConfig, PatchSampler, batch_stream, compute_norms,
                                 read_volume, to_unit_range)
from nbapp.training.evaluate import evaluate
from nbapp.training.export import config_dict, export_model, write_yaml
from nbapp.training.loss import panoptic_loss
from nbapp.training.params import TrainParams
from nbapp.training.start import load_init

__all__ = ["run"]


def run(params: TrainParams) -> int:
    """Train as ``params`` says (an ``argparse.Namespace`` of the command line is accepted
    too); return a process exit code."""
    p = params if isinstance(params, TrainParams) else TrainParams.from_args(params)
    t_start = time.monotonic()
    if p.threads:
        torch.set_num_threads(p.threads)
    from nbapp.models import resolve_device

    device = resolve_device(p.device)
    data = _Data(p)
    job = _Training(p, device, data, t_start)
    job.loop()
    return 0


class _Data:
    """The volume and its labels in [0, 1] / int32, split into training and held-out slices,
    and the training part's intensity norms."""

    def __init__(self, p: TrainParams):
        raw, labels = read_volume(p.raw), read_volume(p.labels)
        if raw.shape != labels.shape:
            raise InputError(f"raw {raw.shape} and labels {labels.shape} differ in shape")
        if not 0 < p.val_slices < raw.shape[0]:
            raise ParameterError(f"--val-slices must be in (0, {raw.shape[0]}), got "
                                 f"{p.val_slices}")
        self.out = Path(p.out)
        self.out.mkdir(parents=True, exist_ok=True)
        unit, _ = to_unit_range(raw)
        labels = labels.astype(np.int32)
        self.split = split = raw.shape[0] - p.val_slices
        self.train_unit, self.train_lab = unit[:split], labels[:split]
        self.val_unit, self.val_lab = unit[split:], labels[split:]
        self.norms = compute_norms(self.train_unit)


class _Training:
    """One run: the model (new, resumed or from ``init``), its optimiser, the patch sampler,
    the validation history; :meth:`loop` trains until the steps or the time are used up."""

    def __init__(self, p: TrainParams, device, data: _Data, t_start: float):
        self.p, self.device, self.data, self.t_start = p, device, data, t_start
        norms = data.norms
        torch.manual_seed(p.seed)
        self.rng = rng = np.random.default_rng(p.seed)
        requested = dict(p.arch or {})
        arch = {**ARCH_DEFAULTS, **requested}
        ck = torch.load(p.resume, map_location=device, weights_only=True) if p.resume else None
        init = load_init(p.init) if p.init and not p.resume else None
        if ck is not None:
            arch = {**ARCH_DEFAULTS, **ck["arch"]}
        elif init is not None:  # the checkpoint's architecture, weight-free options from arch
            arch = {**ARCH_DEFAULTS, **init["arch"], **requested}
        self.arch = arch
        self.model = model = build_model(**arch).to(device)
        if init is not None:
            try:
                model.load_state_dict(init["state_dict"])
            except RuntimeError as exc:
                raise ParameterError(
                    f"--init {p.init}: its weights do not fit the architecture {arch}; with "
                    f"--init, --arch may only change weight-free options (input_norm, "
                    f"ctr_smooth, ctr_gate, sem_smooth, offset_scale). "
                    f"{str(exc).splitlines()[0]}") from None
            norms = dict(init["norms"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        self.step, self.best, self.history, self.minutes_before = 0, -1.0, [], 0.0
        if ck is not None:
            model.load_state_dict(ck["state_dict"])
            self.opt.load_state_dict(ck["optimizer"])
            self.step, self.best = int(ck["step"]), float(ck["best"])
            self.history = list(ck["history"])
            rng.bit_generator.state = json.loads(ck["numpy_rng"])
            torch.set_rng_state(ck["torch_rng"].cpu())
            norms = dict(ck["norms"])
            self.minutes_before = float(ck["minutes"])
        self.norms = norms
        aug = AugmentConfig(pad_p=p.pad_p, zoom_out_hi=p.zoom_out_max, zoom_out_p=p.zoom_out_p,
                            scale_lo=1.0 / p.zoom_in_max, shading_p=p.shading_p,
                            object_p=p.object_contrast_p, synthetic_p=p.synthetic_p,
                            hard_negatives_p=p.hard_negatives_p, fit=p.fit_patches,
                            gamma=tuple(p.gamma))
        self.sampler = PatchSampler(data.train_unit, data.train_lab, p.patch, rng, sigma=p.sigma,
                                    aug=aug, planes=p.planes)
        if init is not None and init["recalibrate"]:  # an export: real batch-norm statistics
            cal = self.sampler.with_rng(np.random.default_rng([p.seed, 1]))
            seen = recalibrate_batchnorm(model, (cal.batch(p.batch_size, norms)["image"].to(device)
                                                 for _ in range(max(1, 32 // p.batch_size))))
            print(f"nbapp.train: from the exported model {p.init}; batch norm recalibrated on "
                  f"{seen} training patches", flush=True)
        self.n_params = count_parameters(model)
        print(f"nbapp.train: {self.n_params} parameters, norms {norms}, train z < {data.split}, "
              f"{p.steps} steps of {p.batch_size}x{p.patch}^2 on {device}", flush=True)

    def elapsed(self) -> float:
        """Minutes of training, those before a resume included."""
        return self.minutes_before + (time.monotonic() - self.t_start) / 60

    def checkpoint(self, path: Path, with_opt: bool, metrics: dict | None = None) -> None:
        ck = {"state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
              "arch": dict(self.arch), "norms": self.norms,
              "step": self.step, "best": self.best, "history": self.history,
              "metrics": metrics or {}, "minutes": self.elapsed(),
              "padding_factor": PADDING_FACTOR}
        if with_opt:
            ck.update(optimizer=self.opt.state_dict(),
                      numpy_rng=json.dumps(self.rng.bit_generator.state),
                      torch_rng=torch.get_rng_state())
        tmp = path.with_suffix(".tmp")
        torch.save(ck, tmp)
        tmp.replace(path)

    def validate(self) -> None:
        """Score the held-out slices; at a new best, write best.pth and the export."""
        p, out = self.p, self.data.out
        m = evaluate(self.model, self.data.val_unit, self.data.val_lab, self.norms, self.device,
                     p.val_stride)
        m["step"] = self.step
        m["minutes"] = round(self.elapsed(), 2)
        self.history.append(m)
        msg = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in m.items())
        print(f"val {msg}", flush=True)
        if _score(m) > self.best:
            self.best = _score(m)
            self.checkpoint(out / "best.pth", False, m)
            export_model(self.model, out / "nbapp_mito.pt", p.export_ctr_smooth,
                         p.export_ctr_gate, self.arch, p.export_sem_smooth)
            origin = f", fine-tuned from {p.init}" if p.init else ""
            desc = (f"nbapp mitochondria model (NBMitoNet, {self.n_params} parameters), trained "
                    f"on {Path(p.raw).name}{origin}.\nValidation (held-out block) at step "
                    f"{self.step}: "
                    f"FG IoU {m['fg_iou']:.3f}, F1@0.5 {m['f1@0.5']:.3f}.\n")
            write_yaml(config_dict(self.norms, desc), out / "nbapp_mito.yaml")
        (out / "metrics.json").write_text(json.dumps(self.history, indent=1))

    def loop(self) -> None:
        """Train until ``steps`` (or the time limit, or ``stop_after``), validating every
        ``val_every`` steps and saving ``last.pth`` every ``save_minutes``."""
        p, model, opt = self.p, self.model, self.opt
        bar = _progress_bar(p, self.step)
        model.train()
        last_save = time.monotonic()
        limit = p.time_limit if p.time_limit is not None else math.inf
        stop_at = (time.monotonic() + 60 * p.stop_after if p.stop_after is not None
                   else math.inf)
        batches = batch_stream(self.sampler, p, self.norms, self.step)
        ema: dict = {}
        stopped_early = False
        while self.step < p.steps:
            if self.elapsed() >= limit or time.monotonic() >= stop_at:
                stopped_early = True
                break
            for g in opt.param_groups:
                g["lr"] = p.lr * _lr_factor(max(self.step / p.steps, self.elapsed() / limit),
                                            p.warmup)
            b = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            out = model(b["image"], 2, False)
            loss, parts = panoptic_loss(out, b, w_ctr=p.w_ctr, w_off=p.w_off)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            self.step += 1
            for k, v in {"loss": loss.item(), **parts}.items():
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            if bar is not None:
                bar.update(1)
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in ema.items()},
                                 "best": f"{self.best:.3f}"}, refresh=False)
            elif self.step % 50 == 0:
                print(f"step {self.step} " + " ".join(f"{k}={v:.4f}" for k, v in ema.items()),
                      flush=True)
            if self.step % p.val_every == 0:
                self.validate()
            if time.monotonic() - last_save > 60 * p.save_minutes:
                self.checkpoint(self.data.out / "last.pth", True)
                last_save = time.monotonic()
        batches.close()
        if bar is not None:
            bar.close()
        if not self.history or self.history[-1]["step"] != self.step:
            self.validate()
        self.checkpoint(self.data.out / "last.pth", True)
        minutes = self.elapsed()
        reason = ("stopped (--stop-after), resume with --resume last.pth"
                  if stopped_early and minutes < limit else
                  "time limit" if stopped_early else "done")
        print(f"nbapp.train: {reason} at step {self.step} after {minutes:.1f} min; best score "
              f"{self.best:.4f}; outputs in {self.data.out}", flush=True)


def _progress_bar(p: TrainParams, step: int):
    if not p.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=p.steps, initial=step, dynamic_ncols=True, file=sys.stdout, mininterval=5)


def _lr_factor(progress: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 1 %."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


def _score(m: dict) -> float:
    return 0.5 * (m["fg_iou"] + m["f1@0.5"])


