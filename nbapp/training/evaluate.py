"""Validation of a model being trained: default post-processing on held-out xy slices."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as cc_label

from nbapp.metrics import slice_metrics
from nbapp.models.arch import PADDING_FACTOR

__all__ = ["evaluate"]


def _segment(sem: np.ndarray, ctr: np.ndarray, off: np.ndarray) -> np.ndarray:
    from nbapp.heads import Heads
    from nbapp.postprocess import segment_heads

    return segment_heads(Heads(sem[None], ctr, off, 1, 4))


@torch.no_grad()
def evaluate(model: torch.nn.Module, unit: np.ndarray, labels: np.ndarray, norms: dict,
             device: torch.device, every: int = 1) -> dict:
    """Validation metrics on the xy slices of a held-out block, default post-processing.

    Parameters
    ----------
    unit : (Z, Y, X) float32 in [0, 1]
    labels : (Z, Y, X) int, 3D instances (split into 2D connected components per slice)
    every : int
        Use every ``every``-th slice.

    Returns
    -------
    dict
        ``fg_iou`` over the whole block; ``f1``, ``f1@0.75``, ``pq``, ``precision``, ``recall``
        from instance counts pooled over slices.
    """
    was_training = model.training
    model.eval()
    z, h, w = unit.shape
    ph = math.ceil(h / PADDING_FACTOR) * PADDING_FACTOR
    pw = math.ceil(w / PADDING_FACTOR) * PADDING_FACTOR
    preds, gts = [], []
    for i in range(0, z, every):
        x = torch.from_numpy((unit[i] - norms["mean"]) / norms["std"])[None, None]
        x = F.pad(x, (0, pw - w, 0, ph - h)).to(device)
        o = model(x, 2, False)
        sem = torch.sigmoid(o["sem_logits"])[0, 0, :h, :w].cpu().numpy()
        ctr = o["ctr_hmp"][0, 0, : math.ceil(h / 4), : math.ceil(w / 4)].cpu().numpy()
        off = o["offsets"][0, :, : math.ceil(h / 4), : math.ceil(w / 4)].cpu().numpy()
        preds.append(_segment(sem, ctr, off))
        gts.append(cc_label(labels[i], connectivity=2))
    model.train(was_training)
    m = slice_metrics(np.stack(preds), np.stack(gts))
    keys = ("fg_iou", "f1@0.5", "pq@0.5", "f1@0.75", "pq@0.75", "precision", "recall")
    return {k: float(m[k]) for k in keys}
