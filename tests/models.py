"""Models for tests: a tiny random network and label oracles, both honouring the model contract."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nbapp.targets import panoptic_targets


class TinyNet(nn.Module):
    """A small random Panoptic-DeepLab-shaped network (C semantic classes)."""

    def __init__(self, classes: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.sem = nn.Conv2d(8, classes, 1)
        self.ctr = nn.Conv2d(8, 1, 1)
        self.off = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        f = torch.relu(self.down(torch.relu(self.stem(x))))
        sem = F.interpolate(self.sem(f), scale_factor=4.0, mode="bilinear", align_corners=False)
        ctr = self.ctr(f)
        off = self.off(f) * 4.0
        if interpolate_ins:
            ctr = F.interpolate(ctr, scale_factor=4.0, mode="bilinear", align_corners=False)
            off = F.interpolate(off, scale_factor=4.0, mode="bilinear", align_corners=False)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


class OracleNet(nn.Module):
    """Returns the ideal heads of stored label images; input slice i is a constant image of
    grey value i (uint8), so the model knows which heads to return. Coarse outputs are the
    4x4 average of the full-resolution heads (what a network at 1/4 resolution learns)."""

    def __init__(self, labels: np.ndarray, padding_factor: int = 16, sigma: float = 6.0,
                 mean: float = 0.0, std: float = 1.0):
        super().__init__()
        labels = np.asarray(labels)
        n, h, w = labels.shape
        hp, wp = -(-h // padding_factor) * padding_factor, -(-w // padding_factor) * padding_factor
        sem = np.full((n, 1, hp, wp), -10.0, np.float32)
        ctr = np.zeros((n, 1, hp, wp), np.float32)
        off = np.zeros((n, 2, hp, wp), np.float32)
        for i, lab in enumerate(labels):
            t = panoptic_targets(lab, sigma)
            sem[i, 0, :h, :w] = np.where(lab > 0, 10.0, -10.0)
            ctr[i, 0, :h, :w] = t.heatmap
            off[i, :, :h, :w] = t.offsets
        self.register_buffer("sem", torch.from_numpy(sem))
        self.register_buffer("ctr", torch.from_numpy(ctr))
        self.register_buffer("off", torch.from_numpy(off))
        self.mean = mean
        self.std = std

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        grey = (x[:, 0, 0, 0] * self.std + self.mean) * 255.0
        idx = torch.round(grey).long()
        h, w = x.shape[2], x.shape[3]
        sem = self.sem[idx][:, :, :h, :w]
        ctr = self.ctr[idx][:, :, :h, :w]
        off = self.off[idx][:, :, :h, :w]
        if not interpolate_ins:
            ctr = F.avg_pool2d(ctr, 4)
            off = F.avg_pool2d(off, 4)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


def oracle_images(n: int, shape: tuple) -> np.ndarray:
    """The inputs that make OracleNet return the heads of label image i."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, *shape)).copy()


def save_oracle(labels: np.ndarray, folder, name: str = "oracle") -> str:
    """Script OracleNet for ``labels`` and write NAME.pt + NAME.yaml; return the YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    module = torch.jit.script(OracleNet(labels))
    module.save(str(folder / f"{name}.pt"))
    (folder / f"{name}.yaml").write_text(
        "class_names: {1: mito}\nlabels: [1]\nthing_list: [1]\n"
        f"model: {name}.pt\npadding_factor: 16\nnorms: {{mean: 0.0, std: 1.0}}\n"
        "description: label oracle for tests\n"
    )
    return str(folder / f"{name}.yaml")
