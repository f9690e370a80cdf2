"""The job runner: runs long computations (generators that yield progress) in the background.

It owns the threads and nothing else (STYLE #11): one job at a time (a second submit while one
runs is refused), cancel at any time, wait, shutdown, and a synchronous mode for tests. Each
change of state is published as a new immutable :class:`Snapshot` (STYLE #12) to an optional
callback, called from the worker thread: a UI must marshal it to its own thread.
No widgets here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator

from nbapp.errors import NbappError
from nbapp.memory import is_out_of_memory, out_of_memory_message

__all__ = ["JobState", "Snapshot", "JobRunner", "JobBusyError", "JobMarker", "MARKERS_ENV",
           "Step", "callback_steps"]

#: Environment variable naming the folder where a served app's kernels mark a running job; set
#: by ``nbapp app`` (:mod:`nbapp.serve`) for the Voila server and the kernels it starts.
MARKERS_ENV = "NBAPP_JOB_MARKERS"


class JobMarker:
    """A file that tells the server a kernel runs a long job, and tells the kernel its page is
    gone.

    While ``KEY.job`` exists the server does not shut the kernel down when its page closes (or
    when it is culled); it writes ``KEY.orphaned`` instead and shuts the kernel down once the
    job has ended and :meth:`end` removed the marker. ``KEY`` is the kernel id.
    """

    def __init__(self, folder: str | os.PathLike, key: str):
        self.path = Path(folder) / f"{key}.job"
        self.orphan_path = Path(folder) / f"{key}.orphaned"

    @classmethod
    def from_env(cls, key: str | None) -> "JobMarker | None":
        """The marker for ``key`` in ``$NBAPP_JOB_MARKERS``; None when not served or no key."""
        folder = os.environ.get(MARKERS_ENV)
        if not folder or not key or not Path(folder).is_dir():
            return None
        return cls(folder, key)

    @property
    def running(self) -> bool:
        return self.path.exists()

    @property
    def orphaned(self) -> bool:
        """True once the page was closed while the job ran."""
        return self.orphan_path.exists()

    def begin(self) -> None:
        self.orphan_path.unlink(missing_ok=True)
        self.path.write_text(str(os.getpid()))

    def end(self) -> None:
        self.path.unlink(missing_ok=True)
        self.orphan_path.unlink(missing_ok=True)


class JobBusyError(NbappError, RuntimeError):
    """A job was submitted while another one runs."""


class JobState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Snapshot:
    """The state of a job at one moment (replaced, never mutated).

    ``planes`` maps each plane seen so far to ``(done, total)`` of its current stage.
    """

    job_id: int = 0
    state: JobState = JobState.IDLE
    plane: str | None = None
    stage: str | None = None
    done: int = 0
    total: int = 0
    planes: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    started: float | None = None
    elapsed: float = 0.0
    eta: float | None = None
    error: str | None = None
    result: Any = None
    detail: Any = None  # what the last step carried besides its counts (e.g. a loss curve)

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def _eta(elapsed: float, done: int, total: int) -> float | None:
    if done <= 0 or total <= 0 or done > total:
        return None
    return elapsed * (total - done) / done


class JobRunner:
    """Run one generator-based job at a time in a worker thread.

    Parameters
    ----------
    on_update : callable, optional
        Called with every new :class:`Snapshot` (from the worker thread).
    synchronous : bool
        Run jobs in the caller's thread (tests, scripts).

    A job is a zero-argument callable returning a generator; the generator yields objects with
    ``plane``, ``stage``, ``done`` and ``total`` attributes (e.g. :class:`nbapp.volume.Progress`)
    and returns the result. It is closed (``GeneratorExit`` inside it) when cancelled.
    """

    def __init__(self, on_update: Callable[[Snapshot], None] | None = None, synchronous: bool = False):
        self.on_update = on_update
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._finished.set()
        self._next_id = 1

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def busy(self) -> bool:
        return not self._finished.is_set()

    def _publish(self, **changes) -> Snapshot:
        with self._lock:
            snap = dataclasses.replace(self._snapshot, **changes)
            if snap.started is not None and not self._snapshot.finished:
                snap = dataclasses.replace(snap, elapsed=time.monotonic() - snap.started)
            self._snapshot = snap
        if self.on_update is not None:
            try:
                self.on_update(snap)
            except Exception:  # a broken observer must not kill the job; it is reported once
                traceback.print_exc()
        return snap

    def submit(self, job: Callable[[], Generator], name: str = "") -> int:
        """Start ``job``; return its id. Raises :class:`JobBusyError` while another job runs."""
        with self._lock:
            if not self._finished.is_set():
                raise JobBusyError("a job is already running: wait for it or cancel it first")
            self._finished.clear()
            self._cancel.clear()
            job_id = self._next_id
            self._next_id += 1
        self._publish(job_id=job_id, state=JobState.RUNNING, plane=None, stage="starting",
                      done=0, total=0, planes={}, stages={}, started=time.monotonic(),
                      elapsed=0.0, eta=None, error=None, result=None)
        if self.synchronous:
            self._run(job)
        else:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"nbapp-job-{job_id}",
                                            daemon=True)
            self._thread.start()
        return job_id

    def _run(self, job: Callable[[], Generator]) -> None:
        gen = None
        try:
            gen = job()
            while True:
                if self._cancel.is_set():
                    gen.close()
                    self._publish(state=JobState.CANCELLED, error="cancelled by the user", eta=None)
                    return
                try:
                    p = next(gen)
                except StopIteration as stop:
                    self._publish(state=JobState.DONE, result=stop.value, stage="done", eta=0.0)
                    return
                snap = self._snapshot
                planes = dict(snap.planes)
                planes[p.plane] = (p.done, p.total)
                stages = dict(snap.stages)
                stages[p.plane] = p.stage
                elapsed = time.monotonic() - (snap.started or time.monotonic())
                self._publish(plane=p.plane, stage=p.stage, done=p.done, total=p.total,
                              planes=planes, stages=stages, detail=getattr(p, "detail", None),
                              eta=_eta(elapsed, p.done, p.total) if p.stage == "network" else None)
        except BaseException as exc:  # noqa: BLE001 - a failed job reports any error it had
            if gen is not None:
                gen.close()
            msg = str(exc) if isinstance(exc, NbappError) else f"{type(exc).__name__}: {exc}"
            if is_out_of_memory(exc):
                msg = out_of_memory_message(exc)
            self._publish(state=JobState.FAILED, error=msg, eta=None)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._finished.set()

    def cancel(self) -> None:
        """Ask the running job to stop at its next step (no-op when idle)."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> Snapshot:
        """Block until the current job ends (or ``timeout`` passes); return the snapshot."""
        self._finished.wait(timeout)
        t = self._thread
        if t is not None and self._finished.is_set():
            t.join(timeout)
        return self._snapshot

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Cancel any running job and wait for its thread to end."""
        self.cancel()
        self.wait(timeout)


@dataclass(frozen=True)
class Step:
    """One progress report of a job that is not a 3D job (a download, a training run)."""

    plane: str
    stage: str
    done: int
    total: int
    detail: Any = None


def callback_steps(fn: Callable, stage: str, poll_s: float = 0.2,
                   min_interval_s: float = 0.0) -> Generator:
    """Turn ``fn(report, cancel)``, a blocking call that reports progress through
    ``report(done, total, detail=None)`` and stops when the ``cancel`` event is set, into a
    job for :class:`JobRunner`: ``fn`` runs in a helper thread, the generator yields a
    :class:`Step` at least every ``poll_s`` (but not more often than every ``min_interval_s``)
    and returns ``fn``'s result (or raises its error). Closing the generator (the job
    cancelled) sets ``cancel`` and waits for ``fn`` to stop."""
    latest = [Step(stage, stage, 0, 0)]
    box: dict = {}
    cancel = threading.Event()
    changed = threading.Event()

    def report(done, total, detail=None) -> None:
        latest[0] = Step(stage, stage, int(done), int(total or 0), detail)
        changed.set()

    def target() -> None:
        try:
            box["result"] = fn(report, cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread below
            box["error"] = exc
        finally:
            changed.set()

    helper = threading.Thread(target=target, name=f"nbapp-{stage}", daemon=True)
    helper.start()
    try:
        last = -math.inf
        while helper.is_alive():
            changed.wait(max(poll_s, min_interval_s - (time.monotonic() - last)))
            changed.clear()
            if time.monotonic() - last < min_interval_s:
                continue
            last = time.monotonic()
            yield latest[0]
        if "error" in box:
            raise box["error"]
        return box.get("result")
    finally:
        if helper.is_alive():
            cancel.set()
            helper.join(30)


class DevicePool:
    """One worker thread per engine (one engine per device) computing network outputs.

    Blocks of slices are dealt to whichever worker is free; :meth:`heads` yields the outputs in
    slice order, so the caller's post-processing runs in parallel with the network and adding
    devices keeps scaling. At most ``prefetch`` blocks per worker are held ahead of the consumer
    (bounded memory). Closing the iterator (cancel) stops and joins the workers.

    Use it as ``heads_source`` of :func:`nbapp.volume.volume_steps`.
    """

    def __init__(self, engines: list, prefetch: int = 2):
        if not engines:
            raise ValueError("DevicePool needs at least one engine")
        self.engines = list(engines)
        self.prefetch = max(1, int(prefetch))

    def __call__(self, _engine, volume, plane: str, sp, intensity):
        return self.heads(volume, plane, sp, intensity)

    def heads(self, volume, plane: str, sp, intensity):
        """Yield ``(i, Heads)`` for every slice of ``plane``, in order."""
        from nbapp.volume import infer_batch, plane_axis, slice_batches

        n = volume.shape[plane_axis(plane)]
        batches = slice_batches(n, self.engines[0].batch_size)
        results: dict[int, list] = {}
        errors: list[BaseException] = []
        cond = threading.Condition()
        stop = threading.Event()
        slots = threading.Semaphore(self.prefetch * len(self.engines))
        counter = iter(range(len(batches)))

        def worker(engine):
            while not stop.is_set():
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                with cond:
                    b = next(counter, None)
                if b is None:
                    slots.release()
                    return
                try:
                    out = infer_batch(engine, volume, plane, batches[b], sp, intensity)
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                    with cond:
                        errors.append(exc)
                        cond.notify_all()
                    return
                with cond:
                    results[b] = out
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(e,), name=f"nbapp-device-{e.device}",
                                    daemon=True) for e in self.engines]
        for t in threads:
            t.start()
        try:
            for b, batch in enumerate(batches):
                with cond:
                    while b not in results and not errors:
                        cond.wait()
                    if errors:
                        raise errors[0]
                    out = results.pop(b)
                slots.release()
                yield from zip(batch, out)
        finally:
            stop.set()
            for t in threads:
                t.join()
