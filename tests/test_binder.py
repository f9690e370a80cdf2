"""binder/: what mybinder.org installs opens the app.

The quick tests read the files; ``NBAPP_TEST_BINDER=1`` also installs binder/requirements.txt
into a fresh virtual environment (no packages of this one) and starts the app from it (slow:
minutes, needs the package index).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app_server import AppServer, free_port, http, stop, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
APP_PACKAGES = {"ipywidgets", "ipympl", "ipyvolume", "ipython_genutils", "voila", "ipykernel",
                "matplotlib"}


def requirement_lines() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def extra(name: str) -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("-", "_")
            for d in deps[name]}


def test_requirements_install_cpu_torch_and_nbapp_with_the_app_extra():
    lines = requirement_lines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert any(re.fullmatch(r"torch(==[\w.+]+)?", ln) for ln in lines), lines
    assert any(re.fullmatch(r"(-e )?\.\[app\]", ln) for ln in lines), lines


def test_the_app_extra_has_everything_the_app_imports_at_run_time():
    assert APP_PACKAGES <= extra("app")
    assert APP_PACKAGES <= extra("test")  # the test suite runs the app too


def test_runtime_and_start_script():
    version = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.(1[0-9])", version), version
    start = (BINDER / "start").read_text()
    assert start.startswith("#!/bin/bash") and 'exec "$@"' in start
    assert "NBAPP_DATA_ROOT" in start
    assert os.access(BINDER / "start", os.X_OK)


def test_readme_gives_the_voila_url():
    text = (BINDER / "README.md").read_text()
    assert "?urlpath=voila/render/notebooks/app.ipynb" in text
    assert (ROOT / "notebooks" / "app.ipynb").is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NBAPP_TEST_BINDER") != "1",
                    reason="set NBAPP_TEST_BINDER=1 to install binder/requirements.txt into a "
                           "fresh virtual environment (minutes)")
@pytest.mark.timeout(1800)
def test_fresh_environment_from_binder_requirements_serves_the_app(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # the PyTorch index is not reachable from here: torch comes from the local wheel cache
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("\n".join(ln for ln in requirement_lines()
                              if not ln.startswith("--extra-index-url")) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(reqs)], cwd=ROOT, check=True)
    port = free_port()
    log = tmp_path / "app.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(venv / "bin" / "nbapp"), "app", "--no-browser", "--port",
                                 str(port), "--data-root", str(tmp_path)], cwd=tmp_path,
                                stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = AppServer(proc, port, log)
    try:
        wait_for_port(server, 120)
        status, _, body = http(server.url, timeout=300)
        assert status == 200
        assert b"nbapp-app" in body or b"application/vnd.jupyter.widget-view+json" in body, \
            server.log_text()[-3000:]
        assert "Error at server while executing cell" not in server.log_text()
    finally:
        stop(server)
