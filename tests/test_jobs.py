"""The job runner: snapshots, cancel, failures, one job at a time. Events, never sleeps."""

from __future__ import annotations

import threading
import time

import pytest

from nbapp.jobs import JobBusyError, JobRunner, JobState
from nbapp.volume import Progress


def steps(n, plane="xy", result="ok", gate=None, closed=None, fail_at=None):
    def job():
        try:
            for i in range(1, n + 1):
                if gate is not None:
                    gate(i)
                if fail_at == i:
                    raise ValueError(f"boom at {i}")
                yield Progress(plane, "network", i, n)
            return result
        finally:
            if closed is not None:
                closed.set()
    return job


def test_synchronous_job_publishes_exact_snapshot_sequence():
    seen = []
    runner = JobRunner(on_update=seen.append, synchronous=True)
    job_id = runner.submit(steps(3))
    assert [(s.state, s.stage, s.done, s.total) for s in seen] == [
        (JobState.RUNNING, "starting", 0, 0),
        (JobState.RUNNING, "network", 1, 3),
        (JobState.RUNNING, "network", 2, 3),
        (JobState.RUNNING, "network", 3, 3),
        (JobState.DONE, "done", 3, 3),
    ]
    final = runner.snapshot
    assert final.job_id == job_id and final.result == "ok" and final.finished
    assert final.planes == {"xy": (3, 3)} and final.eta == 0.0
    with pytest.raises(dataclasses_error()):
        final.state = JobState.IDLE  # snapshots are immutable


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_eta_is_reported_while_running():
    seen = []
    JobRunner(on_update=seen.append, synchronous=True).submit(steps(4))
    running = [s for s in seen if s.stage == "network" and s.done < 4]
    assert all(s.eta is not None and s.eta >= 0 for s in running)


def test_cancel_stops_the_job_and_leaves_no_thread():
    reached, release, closed = threading.Event(), threading.Event(), threading.Event()

    def gate(i):
        if i == 2:
            reached.set()
            release.wait()

    runner = JobRunner()
    runner.submit(steps(100, gate=gate, closed=closed))
    assert reached.wait(10)
    runner.cancel()
    release.set()
    snap = runner.wait(10)
    assert snap.state == JobState.CANCELLED and snap.done <= 2
    assert closed.is_set()  # the generator was closed: its cleanup ran
    assert not runner._thread.is_alive()


def test_failed_job_reports_its_error():
    runner = JobRunner()
    runner.submit(steps(5, fail_at=3))
    snap = runner.wait(10)
    assert snap.state == JobState.FAILED and snap.error == "ValueError: boom at 3"
    assert snap.done == 2


def test_second_job_is_refused_while_one_runs_then_accepted():
    reached, release = threading.Event(), threading.Event()

    def gate(i):
        reached.set()
        release.wait()

    runner = JobRunner()
    runner.submit(steps(1, gate=gate))
    assert reached.wait(10)
    with pytest.raises(JobBusyError, match="already running"):
        runner.submit(steps(1))
    release.set()
    assert runner.wait(10).state == JobState.DONE
    runner.submit(steps(2, result="second"))
    assert runner.wait(10).result == "second"


def test_broken_observer_does_not_kill_the_job(capsys):
    def bad(_snap):
        raise RuntimeError("observer bug")

    runner = JobRunner(on_update=bad, synchronous=True)
    runner.submit(steps(2))
    assert runner.snapshot.state == JobState.DONE
    assert "observer bug" in capsys.readouterr().err


def test_shutdown_cancels_and_joins():
    reached, release = threading.Event(), threading.Event()

    def gate(i):
        reached.set()
        release.wait()

    runner = JobRunner()
    runner.submit(steps(10, gate=gate))
    assert reached.wait(10)
    runner.cancel()
    release.set()
    runner.shutdown(10)
    assert runner.snapshot.state == JobState.CANCELLED
    assert not runner.busy


def test_callback_steps_reports_at_most_once_per_interval():
    """The page's fine-tune redrew its loss curve after every step (about 3 a second) and
    trained 15 % slower than the command line; ``min_interval_s`` spaces the reports."""
    from nbapp.jobs import callback_steps

    def fn(report, cancel):
        for i in range(60):  # 60 reports over about 0.6 s
            time.sleep(0.01)
            report(i + 1, 60)
        return "done"

    def drain(gen):
        steps = []
        try:
            while True:
                steps.append(next(gen))
        except StopIteration as stop:
            return steps, stop.value

    many, result = drain(callback_steps(fn, "x", poll_s=0.2))
    assert result == "done" and len(many) >= 20  # every report wakes it
    few, result = drain(callback_steps(fn, "x", poll_s=0.2, min_interval_s=0.25))
    assert result == "done" and 1 <= len(few) <= 4, len(few)
    assert [s.done for s in few] == sorted(s.done for s in few)
