"""The network over an image too large for one forward pass, in tiles (issue 29 item 2).

Every tile sees its core with a halo of context around it; what the network computes from the
WHOLE image is computed once for the whole image and given to every tile:

- the per-image standardisation of nbapp's network (``input_norm``): the mean and standard
  deviation of the whole image's pixels;
- its global context (the average of the deepest features over the whole image): a first pass
  runs the encoder on every tile and averages the cores' features; the second pass runs the
  network with that average in place of each tile's own.

For nbapp's own network (the default model and every model nbapp trains or exports) the halo
covers the receptive field, so the tiled outputs are the whole image's up to float rounding.
Other models (MitoNet's PointRend picks its most uncertain points over the whole image, its
ASPP pools over all of it) cannot be split exactly from outside: their tiles overlap and are
blended with a linear window, which hides the seams but leaves outputs that differ slightly
from the whole image's. ``TiledOutputs.exact`` says which one a result is.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import torch

from nbapp.models.arch import INPUT_NORM_MIN_STD, NBMitoNet, from_export, fuse_batchnorm
from nbapp.models.loader import Model
from nbapp.tiles import tile_grid, tile_window

__all__ = ["EXACT_HALO", "BLEND_HALO", "TiledOutputs", "exact_network", "tiled_forward"]

#: Halo (model-input pixels) for nbapp's network: input farther than this changes an output by
#: less than float rounding (1e-8 of its gradient, 384 px: 1e-5; measured by the gradient of
#: a centre output over a 2048 x 2048 input, the receptive field ends between 512 and 768 px).
EXACT_HALO = 512
#: Halo (and half the overlap) of blended tiles for other models.
BLEND_HALO = 128
#: The stride of nbapp's deepest features, whose average is the global context.
_CONTEXT_STRIDE = 32


@dataclass
class TiledOutputs:
    """The network's outputs over the whole padded input, as numpy arrays: ``sem_logits``
    (C, H * s, W * s), ``ctr_hmp`` (1, h, w) and ``offsets`` (2, h, w) on the grouping grid;
    ``tiles`` how many tiles ran, ``exact`` whether they equal the untiled outputs (up to
    float rounding) or were blended."""

    sem_logits: np.ndarray
    ctr_hmp: np.ndarray
    offsets: np.ndarray
    tiles: int
    exact: bool


def exact_network(model: Model) -> NBMitoNet | None:
    """An eager copy of ``model``'s network that tiles exactly (batch norms folded, its own
    standardisation off: the caller standardises with the whole image's statistics), or None
    for a model that is not nbapp's network."""
    module = model.module
    try:
        # fuse_batchnorm copies: the model's own module is never changed
        net = fuse_batchnorm(module if isinstance(module, NBMitoNet) else from_export(module)[0])
    except (ValueError, RuntimeError, AttributeError, KeyError):
        return None
    standardises = bool(getattr(module, "input_norm", False))
    net.input_norm = False
    net.standardises = standardises  # remembered for the caller
    return net.to(model.device).eval()


def _standardiser(x: np.ndarray, on: bool) -> Callable[[np.ndarray], torch.Tensor]:
    """A function from a piece of the padded input to the network's tensor: the whole image's
    standardisation applied (as :func:`nbapp.models.arch.standardise` does to the whole image:
    mean and deviation of the non-zero pixels, padding kept at 0) when ``on``."""
    if not on:
        return lambda piece: torch.from_numpy(np.ascontiguousarray(piece))
    count = total = squares = 0.0
    for start in range(0, x.shape[0], 1024):  # rows at a time: no image-sized temporaries
        rows = x[start : start + 1024].astype(np.float64)
        real = rows != 0
        count += float(real.sum())
        total += float(rows.sum())  # padding adds 0
    mean = total / max(count, 1.0)
    for start in range(0, x.shape[0], 1024):
        rows = x[start : start + 1024].astype(np.float64)
        squares += float((((rows - mean) * (rows != 0)) ** 2).sum())
    std = max((squares / max(count, 1.0)) ** 0.5, INPUT_NORM_MIN_STD)
    m, s = np.float32(mean), np.float32(std)

    def prep(piece: np.ndarray) -> torch.Tensor:
        p = np.ascontiguousarray(piece, np.float32)
        return torch.from_numpy(np.where(p != 0, (p - m) / s, np.float32(0)).astype(np.float32))

    return prep


def _encode(net: NBMitoNet, x: torch.Tensor) -> torch.Tensor:
    """The deepest features of nbapp's network (what its context pools)."""
    f = net.stem(x)
    for stage in net.stages:
        f = stage(f)
    return f


def tiled_forward(model: Model, x: np.ndarray, render_steps: int, interpolate_ins: bool,
                  core: int, halo: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> TiledOutputs:
    """The network's outputs for one padded, normalised model input ``x`` (H, W) float32
    (sides multiples of the padding factor and of 4), computed tile by tile.

    ``core`` is the side of each tile's core (a multiple of the padding factor); ``halo`` the
    context around it (default :data:`EXACT_HALO` for nbapp's network, :data:`BLEND_HALO` for
    others). ``progress(done, total)`` is called after each forward pass.
    """
    pf = model.config.padding_factor
    net = exact_network(model)
    exact = net is not None
    if halo is None:
        halo = EXACT_HALO if exact else BLEND_HALO
    align = max(pf, _CONTEXT_STRIDE) if exact else pf
    grid = tile_grid(x.shape, core, -(-halo // align) * align, align)
    total = len(grid) * (2 if exact and len(grid) > 1 else 1)
    done = 0
    dev = model.device

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    prep = _standardiser(x, exact and net.standardises)
    hook = None
    if exact and len(grid) > 1:
        # pass 1: the whole image's average of the deepest features
        acc = None
        with torch.inference_mode():
            for t in grid:
                y0, y1, x0, x1 = t.box
                f = _encode(net, prep(x[y0:y1, x0:x1])[None, None].to(dev))
                cy0, cy1, cx0, cx1 = t.scaled(Fraction(1, _CONTEXT_STRIDE)).inner
                part = f[0, :, cy0:cy1, cx0:cx1].double().sum(dim=(1, 2))
                acc = part if acc is None else acc + part
                tick()
        cells = (x.shape[0] // _CONTEXT_STRIDE) * (x.shape[1] // _CONTEXT_STRIDE)
        pooled = (acc / cells).float()[None, :, None, None]
        hook = net.context[0].register_forward_hook(lambda mod, args, out: pooled.expand_as(out))
    run = net if exact else model
    outs: dict = {}
    weights: dict = {}
    try:
        with torch.inference_mode():
            for t in grid:
                y0, y1, x0, x1 = t.box
                piece = prep(x[y0:y1, x0:x1])[None, None].to(dev)
                res = run(piece, render_steps, interpolate_ins)
                for key in ("sem_logits", "ctr_hmp", "offsets"):
                    out = res[key][0].float()
                    scale = out.shape[-1] / (x1 - x0)
                    if key not in outs:
                        shape = (out.shape[0], round(x.shape[0] * scale), round(x.shape[1] * scale))
                        outs[key] = np.zeros(shape, np.float32)
                        if not exact:
                            weights[key] = np.zeros(shape[1:], np.float32)
                    st = t.scaled(scale)
                    if exact:
                        iy0, iy1, ix0, ix1 = st.inner
                        cy0, cy1, cx0, cx1 = st.core
                        outs[key][:, cy0:cy1, cx0:cx1] = out[:, iy0:iy1, ix0:ix1].cpu().numpy()
                    else:
                        by0, by1, bx0, bx1 = st.box
                        w = tile_window(st)
                        outs[key][:, by0:by1, bx0:bx1] += out.cpu().numpy() * w
                        weights[key][by0:by1, bx0:bx1] += w
                tick()
    finally:
        if hook is not None:
            hook.remove()
    for key, w in weights.items():
        outs[key] /= w
    return TiledOutputs(outs["sem_logits"], outs["ctr_hmp"], outs["offsets"], len(grid), exact)
