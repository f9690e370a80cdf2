"""A served page shared by a lab group (issue 26 item 3): a token by default, a bound on kernels
(total and per visitor) answered with a clear page, kernels of pages that never connected shut
down soon, and each browser its own visitor id."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app_server import free_port, http, missing_app_modules, running_app
from nbapp import cli, serve

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.skipif(bool(missing_app_modules()),
                                reason=f"app packages missing: {missing_app_modules()}")


def _kernels(server) -> dict:
    """pid -> NBAPP_VISITOR of the server's kernel processes."""
    found = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if any("ipykernel" in part for part in p.cmdline()):
                found[p.pid] = p.environ().get("NBAPP_VISITOR")
        except psutil.NoSuchProcess:
            continue
    return found


def _wait(predicate, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)  # poll interval, bounded by the deadline
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_token_kernel_caps_and_unconnected_pages(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = ("--max-kernels", "3", "--max-kernels-per-visitor", "2", "--connect-timeout", "45")
    with running_app(tmp_path, data, extra_args=args) as app:
        # without the token: a login page, and no kernel
        status, _, _ = http(app.base)
        assert status in (302, 200) and not _kernels(app)
        status, _, body = http(app.base + "?token=wrong")
        assert not _kernels(app)
        # a script flooding GET /?token=... (at once; a new visitor each time): bounded by
        # --max-kernels, the others answered at once with a clear page
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: http(app.url, timeout=180), range(5)))
        codes = sorted(a[0] for a in answers)
        assert codes == [200, 200, 200, 503, 503], codes
        busy = [a[2] for a in answers if a[0] == 503]
        assert all(b"the server is busy: 3 sessions open" in b for b in busy)
        kernels = _kernels(app)
        assert len(kernels) == 3 and len(set(kernels.values())) == 3, kernels
        assert all(v and len(v) == 24 for v in kernels.values())
        # their pages never connected: shut down after --connect-timeout
        _wait(lambda: not _kernels(app), 150, "unconnected kernels to go")
        # one browser (one visitor cookie): at most --max-kernels-per-visitor pages
        status, headers, _ = http(app.url, timeout=180)
        cookie = next(c.split(";")[0] for c in headers.get_all("Set-Cookie")
                      if c.startswith(serve.VISITOR_COOKIE))
        assert "httponly" in str(headers).lower() and "samesite=strict" in str(headers).lower()
        again = http(app.url, headers={"Cookie": cookie}, timeout=180)
        third = http(app.url, headers={"Cookie": cookie}, timeout=180)
        assert again[0] == 200 and third[0] == 503, (again[0], third[0])
        assert b"you have 2 sessions open" in third[2]
        assert len(set(_kernels(app).values())) == 1
    # the token is printed once, for the administrator; refused requests log it scrubbed
    with_token = [line for line in app.log_text().splitlines() if app.token in line]
    assert len(with_token) == 1 and with_token[0].startswith("nbapp: serving the app at"), \
        with_token
    assert "503 GET /?token=[secret]" in app.log_text()


def test_token_settings_and_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(serve.TOKEN_ENV, "from-the-environment")
    env = serve.voila_environment(tmp_path, base={serve.TOKEN_ENV: "x"}, token="abcdefgh")
    assert env[serve._SERVER_TOKEN_ENV] == "abcdefgh" and serve.TOKEN_ENV not in env
    monkeypatch.setenv(serve._SERVER_TOKEN_ENV, "abcdefgh")
    cfg = serve.voila_config()
    assert cfg.Voila.token == "abcdefgh"
    import os

    assert serve._SERVER_TOKEN_ENV not in os.environ  # gone before any kernel starts
    port = str(free_port())
    for argv, msg in ((["app", "--token", "short", "--no-browser", "--port", port, "--data-root", str(tmp_path)],
                       "--token must be 8 to 64"),
                      (["app", "--max-kernels", "0", "--no-browser", "--port", port, "--data-root", str(tmp_path)],
                       "--max-kernels must be a positive whole number"),
                      (["app", "--models", str(tmp_path / "none"), "--no-browser", "--port", port, "--data-root",
                        str(tmp_path)], "is not an existing folder"),
                      (["app", "--models", str(tmp_path), "--no-browser", "--port", port, "--data-root",
                        str(tmp_path)], "is inside the data root")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_kernels_whose_pages_went_away_are_reaped():
    """A crashed browser's kernel lived for an hour (walk-through): one whose pages all left
    without closing is shut down after --disconnect-timeout, as one that never connected is
    after --connect-timeout."""
    books = {"started": {"never": 0.0, "left": 0.0, "back": 0.0, "here": 0.0},
             "connected": {"left", "back", "here"}, "gone": {"left": 10.0, "back": 590.0}}
    limits = {"connect_timeout": 120, "disconnect_timeout": 600}
    assert serve.kernels_to_reap(books, 100.0, limits) == []
    reaped = dict(serve.kernels_to_reap(books, 700.0, limits))
    assert set(reaped) == {"never", "left"}
    assert reaped["left"] == "no page connected for 690 s"

