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


def test_import_nbapp_does_not_import_torch_or_widgets():
    code = ("import sys, nbapp, nbapp.params, nbapp.postprocess, nbapp.targets; "
            "bad = [m for m in ('torch', 'ipywidgets', 'matplotlib') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
