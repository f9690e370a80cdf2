"""Start ``nbapp app`` as a child process for tests, wait for it, stop it cleanly.

Used by tests/test_serve.py and the browser tests in tests/e2e/. No fixed sleeps: the server is
polled with a deadline, and stopped by signalling its process group (the wrapper and Voila).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

APP_MODULES = ("voila", "ipykernel", "ipywidgets", "ipympl", "ipyvolume", "matplotlib")


def missing_app_modules() -> list[str]:
    """The app's run-time packages that are not installed (empty when the app can start)."""
    return [m for m in APP_MODULES if importlib.util.find_spec(m) is None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    proc: subprocess.Popen
    port: int
    log: Path
    token: str = ""

    @property
    def base(self) -> str:
        """The server's address, without the token."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def url(self) -> str:
        """The page's address with the token (what ``nbapp app`` prints)."""
        return self.base + (f"?token={self.token}" if self.token else "")

    @property
    def auth(self) -> dict:
        """Headers that authenticate a request as the token's holder."""
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for_port(server: AppServer, deadline_s: float = 60.0) -> None:
    """Return once the server accepts connections; fail with its log if it exits or times out."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if server.proc.poll() is not None:
            raise RuntimeError(f"nbapp app exited with {server.proc.returncode}:\n"
                               f"{server.log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # poll interval, bounded by the deadline above
    raise TimeoutError(f"nbapp app did not listen on {server.port} within {deadline_s} s:\n"
                       f"{server.log_text()}")


def stop(server: AppServer, timeout_s: float = 30.0) -> int:
    """SIGTERM the process group (the wrapper and Voila, which shuts its kernels down); SIGKILL
    if it does not stop in time. Returns the wrapper's exit status."""
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
    return server.proc.returncode


@contextmanager
def running_app(workdir: Path, data_root: Path | None = None, extra_env: dict | None = None,
                deadline_s: float = 60.0, extra_args: tuple = ()):
    """``nbapp app --no-browser --port <free> --data-root DATA_ROOT [EXTRA_ARGS]`` in its own
    process group."""
    port = free_port()
    token = "" if "--no-token" in extra_args else secrets.token_urlsafe(16)
    log = Path(workdir) / f"nbapp_app_{port}.log"
    argv = [sys.executable, "-m", "nbapp.cli", "app", "--no-browser", "--port", str(port)]
    if data_root is not None:
        argv += ["--data-root", str(data_root)]
    argv += [str(a) for a in extra_args]
    env = {**os.environ, **({"NBAPP_TOKEN": token} if token else {}),
           "NBAPP_DATA_HOME": str(Path(workdir) / "nbapp-data"), **(extra_env or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    server = AppServer(proc, port, log, token)
    try:
        wait_for_port(server, deadline_s)
        yield server
    finally:
        stop(server)


def http(url: str, method: str = "GET", headers: dict | None = None, timeout: float = 120.0):
    """(status, headers, body) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, method=method, headers=headers or {},
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()
