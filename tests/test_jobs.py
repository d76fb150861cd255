"""The background worker: order, progress, cancel, failure, thread safety. Each test takes milliseconds."""
import threading
import time

import pytest

from factorlab import jobs
from factorlab.jobs import (CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobManager, UnknownJobError,
                            get_manager)

TIMEOUT = 5.0


def gated(started: threading.Event, release: threading.Event, result: dict | None = None):
    """A job that signals it started, then blocks until released (no sleeping in tests)."""
    def fn(ctx):
        started.set()
        assert release.wait(TIMEOUT)
        return result or {}
    return fn


def test_jobs_run_one_at_a_time_in_submission_order():
    manager = JobManager()
    order, overlap, lock = [], [], threading.Lock()
    running = [0]

    def make(tag):
        def fn(ctx):
            with lock:
                running[0] += 1
                overlap.append(running[0])
                order.append(tag)
            time.sleep(0.01)
            with lock:
                running[0] -= 1
            return {"tag": tag}
        return fn

    ids = [manager.submit("train", f"job{i}", make(i)) for i in range(4)]
    infos = [manager.wait(i, TIMEOUT) for i in ids]
    assert order == [0, 1, 2, 3]
    assert max(overlap) == 1
    assert [info.state for info in infos] == [DONE] * 4
    assert [info.result["tag"] for info in infos] == [0, 1, 2, 3]
    assert all(info.started <= info.finished for info in infos)
    assert infos[0].finished <= infos[1].started


def test_second_job_waits_in_queue_while_first_runs():
    manager = JobManager()
    started, release = threading.Event(), threading.Event()
    first = manager.submit("train", "first", gated(started, release))
    second = manager.submit("train", "second", lambda ctx: {"ok": True})
    assert started.wait(TIMEOUT)
    assert manager.get(first).state == RUNNING
    assert manager.get(second).state == QUEUED
    assert manager.active().id == first
    assert [j.id for j in manager.jobs()] == [second, first]  # newest first
    release.set()
    assert manager.wait(second, TIMEOUT).result == {"ok": True}
    assert manager.active().id == second  # nothing running: the most recent job


def test_progress_eta_tokens_per_second_and_history(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(jobs, "progress_clock", lambda: clock[0])
    manager = JobManager()

    def fn(ctx):
        ctx.report(phase="train", step=0, total=10, tokens=0, message="starting")
        for step in range(1, 5):
            clock[0] += 2.0  # each step takes 2 s and 1000 tokens
            ctx.report(step=step, tokens=1000 * step, losses={"route": 1.0 / step, "balance": 0.5})
        return {}

    info = manager.wait(manager.submit("train", "p", fn), TIMEOUT)
    progress = info.progress
    assert progress["step"] == 4 and progress["total"] == 10
    assert progress["fraction"] == pytest.approx(0.4)
    assert progress["tokens_per_s"] == pytest.approx(500.0)  # 4000 tokens in 8 s
    assert progress["eta_s"] == pytest.approx(12.0)  # 6 steps left at 2 s each
    assert progress["losses"] == {"route": pytest.approx(0.25), "balance": 0.5}
    assert progress["message"] == "starting" and progress["phase"] == "train"
    assert len(info.history) == 5
    assert [h["step"] for h in info.history] == [0, 1, 2, 3, 4]
    assert [h["losses"].get("route") for h in info.history[1:]] == pytest.approx([1, 0.5, 1 / 3, 0.25])
    assert info.to_dict()["progress"]["step"] == 4


def test_new_phase_resets_counters_and_rates(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(jobs, "progress_clock", lambda: clock[0])
    manager = JobManager()
    seen = {}

    def fn(ctx):
        ctx.report(phase="data", step=0, total=2)
        clock[0] += 10.0
        ctx.report(step=2, tokens=100)
        ctx.report(phase="train", step=0, total=100)
        seen["after_switch"] = manager.get(ctx.job_id).progress
        clock[0] += 1.0
        ctx.report(step=10, tokens=50)
        return {}

    progress = manager.wait(manager.submit("train", "phases", fn), TIMEOUT).progress
    assert seen["after_switch"]["tokens"] is None and seen["after_switch"]["fraction"] == 0
    assert progress["eta_s"] == pytest.approx(9.0)  # 10 steps/s in this phase, 90 left
    assert progress["tokens_per_s"] == pytest.approx(50.0)


def test_cancel_queued_job_immediately():
    manager = JobManager()
    started, release = threading.Event(), threading.Event()
    first = manager.submit("train", "blocker", gated(started, release))
    ran = threading.Event()
    queued = manager.submit("train", "victim", lambda ctx: ran.set())
    assert started.wait(TIMEOUT)
    assert manager.cancel(queued) is True
    assert manager.get(queued).state == CANCELLED  # at once, while the first job still runs
    release.set()
    assert manager.wait(first, TIMEOUT).state == DONE
    assert not ran.is_set()
    assert manager.cancel(queued) is False  # already finished


def test_cancel_running_job_within_one_step():
    manager = JobManager()
    at_step = threading.Event()
    cancel_seen_at = []
    steps_done = []

    def loop(ctx):
        for step in range(10_000):
            ctx.check_cancel()
            steps_done.append(step)
            if step == 3:
                at_step.set()
                while not ctx.cancelled:  # the "step" in progress when cancel arrives
                    time.sleep(0.001)
                cancel_seen_at.append(step)
            ctx.report(step=step + 1, total=10_000)
        return {"finished": True}

    job = manager.submit("train", "loop", loop)
    assert at_step.wait(TIMEOUT)
    assert manager.cancel(job) is True
    info = manager.wait(job, TIMEOUT)
    assert info.state == CANCELLED
    assert info.result is None and info.error is None
    assert steps_done == [0, 1, 2, 3]  # the check at the start of the next step stopped it
    assert cancel_seen_at == [3]


def test_failing_job_is_failed_and_worker_keeps_running():
    manager = JobManager()

    def boom(ctx):
        ctx.report(step=1, total=2)
        raise RuntimeError("out of memory at step 1: lower the batch size")

    bad = manager.submit("train", "bad", boom)
    good = manager.submit("eval", "good", lambda ctx: {"acc": 0.5})
    bad_info = manager.wait(bad, TIMEOUT)
    assert bad_info.state == FAILED
    assert bad_info.error == "out of memory at step 1: lower the batch size"
    assert "RuntimeError" in bad_info.traceback and "boom" in bad_info.traceback
    assert manager.wait(good, TIMEOUT).state == DONE


def test_job_returning_a_non_dict_fails_with_a_clear_message():
    manager = JobManager()
    info = manager.wait(manager.submit("x", "y", lambda ctx: [1, 2]), TIMEOUT)
    assert info.state == FAILED and "must return a dict" in info.error


def test_unknown_job_id_is_a_clear_error():
    with pytest.raises(UnknownJobError, match="no job with id 'nope'"):
        JobManager().get("nope")


def test_only_the_last_finished_jobs_are_kept():
    manager = JobManager(max_finished=3)
    ids = [manager.submit("x", str(i), lambda ctx: {}) for i in range(6)]
    manager.wait(ids[-1], TIMEOUT)
    assert [j.id for j in manager.jobs()] == ids[:2:-1]
    with pytest.raises(UnknownJobError):
        manager.get(ids[0])


def test_snapshots_are_copies_and_reads_are_safe_while_a_job_runs():
    manager = JobManager()
    stop = threading.Event()

    def busy(ctx):
        step = 0
        while not stop.is_set():
            step += 1
            ctx.report(step=step, total=10**9, tokens=step, losses={"loss": 1.0 / step})
        return {"steps": step}

    job = manager.submit("train", "busy", busy, params={"lr": 1e-3})
    errors = []

    def reader():
        try:
            for _ in range(300):
                info = manager.get(job)
                info.params["lr"] = 123  # mutating a snapshot must not touch the job
                info.history.clear()
                steps = [h["step"] for h in manager.get(job).history]
                assert steps == sorted(steps) and len(steps) <= jobs.MAX_HISTORY
                manager.jobs(), manager.active()
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(TIMEOUT)
    stop.set()
    info = manager.wait(job, TIMEOUT)
    assert errors == []
    assert info.state == DONE and info.params == {"lr": 1e-3}
    assert len(info.history) > 0


def test_get_manager_is_a_process_wide_singleton():
    results = []
    threads = [threading.Thread(target=lambda: results.append(get_manager())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len({id(m) for m in results}) == 1 and results[0] is get_manager()
