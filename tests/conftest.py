"""Shared fixtures: tiny models honouring the contract, label oracles, real data when present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(os.environ.get("NBAPP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """Path under the shared real-EM data folder; skips the test when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real EM data not available ({p}); set NBAPP_DATA to its folder")
    return p


@pytest.fixture(scope="session")
def tiny_model():
    """A small random scripted network wrapped as an nbapp Model on CPU."""
    import torch

    from models import TinyNet
    from nbapp.models import load_model

    return load_model(torch.jit.script(TinyNet()), device="cpu")


def disks(shape=(96, 128), centres=((30, 30), (30, 52), (70, 90)), radius=12) -> np.ndarray:
    """Instance labels of a few disks (the first two touch), ids 1..K."""
    yy, xx = np.indices(shape)
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return lab
