"""``nbapp app``: serve the widget app as a web page with Voila, on 127.0.0.1 only.

Voila runs in a child process (``python -m nbapp.serve``: Voila's own entry point with one
setting a command line cannot give) on the app notebook shipped in the package
(``nbapp/app.ipynb``); the data root reaches the notebook's kernel through the
``NBAPP_DATA_ROOT`` environment variable, and the app's path box cannot leave it.

Settings chosen on purpose:

- bound to ``127.0.0.1`` only; no port hopping (a taken port is an error, not another port);
- XSRF checks stay on (nothing here sets ``disable_check_xsrf``), and the page gets the
  ``_xsrf`` cookie so that its own kernel shutdown on tab close passes them (voila issue 1458);
- no file of the notebook's folder is served (``file_denylist`` matches everything);
- a kernel whose page closes is shut down at once (the page's unload request), unless it runs
  a 3D job: a job marks itself in a folder the server watches (:class:`nbapp.jobs.JobMarker`,
  ``$NBAPP_JOB_MARKERS``), and the server's kernel manager (:func:`job_aware_kernel_manager`)
  then lets the job finish, the app saves its labels under the data root's ``nbapp-exports/``,
  and the kernel is shut down after it;
- idle-kernel culling that never kills a running job: a 3D job runs in a worker thread, so the
  kernel reports "idle" while it works. Kernels with an open page are never culled
  (``cull_connected=False``) and busy ones neither (``cull_busy=False``); a kernel whose page
  is gone without saying so (a crashed browser) is reclaimed once it has had no activity for
  an hour (``--cull-idle-timeout``; the job's progress messages count as activity, and a
  kernel with a job is kept as above).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from nbapp.errors import NbappError
from nbapp.jobs import MARKERS_ENV, JobMarker
from nbapp.workspace import MODEL_DIRS_ENV, ROOT_MODELS_ENV, VISITOR_ENV

__all__ = ["DEFAULT_PORT", "DATA_ROOT_ENV", "CULLING", "LIMITS", "app_notebook", "voila_command",
           "voila_config", "voila_environment", "set_xsrf_cookie", "prelaunch",
           "check_requirements", "check_port", "resolve_data_root", "default_data_root",
           "resolve_model_dirs",
           "serve", "culling", "job_aware_kernel_manager", "visitor_id", "TOKEN_ENV"]

DEFAULT_PORT = 8866
HOST = "127.0.0.1"
#: Environment variable that gives the app's kernel its data root.
DATA_ROOT_ENV = "NBAPP_DATA_ROOT"
#: The token visitors need (``nbapp app --token``); read from the environment, never from the
#: command line, which every local account can see in the process list.
TOKEN_ENV = "NBAPP_TOKEN"
#: The server's own copy (the wrapper hands it to Voila's process; removed there before any
#: kernel starts).
_SERVER_TOKEN_ENV = "NBAPP_SERVER_TOKEN"
_LIMITS_ENV = "NBAPP_SERVER_LIMITS"
#: Kernels: at most ``max_kernels`` at once, ``per_visitor`` per browser; a kernel whose page
#: never connected (a script's ``GET /``) is shut down after ``connect_timeout`` seconds, one whose
#: pages all went away without closing (a crashed browser) after ``disconnect_timeout``.
LIMITS = {"max_kernels": 12, "per_visitor": 3, "connect_timeout": 120, "disconnect_timeout": 600}
#: The cookie that tells a browser's visits apart (a random secret; its hash names the folder).
VISITOR_COOKIE = "nbapp-visitor"
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,64}")
#: Kernel culling (jupyter_server MappingKernelManager traits), see the module docstring.
CULLING = {
    "cull_idle_timeout": 3600,
    "cull_interval": 300,
    "cull_busy": False,
    "cull_connected": False,
}


def culling(idle_timeout: int = CULLING["cull_idle_timeout"]) -> dict:
    """:data:`CULLING` with another idle timeout (seconds); the check runs at least as often.

    >>> culling(60)["cull_interval"], culling()["cull_interval"]
    (30, 300)
    """
    if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, int) or idle_timeout < 1:
        raise NbappError(f"--cull-idle-timeout must be a positive number of seconds, "
                         f"got {idle_timeout!r}")
    return {**CULLING, "cull_idle_timeout": idle_timeout,
            "cull_interval": max(1, min(CULLING["cull_interval"], idle_timeout // 2))}
#: What the app needs at run time besides nbapp's core (the ``app`` extra).
APP_MODULES = ("voila", "ipykernel", "ipywidgets", "ipympl", "ipyvolume", "matplotlib")
INSTALL_HINT = "pip install 'nbapp[app]'"


def app_notebook() -> Path:
    """The Voila entry notebook shipped inside the package."""
    return Path(__file__).with_name("app.ipynb")


def check_requirements() -> None:
    """Fail with one clear message when the app's extra packages are missing."""
    missing = [m for m in APP_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise NbappError(f"the app needs {', '.join(missing)}: {INSTALL_HINT}")
    if not app_notebook().is_file():
        raise NbappError(f"the app notebook {app_notebook()} is missing from the installation; "
                         "reinstall nbapp")


def check_port(port: int, host: str = HOST) -> None:
    """Fail when ``port`` is out of range or already taken on ``host``."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise NbappError(f"--port must be between 1 and 65535, got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as Tornado does: connections of a server that just stopped (TIME_WAIT) don't count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NbappError(f"port {port} on {host} is already in use; choose another "
                                 "with --port N") from None
            raise NbappError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


#: The data root when none is given: a folder of its own in the user's home (``$NBAPP_DATA_HOME``
#: moves it), made on first use; never the current folder, which after the README's command is
#: the source checkout (visitors' exports and training sets would land in the source tree).
DATA_HOME_ENV = "NBAPP_DATA_HOME"


def default_data_root() -> Path:
    """``$NBAPP_DATA_HOME``, else ``~/nbapp-data`` (made if missing)."""
    root = Path(os.environ.get(DATA_HOME_ENV) or Path.home() / "nbapp-data").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NbappError(f"cannot create the default data root {str(root)!r} "
                         f"({exc.strerror or exc}); give one with --data-root DIR") from None
    return root


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The absolute data root (default: :func:`default_data_root`); it must be an existing
    folder."""
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if not root.exists():
        raise NbappError(f"--data-root {str(data_root)!r} does not exist")
    if not root.is_dir():
        raise NbappError(f"--data-root {str(data_root)!r} is not a folder")
    return root.resolve()


def voila_command(port: int = DEFAULT_PORT, open_browser: bool = False,
                  notebook: str | os.PathLike | None = None,
                  cull_idle_timeout: int = CULLING["cull_idle_timeout"]) -> list[str]:
    """The argv that starts Voila on ``notebook`` (default: the packaged app notebook).

    ``python -m nbapp.serve ARGS`` is Voila's own entry point with :func:`voila_config`; ARGS
    are Voila's command-line options.

    >>> cmd = voila_command(9000)
    >>> cmd[1:3], "--port=9000" in cmd, "--Voila.ip=127.0.0.1" in cmd, "--no-browser" in cmd
    (['-m', 'nbapp.serve'], True, True, True)
    """
    nb = Path(notebook) if notebook is not None else app_notebook()
    cmd = [
        sys.executable, "-m", "nbapp.serve", str(nb),
        f"--port={port}",
        f"--Voila.ip={HOST}",
        "--Voila.port_retries=0",
        f"--Voila.open_browser={open_browser}",
        "--VoilaConfiguration.file_denylist=.*",
        "--VoilaConfiguration.show_tracebacks=False",
    ]
    if not open_browser:
        cmd.append("--no-browser")
    cmd += [f"--MappingKernelManager.{k}={v}" for k, v in culling(cull_idle_timeout).items()]
    return cmd


def visitor_id(cookie: str) -> str:
    """The folder name of the visitor whose cookie is ``cookie`` (its hash: folder names do not
    give the cookie away).

    >>> len(visitor_id("x" * 43)), visitor_id("x" * 43) == visitor_id("x" * 43)
    (24, True)
    """
    return hashlib.sha256(cookie.encode()).hexdigest()[:24]


#: The visitor of the page being started: set by :func:`prelaunch`, taken by the kernel manager's
#: ``start_kernel``, which Voila calls right after it with no await in between (one event loop).
_HANDOFF: dict = {}


def prelaunch(request_handler, notebook=None, cwd=None):
    """Voila ``prelaunch_hook``: the ``_xsrf`` cookie (:func:`set_xsrf_cookie`) and the
    visitor's cookie (made on the first visit: a random secret, HttpOnly, SameSite=Strict),
    whose hash :func:`visitor_id` becomes the page's workspace (``NBAPP_VISITOR``)."""
    set_xsrf_cookie(request_handler)
    value = request_handler.get_cookie(VISITOR_COOKIE)
    if not value or not _COOKIE_VALUE.fullmatch(value):
        value = secrets.token_urlsafe(32)
        request_handler.set_cookie(VISITOR_COOKIE, value, httponly=True, samesite="Strict",
                                   expires_days=365, path="/")
    _HANDOFF["visitor"] = visitor_id(value)
    return None


def set_xsrf_cookie(request_handler, notebook=None, cwd=None):
    """Voila ``prelaunch_hook``: give the page Tornado's ``_xsrf`` cookie.

    Voila's page posts the kernel shutdown when its tab closes, with the token from that cookie;
    Voila never sets it, so the post failed the XSRF check and the kernel lived on until culled
    (voila issue 1458). Reading ``xsrf_token`` sets the cookie; the notebook is unchanged.
    """
    request_handler.xsrf_token  # noqa: B018 - the property sets the cookie
    return None


def kernels_to_reap(books: dict, now: float, limits: dict) -> list[tuple[str, str]]:
    """``(kernel id, why)`` of the kernels to shut down: started more than ``connect_timeout``
    seconds ago and never connected, or without a connected page for ``disconnect_timeout``
    seconds (``books``: ``started`` and ``gone`` times, the ``connected`` set).

    >>> books = {"started": {"a": 0.0, "b": 0.0, "c": 0.0}, "connected": {"b", "c"},
    ...          "gone": {"b": 50.0}}
    >>> kernels_to_reap(books, 200.0, {"connect_timeout": 120, "disconnect_timeout": 100})
    [('a', 'its page never connected in 120 s'), ('b', 'no page connected for 150 s')]
    """
    out = []
    for kernel_id, started in books["started"].items():
        gone = books["gone"].get(kernel_id)
        if kernel_id not in books["connected"]:
            if now - started > limits["connect_timeout"]:
                out.append((kernel_id,
                            f"its page never connected in {limits['connect_timeout']} s"))
        elif gone is not None and now - gone > limits["disconnect_timeout"]:
            out.append((kernel_id, f"no page connected for {now - gone:.0f} s"))
    return out


def _sessions(n: int) -> str:
    return f"{n} session" + ("" if n == 1 else "s")


def job_aware_kernel_manager(limits: dict | None = None):
    """Jupyter Server's kernel manager, except that

    - a kernel running a 3D job (its :class:`~nbapp.jobs.JobMarker` exists in
      ``$NBAPP_JOB_MARKERS``) is not shut down when its page closes or when it is culled: it
      is told it is orphaned, and shut down once the job has ended. Server shutdown
      (``shutdown_all``) is not delayed;
    - kernels are bounded (``limits``, default :data:`LIMITS`): past ``max_kernels`` in all or
      ``per_visitor`` for one browser, a page is answered "the server is busy" (HTTP 503) and
      starts nothing; a kernel whose page never connected is shut down after
      ``connect_timeout`` seconds;
    - each kernel learns its visitor (``NBAPP_VISITOR`` in its environment, from
      :func:`prelaunch`).
    """
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
    from tornado.web import HTTPError

    limits = {**LIMITS, **(limits or {})}

    class JobAwareKernelManager(AsyncMappingKernelManager):
        #: how often a deferred shutdown looks at the marker
        job_poll_s = 1.0
        max_kernels = limits["max_kernels"]
        per_visitor = limits["per_visitor"]
        connect_timeout = limits["connect_timeout"]

        def _books(self) -> dict:
            return self.__dict__.setdefault("_nbapp_books", {"visitor": {}, "started": {},
                                                             "connected": set(), "starting": [],
                                                             "gone": {}})

        async def start_kernel(self, *args, **kwargs):
            visitor = _HANDOFF.pop("visitor", None)
            books = self._books()
            # kernels that run, and those being started (counted before the first await)
            owners = [books["visitor"].get(k) for k in self.list_kernel_ids()] + books["starting"]
            if len(owners) >= self.max_kernels:
                raise HTTPError(503, reason=f"the server is busy: {_sessions(len(owners))} open "
                                            "(its limit); try again later")
            if visitor is not None:
                mine = owners.count(visitor)
                if mine >= self.per_visitor:
                    raise HTTPError(503, reason=f"the server is busy: you have "
                                                f"{_sessions(mine)} open (the limit per "
                                                "visitor); close a tab of this app and reload")
                if kwargs.get("env") is not None:
                    kwargs["env"] = {**kwargs["env"], VISITOR_ENV: visitor}
            books["starting"].append(visitor)
            try:
                kernel_id = await super().start_kernel(*args, **kwargs)
            finally:
                books["starting"].remove(visitor)
            books["visitor"][kernel_id] = visitor
            books["started"][kernel_id] = time.monotonic()
            if "_nbapp_reaper" not in self.__dict__:
                self._nbapp_reaper = asyncio.ensure_future(self._reap_unconnected())
            return kernel_id

        def notify_connect(self, kernel_id):
            books = self._books()
            books["connected"].add(kernel_id)
            books["gone"].pop(kernel_id, None)
            return super().notify_connect(kernel_id)

        def notify_disconnect(self, kernel_id):
            out = super().notify_disconnect(kernel_id)
            if self._kernel_connections.get(kernel_id, 0) <= 0:
                self._books()["gone"][kernel_id] = time.monotonic()  # its last page left
            return out

        async def _reap_unconnected(self):
            """Shut down kernels whose page never connected (a script's GET /) or whose pages
            all went away without closing (a crashed browser, a lost network): see
            :func:`kernels_to_reap`. A kernel running a 3D job finishes it first."""
            while True:
                await asyncio.sleep(max(0.5, min(10.0, self.connect_timeout / 4)))
                books = self._books()
                for kernel_id in [k for k in books["started"] if k not in self]:
                    for book in ("visitor", "started", "gone"):
                        books[book].pop(kernel_id, None)
                    books["connected"].discard(kernel_id)
                for kernel_id, why in kernels_to_reap(books, time.monotonic(), limits):
                    self.log.info("nbapp: kernel %s: %s; shutting it down", kernel_id, why)
                    books["started"].pop(kernel_id, None)
                    books["gone"].pop(kernel_id, None)
                    try:
                        await self.shutdown_kernel(kernel_id)
                    except Exception as exc:  # noqa: BLE001 - keep reaping the others
                        self.log.warning("nbapp: shutting down %s failed: %s", kernel_id, exc)

        async def shutdown_kernel(self, kernel_id, now=False, restart=False):
            marker = JobMarker.from_env(kernel_id)
            if restart or marker is None or not marker.running:
                return await super().shutdown_kernel(kernel_id, now=now, restart=restart)
            marker.orphan_path.touch()
            waiting = self.__dict__.setdefault("_nbapp_waiting", set())
            if kernel_id not in waiting:
                waiting.add(kernel_id)
                self.log.info("nbapp: kernel %s runs a 3D job; it is shut down when the job "
                              "ends", kernel_id)
                asyncio.ensure_future(self._shutdown_after_job(kernel_id, marker))
            return None

        async def _shutdown_after_job(self, kernel_id, marker):
            try:
                while marker.running and kernel_id in self:
                    if not await self._alive(kernel_id):
                        break
                    await asyncio.sleep(self.job_poll_s)
                marker.end()  # a kernel that died leaves its marker behind
                if kernel_id in self:
                    await super().shutdown_kernel(kernel_id)
            finally:
                self._nbapp_waiting.discard(kernel_id)

        async def _alive(self, kernel_id) -> bool:
            alive = self.get_kernel(kernel_id).is_alive()
            return bool(await alive) if asyncio.iscoroutine(alive) else bool(alive)

    return JobAwareKernelManager


_SECRET_PARAMS = re.compile(r"(?i)([?&](?:token|_xsrf)=)[^&#]*")


def log_request(handler) -> None:
    """Tornado's request log line, with the token (and XSRF token) of a URL replaced by
    ``[secret]``: Voila's default wrote every refused ``GET /?token=...`` in full.

    >>> from types import SimpleNamespace as N
    >>> import logging; from tornado.log import access_log
    >>> req = N(uri="/?token=abc&x=1", method="GET", remote_ip="127.0.0.1", request_time=lambda: 0.001)
    >>> access_log.warning = lambda *a: print(a[0] % a[1:])
    >>> log_request(N(get_status=lambda: 503, request=req))
    503 GET /?token=[secret]&x=1 (127.0.0.1) 1.00ms
    >>> del access_log.warning
    """
    from tornado.log import access_log

    status = handler.get_status()
    log = access_log.info if status < 400 else access_log.warning if status < 500 or \
        status == 503 else access_log.error
    req = handler.request
    log("%d %s %s (%s) %.2fms", status, req.method, _SECRET_PARAMS.sub(r"\1[secret]", req.uri),
        req.remote_ip, 1000.0 * req.request_time())


#: Stylesheet links of Voila's page template to a CDN (font icons its own bundle carries too).
_CDN_LINK = re.compile(rb'<link[^>]*href="https?://cdn\.jsdelivr\.net/[^"]*"[^>]*>[ \t]*\n?')


def no_cdn_transform():
    r"""A Tornado output transform that drops :data:`_CDN_LINK` s from the app's HTML: offline,
    or on a network without that CDN, they failed (two console errors, a stalled request), and a
    served page should send its visitors to no third party.

    >>> from types import SimpleNamespace as N
    >>> t = no_cdn_transform()(N())
    >>> html = b'<head><link rel="stylesheet" href="https://cdn.jsdelivr.net/x.css" />\n<b>'
    >>> t.transform_first_chunk(200, {"Content-Type": "text/html"}, html, True)[2]
    b'<head><b>'
    """
    from tornado.web import OutputTransform

    class NoCdnLinks(OutputTransform):
        def transform_first_chunk(self, status_code, headers, chunk, finishing):
            self._html = str(headers.get("Content-Type", "")).startswith("text/html")
            if self._html:
                chunk = self.transform_chunk(chunk, finishing)
                if "Content-Length" in headers:
                    if finishing:
                        headers["Content-Length"] = str(len(chunk))
                    else:
                        del headers["Content-Length"]
            return status_code, headers, chunk

        def transform_chunk(self, chunk, finishing):
            return _CDN_LINK.sub(b"", chunk) if self._html else chunk

    return NoCdnLinks


def voila_app_class():
    """Voila's application with :func:`no_cdn_transform` on its web application."""
    from voila.app import Voila

    class NbappVoila(Voila):
        def init_handlers(self):
            self.app.add_transform(no_cdn_transform())
            return super().init_handlers()

    return NbappVoila


def voila_config():
    """The traitlets config given to Voila besides its command line (what a command line cannot
    say: the prelaunch hook, the kernel manager with its limits, and the token, which comes
    from the wrapper's environment and is removed from it before any kernel starts)."""
    import json

    from traitlets.config import Config

    cfg = Config()
    cfg.VoilaConfiguration.prelaunch_hook = prelaunch
    limits = json.loads(os.environ.pop(_LIMITS_ENV, "{}") or "{}")
    cfg.VoilaConfiguration.multi_kernel_manager_class = job_aware_kernel_manager(limits)
    token = os.environ.pop(_SERVER_TOKEN_ENV, None)
    if token is not None:
        cfg.Voila.token = token
    cfg.Voila.tornado_settings = {"log_function": log_request}  # no token in the log
    return cfg


def voila_environment(data_root: Path, base: dict | None = None,
                      markers: Path | None = None, token: str | None = None,
                      models: tuple = (), root_models: bool = False,
                      limits: dict | None = None) -> dict:
    """The environment of the Voila process: ``base`` (default ``os.environ``) plus the data
    root, the folder of job markers, the token, the administrator's model folders, whether
    model files in the data root may load, and the kernel limits."""
    import json

    env = dict(os.environ if base is None else base)
    env.pop(TOKEN_ENV, None)  # kernels never see it
    env[DATA_ROOT_ENV] = str(data_root)
    if markers is not None:
        env[MARKERS_ENV] = str(markers)
    if token is not None:
        env[_SERVER_TOKEN_ENV] = token
    env[MODEL_DIRS_ENV] = os.pathsep.join(str(m) for m in models)
    env[ROOT_MODELS_ENV] = "1" if root_models else ""
    env[_LIMITS_ENV] = json.dumps({**LIMITS, **(limits or {})})
    return env


def resolve_model_dirs(models, data_root: Path) -> tuple[Path, ...]:
    """The administrator's model folders (``--models DIR``): existing folders, outside the data
    root (visitors must not be able to put files there through the page)."""
    found = []
    for m in models or ():
        folder = Path(m).expanduser()
        if not folder.is_dir():
            raise NbappError(f"--models {str(m)!r} is not an existing folder")
        folder = folder.resolve()
        if folder == data_root or data_root in folder.parents:
            raise NbappError(f"--models {str(m)!r} is inside the data root, where visitors' "
                             "files go: give a folder outside it")
        found.append(folder)
    return tuple(found)


def _check_limits(limits: dict) -> dict:
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NbappError(f"--{key.replace('_', '-')} must be a positive whole number, got "
                             f"{value!r}")
    return limits


def _open_browser_when_up(url: str, port: int, timeout_s: float = 60.0) -> None:
    """Open ``url`` once the server answers on ``port``, through a private temporary page (so
    that the token is not on a browser's command line)."""
    import webbrowser

    def wait_and_open():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        fd, page = tempfile.mkstemp(suffix=".html", prefix="nbapp-open-")
        with os.fdopen(fd, "w") as f:  # mkstemp: readable by this user only
            f.write(f'<meta http-equiv="refresh" content="0; url={url}">')
        webbrowser.open(Path(page).as_uri())

    threading.Thread(target=wait_and_open, daemon=True).start()


def serve(port: int = DEFAULT_PORT, open_browser: bool = True,
          data_root: str | os.PathLike | None = None,
          cull_idle_timeout: int = CULLING["cull_idle_timeout"], token: str | None = None,
          no_token: bool = False, models=(), allow_root_models: bool = False,
          max_kernels: int = LIMITS["max_kernels"], per_visitor: int = LIMITS["per_visitor"],
          connect_timeout: int = LIMITS["connect_timeout"],
          disconnect_timeout: int = LIMITS["disconnect_timeout"]) -> int:
    """Run the app with Voila until it stops (Ctrl-C or SIGTERM); 0 when Voila stopped cleanly.

    Visitors need the token (``token``, else ``$NBAPP_TOKEN``, else a new random one), given
    once in the printed URL; ``no_token`` serves without one (a warning says so).

    Raises :class:`~nbapp.errors.NbappError` for a missing data root, a taken port, missing app
    packages, bad limits or model folders, or a Voila that failed.
    """
    root = resolve_data_root(data_root)
    check_port(port)
    check_requirements()
    dirs = resolve_model_dirs(models, root)
    limits = _check_limits({"max_kernels": max_kernels, "per_visitor": per_visitor,
                            "connect_timeout": connect_timeout,
                            "disconnect_timeout": disconnect_timeout})
    if no_token:
        token = ""
        print("nbapp: WARNING: serving without a token: every account of this machine (and "
              "anyone its port is forwarded to) can use the app", file=sys.stderr, flush=True)
    else:
        token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
        if not _COOKIE_VALUE.fullmatch(token.ljust(32, "_")) or len(token) < 8:
            raise NbappError("--token must be 8 to 64 letters, digits, '-' or '_'")
    cmd = voila_command(port, False, cull_idle_timeout=cull_idle_timeout)
    url = f"http://{HOST}:{port}/" + (f"?token={token}" if token else "")
    print(f"nbapp: serving the app at {url} (data root {root}"
          + ("" if data_root is not None else ": put your images there, or give --data-root DIR")
          + "); Ctrl-C stops it", file=sys.stderr, flush=True)
    if open_browser:
        _open_browser_when_up(url, port)
    markers = Path(tempfile.mkdtemp(prefix="nbapp-jobs-"))
    try:
        return _run_voila(cmd, voila_environment(root, markers=markers, token=token,
                                                 models=dirs, root_models=allow_root_models,
                                                 limits=limits))
    finally:
        shutil.rmtree(markers, ignore_errors=True)


def _run_voila(cmd: list, env: dict) -> int:
    # Ctrl-C in a terminal signals the whole foreground group. Voila itself ignores SIGINT (the
    # disposition is inherited through exec) and stops on the SIGTERM this wrapper sends:
    # a SIGINT that reached Voila between opening its port and starting its loop, or during
    # its imports, ended it with a KeyboardInterrupt traceback. Its kernels set their own.
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, env=env)
    finally:
        signal.signal(signal.SIGINT, previous_int)

    def forward(signum, _frame):  # stop Voila cleanly: it shuts its kernels down on SIGTERM
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # Voila gets the same SIGINT from the terminal
                forward(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if rc not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise NbappError(f"Voila stopped with exit status {rc}; see its messages above")
    return 0


if __name__ == "__main__":  # python -m nbapp.serve VOILA_ARGS (what voila_command runs)
    voila_app_class().launch_instance(argv=sys.argv[1:], config=voila_config())
