"""The engine: the only place that runs the network (SPEC.md section 2, steps 1-3).

numpy images in, :class:`~nbapp.heads.Heads` out. It resizes with anti-aliasing, normalises
with the config's norms, pads to the padding factor, batches, runs the model under
``torch.inference_mode()`` on one device and crops the outputs back.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from nbapp.errors import InputError, ParameterError
from nbapp.heads import Heads
from nbapp.intensity import check_image_values, intensity_range, to_unit
from nbapp.models.loader import Model, load_model
from nbapp.params import DOWNSAMPLING_FACTORS
from nbapp.tiled import EXACT_HALO

__all__ = ["Engine", "FORWARD_BYTES_PER_PIXEL", "HEADS_BYTES_PER_PIXEL", "MAX_UNTILED_PIXELS",
           "TILED_BYTES_PER_PIXEL"]

#: CPU memory one forward pass of nbapp's default model needs, per pixel of the model input:
#: bench/bench_memory.py measures 110-142 B for 512x512 to 2048x2048 inputs, with or without
#: fine boundaries; larger models (MitoNet_v1) need more, so for them the check is a floor.
FORWARD_BYTES_PER_PIXEL = 120
#: What each image keeps per pixel of the full-resolution image: the heads resized back
#: (semantic, centre and two offset maps, float32) and the float input.
HEADS_BYTES_PER_PIXEL = 20
#: What a tiled image needs per pixel of the full-resolution image besides its tile: the
#: semantic map (float32) and the float image before downsampling (bench/bench_tiles.py).
TILED_BYTES_PER_PIXEL = 12
#: On a GPU, images of more model-input pixels than this run in tiles.
MAX_UNTILED_PIXELS = 8192 * 8192
#: The smallest image side (after downsampling) given to a model whose padding factor is larger:
#: such images are zero-padded (NucleoNet's factor is 512, a CEM crop is 224 px).
MIN_SIDE = 32


def resize_for_model(x: torch.Tensor, downsampling) -> torch.Tensor:
    """An (N, C, H, W) image as the model sees it at ``downsampling``: reduced to
    ceil(H / downsampling) x ceil(W / downsampling) with anti-aliasing, or enlarged below 1
    (bilinear). Fine-tuning resizes its slices with it too."""
    if downsampling == 1:
        return x
    h, w = x.shape[-2:]
    size = (math.ceil(h / downsampling), math.ceil(w / downsampling))
    return F.interpolate(x, size=size, mode="bilinear", antialias=downsampling > 1,
                         align_corners=False)


class Engine:
    """Runs a loaded model on batches of 2D images.

    Parameters
    ----------
    model : Model, str or torch.nn.Module
        Anything :func:`nbapp.load_model` accepts; loaded (and warmed up) once, here.
    device : str, optional
        Device for the model when ``model`` is not already a loaded :class:`Model`.
    batch_size : int
        Images per forward pass.
    tile : int, optional
        None: images too large for one forward pass run in tiles (:meth:`tile_core`); 0: never
        tile; a number: always tile, with cores of that many model-input pixels.

    Examples
    --------
    >>> engine = Engine("default", device="cpu")              # doctest: +SKIP
    >>> heads = engine.infer(image, downsampling=2)[0]       # doctest: +SKIP
    """

    def __init__(self, model="default", device=None, batch_size: int = 4, tile: int | None = None):
        self.model = model if isinstance(model, Model) and device is None else load_model(model, device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ParameterError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 0):
            raise ParameterError(f"tile must be None (tile only what does not fit), 0 (never) or "
                                 f"a tile side in pixels, got {tile!r}")
        self.tile = tile
        #: called with (tiles done, tiles in all) while an image runs in tiles
        self.tile_progress = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def input_shape(self, shape: tuple, downsampling: int) -> tuple[int, int]:
        """(H, W) of the model input (before padding) for an image of ``shape``."""
        return math.ceil(shape[0] / downsampling), math.ceil(shape[1] / downsampling)

    def check_image(self, images: np.ndarray, downsampling: int = 1) -> np.ndarray:
        """Validate a (H, W) image or (N, H, W) stack; return it as (N, H, W)."""
        arr = np.asarray(images)
        if arr.ndim not in (2, 3):
            raise InputError(f"expected a 2D image (H, W) or a stack (N, H, W), got shape {arr.shape}")
        check_image_values(arr)
        if arr.ndim == 2:
            arr = arr[None]
        self.check_size(arr.shape[1:], downsampling)
        return arr

    @property
    def min_side(self) -> int:
        """The smallest image side (after downsampling) the model is given: its padding factor,
        at most :data:`MIN_SIDE` (smaller inputs are zero-padded up to the padding factor)."""
        return min(self.model.config.padding_factor, MIN_SIDE)

    def check_size(self, shape: tuple, downsampling: int = 1, what: str = "image") -> None:
        """Raise :class:`InputError` if (H, W) images are too small for the model.

        ``what`` names the image in the message ("image", "xz slice", ...).
        """
        if downsampling not in DOWNSAMPLING_FACTORS:
            raise ParameterError(f"downsampling must be one of {DOWNSAMPLING_FACTORS}, got {downsampling!r}")
        hd, wd = self.input_shape(shape, downsampling)
        pf, limit = self.model.config.padding_factor, self.min_side
        if min(hd, wd) < limit:
            raise InputError(
                f"{what} of {shape[0]}x{shape[1]} pixels is too small: after downsampling by "
                f"{downsampling} it is {hd}x{wd}, smaller than the {limit} px the model needs "
                f"(padding factor {pf}); use a larger image or less downsampling"
            )

    def memory_needed(self, shape: tuple, count: int, downsampling: int = 1) -> int:
        """Bytes of CPU memory :meth:`infer` needs for ``count`` (H, W) images (0 on a GPU,
        whose own allocator raises a clean out-of-memory error)."""
        if self.device.type != "cpu":
            return 0
        hd, wd = self.input_shape(shape, downsampling)
        return int(min(count, self.batch_size) * hd * wd * FORWARD_BYTES_PER_PIXEL
                   + count * shape[0] * shape[1] * HEADS_BYTES_PER_PIXEL)

    def check_memory(self, shape: tuple, count: int, downsampling: int = 1,
                     what: str = "image") -> None:
        """Raise :class:`nbapp.memory.OutOfMemory` before running the network on ``count``
        images of ``shape`` when it would not fit, naming the smallest Image Downsampling that
        would."""
        from nbapp.memory import check_fits, format_bytes

        need = self.memory_needed(shape, count, downsampling)
        if need == 0:
            return

        def hint(allowed: float) -> str:
            fits = [d for d in DOWNSAMPLING_FACTORS if d > downsampling
                    and self.memory_needed(shape, count, d) <= allowed
                    and min(self.input_shape(shape, d)) >= self.min_side]
            return (f"use Image Downsampling {fits[0]} (needs "
                    f"{format_bytes(self.memory_needed(shape, count, fits[0]))})"
                    if fits else "use a smaller image or crop")

        check_fits(need, f"{what} of {shape[0]}x{shape[1]} at downsampling {downsampling}", hint)

    def tile_core(self, shape: tuple, count: int = 1, downsampling=1) -> int | None:
        """The core side (model-input pixels) of the tiles :meth:`infer` cuts ``count`` (H, W)
        images into, or None when the whole image runs at once.

        ``self.tile`` decides: 0 never tiles, a number is the core side, None (default) tiles
        only what would not fit: on the CPU an image whose forward pass needs more than half of
        the memory left, on a GPU one of more than :data:`MAX_UNTILED_PIXELS` model-input
        pixels. The core is then the largest multiple of 512 whose tile with its halo needs at
        most a quarter of the memory left (at least 512).
        """
        if self.tile == 0:
            return None
        hd, wd = self.input_shape(shape, downsampling)
        align = max(self.model.config.padding_factor, 32)
        if self.tile is not None:
            return max(align, -(-int(self.tile) // align) * align)
        from nbapp.memory import available_bytes

        room = available_bytes()
        if self.device.type == "cpu":
            if self.memory_needed(shape, min(count, self.batch_size), downsampling) <= room / 2:
                return None
        elif hd * wd <= MAX_UNTILED_PIXELS:
            return None
        halo = 2 * EXACT_HALO
        core = 512
        while (core + 512 + halo) ** 2 * FORWARD_BYTES_PER_PIXEL <= room / 4 and core < 8192:
            core += 512
        if (self.device.type == "cpu" and self.tiled_memory_needed(shape, core, downsampling)
                >= self.memory_needed(shape, 1, downsampling)):
            return None  # a small image: tiles with their halos would need more, not less
        return core

    def infer(self, images: np.ndarray, downsampling: int = 1, fine_boundaries: bool = False,
              intensity: tuple | None = None) -> list[Heads]:
        """Network outputs for each image of a (H, W) image or an (N, H, W) stack.

        Images too large for one forward pass run in tiles (:meth:`tile_core`,
        :mod:`nbapp.tiled`): for nbapp's own network the outputs are the whole image's up to
        float rounding; ``meta["tiles"]`` says how many tiles ran and ``meta["tiled_exact"]``
        whether they were exact or blended.

        Parameters
        ----------
        images : (H, W) or (N, H, W) array
            Grey-level images (any integer or float dtype).
        downsampling : int or float
            Reduce the image by this factor before the model (1, 2, 4, ..., 64), or enlarge it
            (0.5: 2x, 0.25: 4x) for data with pixels coarser than the model's.
        fine_boundaries : bool
            Ask the model for centre and offset maps at full input resolution.
        intensity : (lo, hi) or (lo, hi, note), optional
            Grey values mapped to 0 and 1. Default: :func:`nbapp.intensity.intensity_range`
            of all the given images together (pass one range for all slices of a volume).
        """
        arr = self.check_image(images, downsampling)
        # enlarged (downsampling < 1): the coarse grid is already finer than the image
        fine = fine_boundaries and downsampling >= 1
        core = self.tile_core(arr.shape[1:], arr.shape[0], downsampling)
        what = "image" if arr.shape[0] == 1 else f"{arr.shape[0]} images"
        if core is None:
            self.check_memory(arr.shape[1:], arr.shape[0], downsampling, what)
        else:
            self.check_tiled_memory(arr.shape[1:], core, downsampling, what)
        if intensity is None:
            intensity = intensity_range(arr)
        lo, hi = float(intensity[0]), float(intensity[1])
        note = intensity[2] if len(intensity) > 2 else f"given range {lo:g}-{hi:g}"
        out: list[Heads] = []
        step = self.batch_size if core is None else 1
        for start in range(0, arr.shape[0], step):
            t0 = time.perf_counter()
            extra: dict = {}
            if core is None:
                batch = self._forward(arr[start : start + step], lo, hi, downsampling, fine)
            else:
                batch, extra = self._forward_tiled(arr[start], lo, hi, downsampling, fine, core)
            per_image = (time.perf_counter() - t0) / len(batch)
            for sem, ctr, off in batch:
                meta = {"intensity": note, "intensity_range": (lo, hi), "network_s": per_image,
                        "model": self.model.config.name, "device": str(self.device), **extra}
                out.append(Heads(sem, ctr, off, downsampling, 1 if fine else 4, meta))
        return out

    def tiled_memory_needed(self, shape: tuple, core: int, downsampling=1) -> int:
        """Bytes of CPU memory a tiled :meth:`infer` of one (H, W) image needs (0 on a GPU)."""
        if self.device.type != "cpu":
            return 0
        hd, wd = self.input_shape(shape, downsampling)
        side = core + 2 * EXACT_HALO
        tile = min(side, hd + 64) * min(side, wd + 64) * FORWARD_BYTES_PER_PIXEL
        return int(tile + shape[0] * shape[1] * TILED_BYTES_PER_PIXEL + hd * wd * 4)

    def check_tiled_memory(self, shape: tuple, core: int, downsampling=1,
                           what: str = "image") -> None:
        """:meth:`check_memory` for a tiled :meth:`infer`."""
        from nbapp.memory import check_fits

        need = self.tiled_memory_needed(shape, core, downsampling)
        if not need:
            return

        def hint(allowed: float) -> str:
            fits = [d for d in DOWNSAMPLING_FACTORS if d > downsampling
                    and min(self.input_shape(shape, d)) >= self.min_side
                    and min(self.tiled_memory_needed(shape, core, d),
                            self.memory_needed(shape, 1, d)) <= allowed]
            return f"use Image Downsampling {fits[0]}" if fits else "use a smaller image or crop"

        check_fits(need, f"{what} of {shape[0]}x{shape[1]} at downsampling {downsampling} "
                   f"in tiles of {core} px", hint)

    def _padded(self, side: int) -> int:
        """A model-input side padded to the padding factor (and the 1/4 grid)."""
        multiple = math.lcm(self.model.config.padding_factor, 4)
        return -(-side // multiple) * multiple

    def _model_input(self, batch: np.ndarray, lo: float, hi: float, ds) -> tuple:
        """``(x, hd, wd)``: the normalised, zero-padded (N, 1, Hp, Wp) model input on the
        device and the (hd, wd) of the image in it."""
        cfg = self.model.config
        hd, wd = self.input_shape(batch.shape[1:], ds)
        hp, wp = self._padded(hd), self._padded(wd)
        mean, std = cfg.norms
        dev = self.device
        x = torch.from_numpy(to_unit(batch, lo, hi))[:, None]
        x = x.to(dev) if dev.type != "mps" or ds == 1 else x
        if ds != 1:
            x = resize_for_model(x, ds).to(dev)
        x = (x - mean) / std
        return F.pad(x, (0, wp - wd, 0, hp - hd)), hd, wd

    def _forward(self, batch: np.ndarray, lo: float, hi: float, ds, fine: bool) -> list:
        with torch.inference_mode():
            x, hd, wd = self._model_input(batch, lo, hi, ds)
            res = self.model(x, render_steps=2 + max(0, int(math.log2(ds))), interpolate_ins=fine)
            return self._outputs(res["sem_logits"], res["ctr_hmp"], res["offsets"],
                                 batch.shape[1:], hd, wd, ds, fine)

    def _forward_tiled(self, image: np.ndarray, lo: float, hi: float, ds, fine: bool,
                       core: int) -> tuple[list, dict]:
        from nbapp.tiled import tiled_forward

        with torch.inference_mode():
            x, hd, wd = self._model_input(image[None], lo, hi, ds)
            x = x[0, 0].cpu().numpy()
        tiled = tiled_forward(self.model, x, 2 + max(0, int(math.log2(ds))), fine, core,
                              progress=self.tile_progress)
        del x
        with torch.inference_mode():
            out = self._outputs(*(torch.from_numpy(a)[None] for a in
                                  (tiled.sem_logits, tiled.ctr_hmp, tiled.offsets)),
                                image.shape, hd, wd, ds, fine, inplace=True)
        return out, {"tiles": tiled.tiles, "tiled_exact": tiled.exact, "tile_core": core}

    def _outputs(self, logits, ctr, off, shape: tuple, hd: int, wd: int, ds, fine: bool,
                 inplace: bool = False) -> list:
        """Numpy (sem probabilities, centre heat-map, offsets) of each image, cropped to it;
        ``inplace``: the logits are the caller's own buffer, the sigmoid may overwrite them."""
        hgt, wid = shape
        logits = logits.float()
        s = logits.shape[-2] // self._padded(hd)
        logits = logits[..., : hd * s, : wd * s]
        if logits.shape[1] == 1:
            prob = logits.sigmoid_() if inplace else torch.sigmoid(logits)
        else:
            prob = torch.softmax(logits, dim=1)
        if (hd * s, wd * s) != (hgt, wid):
            if s == ds:
                prob = prob[..., :hgt, :wid]
            else:
                prob = F.interpolate(prob, size=(hgt, wid), mode="bilinear",
                                     antialias=hd * s > hgt, align_corners=False)
        g = 1 if fine else 4
        gh, gw = -(-hd // g), -(-wd // g)
        ctr = ctr[:, 0, :gh, :gw].float()
        off = off[:, :, :gh, :gw].float()
        prob, ctr, off = (t.cpu().numpy() for t in (prob, ctr, off))
        n = prob.shape[0]
        if n == 1:  # no batch buffer to let go of: keep the arrays (a huge slice's are large)
            return [(np.ascontiguousarray(prob[0]), np.ascontiguousarray(ctr[0]),
                     np.ascontiguousarray(off[0]))]
        return [(np.array(prob[i]), np.array(ctr[i]), np.array(off[i])) for i in range(n)]
