"""2D inference with cached network outputs: the engine once, post-processing live.

:class:`SliceSegmenter` keeps the network outputs of recent images keyed by (image content,
slice key, downsampling, fine_boundaries, intensity range, model); a call that only changes
thresholds, min_distance, label_divisor, semantic_only or fill_holes re-runs post-processing
only (SPEC "Live re-inference").
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

import numpy as np

from nbapp.engine import Engine
from nbapp.errors import InputError, ParameterError
from nbapp.heads import Heads
from nbapp.intensity import intensity_range, to_unit
from nbapp.params import SliceParams
from nbapp.postprocess import count_objects, segment_heads

__all__ = ["SliceSegmenter", "segment_image"]


def _digest(image: np.ndarray) -> str:
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays have the same shape, dtype and bytes (NaN and -0.0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


class SliceSegmenter:
    """Segment 2D images; re-tuning post-processing parameters does not re-run the network.

    Parameters
    ----------
    model : str, Model or torch.nn.Module
        What :func:`nbapp.load_model` accepts (default: the shipped model). Loaded once.
    device : str, optional
        ``cpu``, ``cuda:N`` or ``mps``; default: first GPU, else CPU.
    cache_size : int
        How many images' network outputs to keep (least recently used are dropped).
    cache_bytes : int
        At most this many bytes of network outputs are kept, the newest image's always (a
        20,000 x 20,000 px slice's outputs alone take 8 GB).
    tile : int, optional
        The engine's tiling (:class:`nbapp.engine.Engine`): None tiles only images too large
        for one forward pass.

    Attributes
    ----------
    timings : dict
        After each call: ``network_s`` (0 when cached), ``postprocess_s``, ``cached``.
    info : dict
        After each call: model name, parameters, intensity handling, instance count, timings.

    Examples
    --------
    >>> seg = SliceSegmenter("default")                                   # doctest: +SKIP
    >>> labels = seg(image, SliceParams(seg_threshold=0.4))               # doctest: +SKIP
    >>> labels = seg(image, SliceParams(seg_threshold=0.6))  # no network  # doctest: +SKIP
    """

    def __init__(self, model="default", device=None, cache_size: int = 16, batch_size: int = 4,
                 cache_bytes: int = 2 << 30, tile: int | None = None):
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ParameterError(f"cache_size must be a positive integer, got {cache_size!r}")
        if not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ParameterError(f"cache_bytes must be a whole number of bytes, got {cache_bytes!r}")
        self.engine = Engine(model, device=device, batch_size=batch_size, tile=tile)
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._last: tuple | None = None  # (copy of the last image hashed, its digest)
        self.hits = 0
        self.misses = 0
        self.timings: dict = {}
        self.info: dict = {}

    @property
    def model(self):
        return self.engine.model

    def heads(self, image: np.ndarray, params: SliceParams | None = None, key=None,
              intensity: tuple | None = None) -> Heads:
        """Network outputs of ``image`` (from the cache when the same image was seen).

        ``key`` names the slice (e.g. ``("xy", 12)``) so that the app can tell slices apart
        cheaply; the image content is always part of the cache key too.
        """
        params = params or SliceParams()
        image = np.asarray(image)
        if image.ndim != 2:
            raise InputError(f"expected a 2D image (H, W), got shape {image.shape}; "
                             "use segment_batch for a stack of 2D images")
        rng = None if intensity is None else tuple(intensity[:2])
        ck = (self._digest(image), key, params.network_key, rng, id(self.engine.model))
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                self.hits += 1
                self.timings = {"network_s": 0.0, "cached": True}
                return hit
        heads = self.engine.infer(image, params.downsampling, params.fine_boundaries, intensity)[0]
        with self._lock:
            self.misses += 1
            self._cache[ck] = heads
            held = sum(h.nbytes for h in self._cache.values())
            while len(self._cache) > self.cache_size or (held > self.cache_bytes
                                                         and len(self._cache) > 1):
                held -= self._cache.popitem(last=False)[1].nbytes
            self.timings = {"network_s": heads.meta["network_s"], "cached": False}
        return heads

    def _digest(self, image: np.ndarray) -> str:
        """Content digest of ``image``. Slider changes send the same image again and again:
        comparing it with a copy of the last one is ~20x cheaper than hashing it."""
        last = self._last
        if last is not None and _same_bytes(last[0], image):
            return last[1]
        digest = _digest(image)
        self._last = (image.copy(), digest)
        return digest

    def postprocess(self, heads: Heads, params: SliceParams, return_centres: bool = False):
        """Post-processing only (steps 4-10) for ``heads``; with ``return_centres`` also the
        detected centres, ``(labels, centres)``."""
        return segment_heads(heads, params, self.engine.model.config.thing_list, return_centres)

    def __call__(self, image: np.ndarray, params: SliceParams | None = None, key=None,
                 intensity: tuple | None = None) -> np.ndarray:
        """Panoptic labels (int32, same (H, W) as ``image``)."""
        params = params or SliceParams()
        heads = self.heads(image, params, key, intensity)
        timings = dict(self.timings)
        t0 = time.perf_counter()
        labels = self.postprocess(heads, params)
        timings["postprocess_s"] = time.perf_counter() - t0
        self.timings = timings
        self.info = {
            "model": self.engine.model.config.name,
            "params": params,
            "intensity": heads.meta.get("intensity"),
            "instances": count_objects(labels),
            **{k: heads.meta[k] for k in ("tiles", "tiled_exact", "tile_core") if k in heads.meta},
            **timings,
        }
        return labels

    def segment_batch(self, stack: np.ndarray, params: SliceParams | None = None) -> np.ndarray:
        """Batch mode: each image of an (N, H, W) stack on its own (own intensity range, ids
        restarting at ``label_divisor + 1``). Returns (N, H, W) int32."""
        params = params or SliceParams()
        stack = np.asarray(stack)
        if stack.ndim != 3:
            raise InputError(f"batch mode needs a stack of 2D images (N, H, W), got shape {stack.shape}")
        self.engine.check_image(stack, params.downsampling)
        units = np.stack([to_unit(s, *intensity_range(s)[:2]) for s in stack])
        t0 = time.perf_counter()
        heads = self.engine.infer(units, params.downsampling, params.fine_boundaries,
                                  (0.0, 1.0, "batch mode: each image rescaled on its own"))
        t1 = time.perf_counter()
        out = np.stack([self.postprocess(h, params) for h in heads])
        self.timings = {"network_s": t1 - t0, "postprocess_s": time.perf_counter() - t1,
                        "cached": False}
        return out

    def cache_info(self) -> dict:
        """Hits, misses, entries and bytes held by the network-output cache."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._cache),
                    "bytes": sum(h.nbytes for h in self._cache.values())}

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def segment_image(image: np.ndarray, model="default", params: SliceParams | None = None,
                  device=None) -> np.ndarray:
    """One-shot 2D segmentation of an (H, W) image, or of an (N, H, W) stack in batch mode.

    Loads the model each time: keep a :class:`SliceSegmenter` for repeated calls.
    """
    params = params or SliceParams()
    seg = SliceSegmenter(model, device=device, cache_size=1)
    image = np.asarray(image)
    if image.ndim == 3:
        if not params.batch_mode:
            raise InputError(f"got a stack of shape {image.shape}; set batch_mode=True to segment "
                             "each image on its own (3D inference is segment_volume)")
        return seg.segment_batch(image, params)
    return seg(image, params)
