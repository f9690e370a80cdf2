"""The architecture is checked, not just described: import-linter contracts and a light import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install 'nbapp[test]')")
    res = subprocess.run([exe], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout
    assert "Layers: app and CLI, 3D front door" in res.stdout  # the floors are checked too


def test_import_nbapp_does_not_import_torch_or_widgets():
    code = ("import sys, nbapp, nbapp.params, nbapp.postprocess, nbapp.training.targets; "
            "bad = [m for m in ('torch', 'ipywidgets', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_public_consensus_survives_a_3d_job_in_a_fresh_interpreter():
    """Issue 17 item 1: after a 3D job imports nbapp.consensus (the module), the README's call
    still works."""
    code = ("import numpy as np, nbapp\n"
            "from nbapp.samples import demo_volume\n"
            "vol = demo_volume(shape=(32, 64, 64), n_mito=3)[0]\n"
            "lab, st = nbapp.segment_volume(vol, 'default', nbapp.VolumeParams(return_stacks=True))\n"
            "again = nbapp.run_consensus(st, nbapp.ConsensusParams(vote_threshold=3))\n"
            "print(sorted(st), again.shape, again.dtype)\n"
            "try:\n    nbapp.consensus\nexcept AttributeError as e:\n    print('no', e)\n"
            "else:\n    print('module', type(nbapp.consensus).__name__)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "['xy', 'xz', 'yz'] (32, 64, 64) int32" in res.stdout
