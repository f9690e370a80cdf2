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


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody, root included, can create files in: a read-only tmpfs mounted for the
    test when running as root (root ignores permission bits), else a folder with mode 555."""
    import os
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
