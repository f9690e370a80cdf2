"""Threads of the app: the ONE function that changes widgets from other threads, and the
latest-request-wins runner of slider work.

Rule (DESIGN "Errors", STYLE #16): code running outside the kernel's main thread never touches
a widget or the app state directly; it hands a callable to :func:`call_in_ui`. In a kernel the
callable is scheduled on the kernel's event loop (the main thread); without a kernel (tests,
scripts) it runs at once.
"""

from __future__ import annotations

import threading
import traceback
from pathlib import Path
from typing import Callable

__all__ = ["call_in_ui", "LatestRunner", "kernel_id"]

_error_sinks: list[Callable[[str], None]] = []


def _kernel_loop():
    """The running kernel's IO loop (tornado), or None outside a kernel."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    ip = get_ipython()
    kernel = getattr(ip, "kernel", None) if ip is not None else None
    return getattr(kernel, "io_loop", None)


def kernel_id() -> str | None:
    """The id of the Jupyter kernel this runs in (from its connection file), or None.

    Outside a kernel nothing of ipykernel is imported (importing its kernel app replaces the
    comm manager that widgets made earlier are registered with)."""
    if _kernel_loop() is None:
        return None
    from ipykernel.kernelapp import IPKernelApp

    if not IPKernelApp.initialized():
        return None
    name = Path(IPKernelApp.instance().connection_file or "").stem
    return name[len("kernel-"):] if name.startswith("kernel-") else None


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - a failing view update is reported, not lost in a thread
        text = traceback.format_exc()
        for sink in list(_error_sinks):
            sink(text)
        if not _error_sinks:
            raise


def call_in_ui(fn: Callable[[], None]) -> None:
    """Run ``fn()`` where widgets may be changed: now if this is the main thread (or there is no
    kernel), else on the kernel's event loop. Exceptions go to the registered error sinks (the
    app's log)."""
    loop = _kernel_loop()
    if loop is None or threading.current_thread() is threading.main_thread():
        _guarded(fn)
    else:
        loop.add_callback(_guarded, fn)


def add_error_sink(sink: Callable[[str], None]) -> None:
    """Register a callable that receives tracebacks of failed UI updates."""
    _error_sinks.append(sink)


def remove_error_sink(sink: Callable[[str], None]) -> None:
    if sink in _error_sinks:
        _error_sinks.remove(sink)


class LatestRunner:
    """One worker thread for slider work: per key, the latest request wins.

    ``submit(key, fn, deliver)`` replaces any pending request of the same key; requests arriving
    within ``debounce_s`` of each other are coalesced into the last one. When ``fn()`` returns,
    ``deliver(result, error)`` is called (from the worker thread) only if no newer request of the
    same key was submitted meanwhile: stale results are dropped.

    ``synchronous=True`` runs each request at once in the caller's thread (tests, scripts).

    >>> r = LatestRunner(synchronous=True)
    >>> got = []
    >>> _ = r.submit("a", lambda: 1 + 1, lambda res, err: got.append(res))
    >>> got
    [2]
    """

    def __init__(self, debounce_s: float = 0.025, synchronous: bool = False):
        self.debounce_s = float(debounce_s)
        self.synchronous = synchronous
        self._cond = threading.Condition()
        self._pending: dict = {}  # key -> (seq, fn, deliver), insertion ordered
        self._latest: dict = {}  # key -> newest seq submitted
        self._seq = 0
        self._busy = False
        self._flush = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ran: list = []  # (key, seq) of every request actually run (for tests and logs)

    def submit(self, key, fn: Callable, deliver: Callable) -> int:
        """Queue ``fn`` under ``key`` (replacing a pending one); return its sequence number."""
        with self._cond:
            self._seq += 1
            seq = self._seq
            self._latest[key] = seq
            if self.synchronous:
                self._pending.pop(key, None)
            else:
                self._pending.pop(key, None)
                self._pending[key] = (seq, fn, deliver)
                self._ensure_thread()
                self._cond.notify_all()
                return seq
        self._execute(key, seq, fn, deliver)
        return seq

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="nbapp-ui-worker", daemon=True)
            self._thread.start()

    def _execute(self, key, seq, fn, deliver) -> None:
        self.ran.append((key, seq))
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to deliver
            error = exc
        with self._cond:
            stale = self._latest.get(key) != seq
        if not stale:
            deliver(result, error)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                # debounce: wait until no request arrived for debounce_s (or flush / stop)
                while self.debounce_s > 0 and not self._flush and not self._stop:
                    before = self._seq
                    self._cond.wait(self.debounce_s)
                    if self._seq == before:
                        break
                if self._stop:
                    return
                self._flush = False
                key = next(iter(self._pending))
                seq, fn, deliver = self._pending.pop(key)
                self._busy = True
            try:
                self._execute(key, seq, fn, deliver)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self) -> None:
        """End the current debounce wait now."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running (flushes the debounce); True if idle."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()
            idle = self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)
            if idle:
                self._flush = False
            return idle

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Drop pending requests and stop the worker thread (after its current request)."""
        with self._cond:
            self._pending.clear()
            self._stop = True
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
