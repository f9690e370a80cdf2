"""Shared fixtures. Helper functions and test models live in tests/models.py (import them from
there: a second conftest.py under tests/e2e would shadow names imported from this one)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model():
    """A small random scripted network wrapped as an nbapp Model on CPU."""
    import torch

    from models import TinyNet
    from nbapp.models import load_model

    return load_model(torch.jit.script(TinyNet()), device="cpu")
