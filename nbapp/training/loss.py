"""The Panoptic-DeepLab training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["panoptic_loss"]


def panoptic_loss(out: dict, batch: dict, hard_frac: float = 0.2, w_dice: float = 0.5,
                  w_ctr: float = 200.0, w_off: float = 0.01) -> tuple[torch.Tensor, dict]:
    """Panoptic-DeepLab loss of network outputs (``interpolate_ins=False``) against targets.

    Parameters
    ----------
    out : dict
        ``sem_logits`` (N, 1, H, W), ``ctr_hmp`` (N, 1, H/4, W/4), ``offsets`` (N, 2, H/4, W/4).
    batch : dict
        ``semantic`` (N, 1, H, W), ``heatmap`` (N, 1, H, W), ``offsets`` (N, 2, H, W),
        ``fg`` (N, 1, H, W) bool, optionally ``weight`` (N, 1, H, W) per-pixel weights of the
        semantic term.

    Returns
    -------
    total : scalar tensor
    parts : dict of str to float
        ``sem``, ``ctr`` and ``off`` terms (weighted).
    """
    size = batch["semantic"].shape[-2:]
    logits = out["sem_logits"]
    bce = F.binary_cross_entropy_with_logits(logits, batch["semantic"], reduction="none")
    if "weight" in batch:  # e.g. pixels the user corrected count more
        bce = bce * batch["weight"]
    k = max(1, int(hard_frac * bce.numel()))
    sem = bce.flatten().topk(k).values.mean()
    prob = torch.sigmoid(logits)
    inter = (prob * batch["semantic"]).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + batch["semantic"].sum() + 1)
    sem = sem + w_dice * dice
    ctr = F.interpolate(out["ctr_hmp"], size=size, mode="bilinear", align_corners=False)
    ctr_loss = w_ctr * F.mse_loss(ctr, batch["heatmap"])
    off = F.interpolate(out["offsets"], size=size, mode="bilinear", align_corners=False)
    fg = batch["fg"].to(off.dtype)
    off_loss = w_off * ((off - batch["offsets"]).abs() * fg).sum() / (2 * fg.sum() + 1)
    total = sem + ctr_loss + off_loss
    return total, {"sem": sem.item(), "ctr": ctr_loss.item(), "off": off_loss.item()}
