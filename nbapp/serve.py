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
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from nbapp.errors import NbappError
from nbapp.jobs import MARKERS_ENV, JobMarker

__all__ = ["DEFAULT_PORT", "DATA_ROOT_ENV", "CULLING", "app_notebook", "voila_command",
           "voila_config", "voila_environment", "set_xsrf_cookie", "check_requirements",
           "check_port", "resolve_data_root", "serve", "culling", "job_aware_kernel_manager"]

DEFAULT_PORT = 8866
HOST = "127.0.0.1"
#: Environment variable that gives the app's kernel its data root.
DATA_ROOT_ENV = "NBAPP_DATA_ROOT"
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


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The absolute data root (default: the current folder); it must be an existing folder."""
    root = Path(data_root if data_root is not None else os.getcwd()).expanduser()
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


def set_xsrf_cookie(request_handler, notebook=None, cwd=None):
    """Voila ``prelaunch_hook``: give the page Tornado's ``_xsrf`` cookie.

    Voila's page posts the kernel shutdown when its tab closes, with the token from that cookie;
    Voila never sets it, so the post failed the XSRF check and the kernel lived on until culled
    (voila issue 1458). Reading ``xsrf_token`` sets the cookie; the notebook is unchanged.
    """
    request_handler.xsrf_token  # noqa: B018 - the property sets the cookie
    return None


def job_aware_kernel_manager():
    """Jupyter Server's kernel manager, except that a kernel running a 3D job (its
    :class:`~nbapp.jobs.JobMarker` exists in ``$NBAPP_JOB_MARKERS``) is not shut down when its
    page closes or when it is culled: it is told it is orphaned, and shut down once the job
    has ended. Server shutdown (``shutdown_all``) is not delayed."""
    from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

    class JobAwareKernelManager(AsyncMappingKernelManager):
        #: how often a deferred shutdown looks at the marker
        job_poll_s = 1.0

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


def voila_config():
    """The traitlets config given to Voila besides its command line (what a command line cannot
    say: the prelaunch hook and the job-aware kernel manager)."""
    from traitlets.config import Config

    cfg = Config()
    cfg.VoilaConfiguration.prelaunch_hook = set_xsrf_cookie
    cfg.VoilaConfiguration.multi_kernel_manager_class = job_aware_kernel_manager()
    return cfg


def voila_environment(data_root: Path, base: dict | None = None,
                      markers: Path | None = None) -> dict:
    """The environment of the Voila process: ``base`` (default ``os.environ``) plus the data
    root and the folder of job markers."""
    env = dict(os.environ if base is None else base)
    env[DATA_ROOT_ENV] = str(data_root)
    if markers is not None:
        env[MARKERS_ENV] = str(markers)
    return env


def serve(port: int = DEFAULT_PORT, open_browser: bool = True,
          data_root: str | os.PathLike | None = None,
          cull_idle_timeout: int = CULLING["cull_idle_timeout"]) -> int:
    """Run the app with Voila until it stops (Ctrl-C or SIGTERM); 0 when Voila stopped cleanly.

    Raises :class:`~nbapp.errors.NbappError` for a missing data root, a taken port, missing app
    packages, or a Voila that failed.
    """
    root = resolve_data_root(data_root)
    check_port(port)
    check_requirements()
    cmd = voila_command(port, open_browser, cull_idle_timeout=cull_idle_timeout)
    print(f"nbapp: serving the app at http://{HOST}:{port}/ (data root {root}); "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    markers = Path(tempfile.mkdtemp(prefix="nbapp-jobs-"))
    try:
        return _run_voila(cmd, voila_environment(root, markers=markers))
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
    from voila.app import Voila

    Voila.launch_instance(argv=sys.argv[1:], config=voila_config())
