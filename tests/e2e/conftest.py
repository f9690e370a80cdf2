"""Fixtures of the browser tests: one ``nbapp app`` server and one Chromium per module."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from browser import MODEL_ENV, AppPage, chromium, watch  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_root")
    (root / "not_an_image.tif").write_bytes(b"this is not a TIFF file")
    if os.environ.get(MODEL_ENV):
        shutil.copytree(Path(os.environ[MODEL_ENV]).parent, root / "model")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root):
    from app_server import running_app

    with running_app(tmp_path_factory.mktemp("server"), data_root) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium_profile")) as (ctx, rec):
        yield ctx, rec


@pytest.fixture(scope="module")
def app(server, browser):
    """The app, loaded once for the module's tests (each page load starts a kernel and loads
    the model); closed with its unload handlers run, as a user closing the tab would."""
    ctx, rec = browser
    page = ctx.new_page()
    watch(page, rec)
    app = AppPage(page, rec)
    model = os.environ.get(MODEL_ENV)
    app.load_times = app.open(server.url, model=f"model/{Path(model).name}" if model else None)
    yield app
    page.close(run_before_unload=True)
