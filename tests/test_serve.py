"""``nbapp app``: the Voila command and its settings, argument errors, and a live server.

The unit tests check the argv and that Voila really applies it (culling, 127.0.0.1, no port
hopping, no served files) without starting a server; one slow test starts ``nbapp app`` in a
child process and talks HTTP to it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from app_server import free_port, http, missing_app_modules, running_app
from nbapp import cli, serve
from nbapp.errors import NbappError

ROOT = Path(__file__).resolve().parents[1]
needs_app = pytest.mark.skipif(bool(missing_app_modules()),
                               reason=f"app packages missing: {missing_app_modules()}")


def run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == cli.EXIT_USAGE
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbapp: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --------------------------------------------------------------------------------------------
# the command


def test_voila_command_binds_localhost_without_browser_and_culls_deliberately():
    cmd = serve.voila_command(9001)
    assert cmd[:4] == [sys.executable, "-m", "nbapp.serve", str(serve.app_notebook())]
    for arg in ("--port=9001", "--Voila.ip=127.0.0.1", "--Voila.port_retries=0", "--no-browser",
                "--Voila.open_browser=False", "--VoilaConfiguration.show_tracebacks=False",
                "--VoilaConfiguration.file_denylist=.*",
                "--MappingKernelManager.cull_idle_timeout=3600",
                "--MappingKernelManager.cull_interval=300",
                "--MappingKernelManager.cull_busy=False",
                "--MappingKernelManager.cull_connected=False"):
        assert arg in cmd, arg
    assert not any("xsrf" in a.lower() or "token" in a.lower() for a in cmd), cmd


def test_voila_command_opens_a_browser_unless_told_not_to():
    cmd = serve.voila_command(8866, open_browser=True)
    assert "--Voila.open_browser=True" in cmd and "--no-browser" not in cmd


def test_data_root_reaches_the_kernel_environment(tmp_path):
    env = serve.voila_environment(tmp_path, base={"PATH": "/bin", serve.TOKEN_ENV: "s3cret"})
    assert env["PATH"] == "/bin" and env[serve.DATA_ROOT_ENV] == str(tmp_path)
    assert serve.TOKEN_ENV not in env  # the user's token variable never reaches a kernel


def test_job_markers_reach_the_kernel_environment(tmp_path):
    env = serve.voila_environment(tmp_path, base={}, markers=tmp_path / "jobs")
    assert env[serve.MARKERS_ENV] == str(tmp_path / "jobs")


def test_cull_idle_timeout_option(capsys):
    cmd = serve.voila_command(9001, cull_idle_timeout=10)
    assert "--MappingKernelManager.cull_idle_timeout=10" in cmd
    assert "--MappingKernelManager.cull_interval=5" in cmd
    rc, err = run(capsys, "app", "--cull-idle-timeout", "0", "--port", free_port())
    assert_one_line_error(rc, err, "--cull-idle-timeout must be a positive number")


def test_data_root_defaults_to_a_folder_of_its_own_not_the_current_one(tmp_path, monkeypatch):
    """Issue 30 item 13: after the README's command the current folder is the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(serve.DATA_HOME_ENV, raising=False)
    assert serve.resolve_data_root(None) == (tmp_path / "home" / "nbapp-data").resolve()
    assert (tmp_path / "home" / "nbapp-data").is_dir()
    monkeypatch.setenv(serve.DATA_HOME_ENV, str(tmp_path / "lab"))
    assert serve.resolve_data_root(None) == (tmp_path / "lab").resolve()
    assert serve.resolve_data_root(tmp_path / ".") == tmp_path.resolve()
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(serve.DATA_HOME_ENV, str(tmp_path / "file" / "sub"))
    with pytest.raises(NbappError, match="cannot create the default data root"):
        serve.resolve_data_root(None)


@needs_app
def test_voila_applies_the_settings(tmp_path):
    """Voila itself parses the argv: culling reaches its kernel manager, the server binds
    127.0.0.1 only, and XSRF checks are not disabled."""
    from voila.app import Voila

    previous = signal.getsignal(signal.SIGTERM)  # Voila.initialize installs a SIGTERM handler
    try:
        app = Voila(config=serve.voila_config())  # what python -m nbapp.serve does
        app.initialize(serve.voila_command(free_port())[3:])
        app.connection_dir = str(tmp_path)
        settings = app.init_settings()
    finally:
        signal.signal(signal.SIGTERM, previous)
    km = app.kernel_manager
    assert (km.cull_idle_timeout, km.cull_interval, km.cull_busy, km.cull_connected) == (
        3600, 300, False, False)
    assert (app.ip, app.port_retries, app.open_browser) == ("127.0.0.1", 0, False)
    assert app.notebook_path == str(serve.app_notebook())
    assert app.voila_configuration.file_denylist == [".*"]
    assert app.voila_configuration.show_tracebacks is False
    assert app.voila_configuration.prelaunch_hook is serve.prelaunch
    assert not settings.get("disable_check_xsrf", False)
    assert "JobAwareKernelManager" in [c.__name__ for c in type(km).__mro__]


# --------------------------------------------------------------------------------------------
# the app notebook


def _code(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def test_packaged_app_notebook_takes_the_servers_workspace_and_matches_notebooks_app():
    code = _code(serve.app_notebook())
    assert "from nbapp.ui import App" in code
    assert "App.served()" in code
    assert code == _code(ROOT / "notebooks" / "app.ipynb")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "app.ipynb" in data["nbapp"]


# --------------------------------------------------------------------------------------------
# errors: one line, exit status 2, nothing started


def test_missing_data_root_is_an_error(capsys, tmp_path):
    rc, err = run(capsys, "app", "--no-browser", "--data-root", tmp_path / "nope")
    assert_one_line_error(rc, err, "--data-root", "does not exist")


def test_data_root_that_is_a_file_is_an_error(capsys, tmp_path):
    (tmp_path / "f.tif").write_bytes(b"")
    rc, err = run(capsys, "app", "--no-browser", "--data-root", tmp_path / "f.tif")
    assert_one_line_error(rc, err, "is not a folder")


def test_taken_port_is_an_error(capsys, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, err = run(capsys, "app", "--no-browser", "--port", port, "--data-root", tmp_path)
    assert_one_line_error(rc, err, f"port {port}", "already in use", "--port")


@pytest.mark.parametrize("port", ["0", "70000"])
def test_port_out_of_range_is_an_error(capsys, tmp_path, port):
    rc, err = run(capsys, "app", "--no-browser", "--port", port, "--data-root", tmp_path)
    assert_one_line_error(rc, err, "--port must be between 1 and 65535")


def test_missing_voila_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "voila" else real(name, *a))
    rc, err = run(capsys, "app", "--no-browser", "--port", free_port(), "--data-root", tmp_path)
    assert_one_line_error(rc, err, "voila", "pip install 'nbapp[app]'")


def test_app_help(capsys):
    assert cli.main(["app", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--port", "--no-browser", "--data-root"):
        assert opt in out


# --------------------------------------------------------------------------------------------
# a live server


@needs_app
@pytest.mark.slow
def test_live_server_serves_the_page_with_xsrf_checks_and_stops_cleanly(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with running_app(tmp_path, data) as app:
        status, headers, body = http(app.url)
        assert status == 200, app.log_text()
        assert b"<html" in body.lower()
        # the page gets the XSRF cookie its own POSTs need (kernel shutdown on tab close)
        assert any(c.startswith("_xsrf=") for c in headers.get_all("Set-Cookie")), headers
        # the browser's login: the token in the URL gave a login cookie (requests with the token
        # in an Authorization header skip XSRF checks, as in Jupyter; a browser's do not)
        login = next(c.split(";")[0] for c in headers.get_all("Set-Cookie")
                     if c.startswith("username-"))
        shutdown = app.base + "voila/api/shutdown/no-such-kernel"
        # a POST without an XSRF token is refused
        status, _, body = http(shutdown, "POST", {"Cookie": login})
        assert status == 403 and b"_xsrf" in body, body
        # a mismatching token too
        status, _, _ = http(shutdown, "POST", {"Cookie": f"{login}; _xsrf=aaaa",
                                               "X-XSRFToken": "bbbb"})
        assert status == 403
        # a matching cookie and header pass the XSRF check (and reach the handler: no kernel)
        status, _, body = http(shutdown, "POST", {"Cookie": f"{login}; _xsrf=abcd",
                                                  "X-XSRFToken": "abcd"})
        assert status == 404 and b"Kernel does not exist" in body, body
        # files beside the notebook are not served
        status, _, _ = http(app.base + "voila/files/app.ipynb", headers=app.auth)
        assert status == 403
        log = app.log_text()
        assert f"http://127.0.0.1:{app.port}/?token={app.token}" in log
        assert f"data root {data.resolve()}" in log
        assert "Culling kernels with idle durations > 3600 seconds at 300 second intervals" in log
    assert app.proc.returncode == 0, app.log_text()
    serve.check_port(app.port)  # nothing listens there any more


def test_voila_ignores_sigint_and_the_wrapper_keeps_its_own(capfd):
    """A Ctrl-C that reached Voila between opening its port and starting its loop ended it with
    a KeyboardInterrupt traceback (seen once in this suite): Voila runs with SIGINT ignored and
    stops on the wrapper's SIGTERM; the wrapper's own Ctrl-C handling is as it was."""
    before = signal.getsignal(signal.SIGINT)
    probe = "import signal; print('voila ignores SIGINT:', signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    assert serve._run_voila([sys.executable, "-c", probe], dict(os.environ)) == 0
    assert "voila ignores SIGINT: True" in capfd.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before


def test_a_failed_voila_raises_with_its_exit_status():
    with pytest.raises(serve.NbappError, match="Voila stopped with exit status 3; see its messages"):
        serve._run_voila([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))


@needs_app
@pytest.mark.slow
def test_ctrl_c_stops_the_server_with_status_0(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground group: the wrapper waits for Voila."""
    with running_app(tmp_path, tmp_path) as app:
        os.killpg(app.proc.pid, signal.SIGINT)
        assert app.proc.wait(30) == 0, app.log_text()
    assert "Traceback" not in app.log_text()


# --------------------------------------------------------------------------------------------
# a kernel running a 3D job outlives its page; one without is shut down (issue 15, item 10)


@needs_app
@pytest.mark.slow
def test_kernel_with_a_job_is_shut_down_only_after_the_job(tmp_path, monkeypatch):
    """A real kernel under the job-aware manager: the page's shutdown waits for the job."""
    import asyncio

    from nbapp.jobs import JobMarker

    monkeypatch.setenv(serve.MARKERS_ENV, str(tmp_path))

    async def scenario():
        km = serve.job_aware_kernel_manager()(connection_dir=str(tmp_path), root_dir=str(tmp_path))
        km.job_poll_s = 0.05
        with_job = await km.start_kernel(kernel_name="python3")
        without = await km.start_kernel(kernel_name="python3")
        marker = JobMarker(tmp_path, with_job)
        marker.begin()  # what the app does when a 3D job starts
        await km.shutdown_kernel(with_job)  # the page closed
        await km.shutdown_kernel(without)
        assert without not in km
        assert with_job in km and await km._alive(with_job)
        assert marker.orphaned  # the app saves its result when the job ends
        await km.shutdown_kernel(with_job)  # a second request (culling) changes nothing
        await asyncio.sleep(0.3)
        assert with_job in km and await km._alive(with_job)
        marker.end()  # the job ended
        for _ in range(200):
            if with_job not in km:
                break
            await asyncio.sleep(0.05)
        assert with_job not in km
        await km.shutdown_all()

    asyncio.run(scenario())
