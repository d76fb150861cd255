"""The background worker: one thread runs jobs one at a time from a FIFO queue.

A job is a callable `fn(ctx: JobContext) -> dict`; it reports progress through `ctx.report(...)`
and calls `ctx.check_cancel()` once per step, so a cancel is honoured within one step. States:
queued -> running -> done | failed | cancelled (a queued job can go straight to cancelled).

A failed or cancelled job must never corrupt an earlier run: job functions write runs only
through `factorlab.runs.save_run` (a temporary folder renamed into place, all or nothing) at the
very end, after their last `check_cancel()`, and update metrics only with `runs.update_metrics`.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = (DONE, FAILED, CANCELLED)
MAX_FINISHED = 50  # finished jobs kept in memory (older ones are forgotten)
MAX_HISTORY = 4000  # progress records kept per job; beyond that every other one is dropped
progress_clock = time.monotonic  # the clock of rates and ETAs (tests substitute a fake one)


class JobCancelled(Exception):
    """Raised by JobContext.check_cancel() inside a job whose cancel was requested."""


class UnknownJobError(LookupError):
    """No job with this id (it never existed, or it was forgotten after MAX_FINISHED newer ones)."""


@dataclass
class JobInfo:
    """A snapshot of one job, safe to read from any thread (it is a copy)."""

    id: str
    kind: str
    name: str
    state: str
    params: dict
    owner: str | None  # who submitted it (the app: a browser session), None for anyone
    progress: dict
    history: list[dict]
    error: str | None
    traceback: str | None
    result: dict | None
    created: float
    started: float | None
    finished: float | None

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _empty_progress() -> dict:
    return {"step": None, "total": None, "tokens": None, "tokens_per_s": None, "eta_s": None,
            "elapsed_s": 0.0, "losses": {}, "message": None, "phase": None, "fraction": None}


@dataclass
class _Job:
    id: str
    kind: str
    name: str
    fn: Callable[["JobContext"], dict]
    params: dict
    owner: str | None = None
    state: str = QUEUED
    progress: dict = field(default_factory=_empty_progress)
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    result: dict | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    # where the current phase began (progress_clock(), step, tokens): rates and ETA are per phase
    phase_base: tuple[float, int, int] = (0.0, 0, 0)

    def snapshot(self) -> JobInfo:
        progress = {**self.progress, "losses": dict(self.progress["losses"])}
        if self.started is not None:  # elapsed time runs on between reports
            progress["elapsed_s"] = (self.finished or time.time()) - self.started
        return JobInfo(self.id, self.kind, self.name, self.state, dict(self.params), self.owner,
                       progress, list(self.history),
                       self.error, self.traceback, None if self.result is None else dict(self.result),
                       self.created, self.started, self.finished)


class JobContext:
    """What a running job sees: progress reporting and cancellation."""

    def __init__(self, manager: "JobManager", job: _Job):
        self._manager = manager
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def params(self) -> dict:
        return self._job.params

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_event.is_set()

    def check_cancel(self) -> None:
        """Raise JobCancelled if a cancel was requested; call it once per step."""
        if self._job.cancel_event.is_set():
            raise JobCancelled(f"job {self._job.name!r} was cancelled")

    def report(self, *, step: int | None = None, total: int | None = None, tokens: int | None = None,
               losses: dict[str, float] | None = None, message: str | None = None,
               phase: str | None = None) -> None:
        """Update progress (None keeps the previous value) and append a history record.

        tokens is the cumulative count of the current phase; tokens/s and the ETA are measured
        from the moment the phase began (a new `phase` resets them).
        """
        self._manager._report(self._job, dict(step=step, total=total, tokens=tokens, losses=losses, message=message,
                                              phase=phase))


class JobManager:
    """A FIFO queue of jobs run one at a time by a daemon worker thread (started when needed)."""

    def __init__(self, max_finished: int = MAX_FINISHED):
        self.max_finished = max_finished
        self._jobs: dict[str, _Job] = {}  # insertion order = submission order
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, kind: str, name: str, fn: Callable[[JobContext], dict], params: dict | None = None,
               owner: str | None = None) -> str:
        """Queue a job and return its id; it runs after every job submitted before it.

        params: a small JSON-able description shown by the UI (objects such as models travel in
        the closure `fn`, not here). fn returns a JSON-able dict, the job's result. owner: who may
        cancel it (the app passes the browser session; None: anyone).
        """
        job = _Job(uuid.uuid4().hex[:12], kind, name, fn, dict(params or {}), owner)
        with self._cond:
            self._jobs[job.id] = job
            self._queue.append(job)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run_worker, name="factorlab-jobs", daemon=True)
                self._worker.start()
            self._prune()
        log.info("queued job %s (%s %r)", job.id, kind, name)
        return job.id

    def get(self, job_id: str) -> JobInfo:
        with self._cond:
            return self._lookup(job_id).snapshot()

    def jobs(self) -> list[JobInfo]:
        """Every job still in memory, newest first."""
        with self._cond:
            return [job.snapshot() for job in reversed(self._jobs.values())]

    def active(self) -> JobInfo | None:
        """The running job, else the most recently submitted one, else None."""
        with self._cond:
            running = [j for j in self._jobs.values() if j.state == RUNNING]
            latest = running or list(self._jobs.values())[-1:]
            return latest[0].snapshot() if latest else None

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now or a running one at its next check; False if already finished."""
        with self._cond:
            job = self._lookup(job_id)
            if job.state in TERMINAL:
                return False
            job.cancel_event.set()
            if job.state == QUEUED:
                self._queue.remove(job)
                self._finish(job, CANCELLED)
        log.info("cancel requested for job %s", job_id)
        return True

    def wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Block until the job is finished or `timeout` seconds pass; return its snapshot either way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            job = self._lookup(job_id)
            while job.state not in TERMINAL:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            return job.snapshot()

    def _lookup(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"no job with id {job_id!r}: it never existed or was forgotten "
                                  f"(only the last {self.max_finished} finished jobs are kept).")
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in TERMINAL]
        for job in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job.id]

    def _finish(self, job: _Job, state: str) -> None:
        job.state = state
        job.finished = time.time()
        self._prune()
        self._cond.notify_all()

    def _run_worker(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._worker = None  # the next submit starts a fresh worker
                    return
                job = self._queue.popleft()
                job.state, job.started = RUNNING, time.time()
                job.phase_base = (progress_clock(), 0, 0)
                self._cond.notify_all()
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        log.info("running job %s (%s %r)", job.id, job.kind, job.name)
        try:
            result = job.fn(JobContext(self, job))
            if result is not None and not isinstance(result, dict):
                raise TypeError(f"job function returned {type(result).__name__}; it must return a dict")
        except JobCancelled:
            with self._cond:
                self._finish(job, CANCELLED)
            log.info("job %s cancelled", job.id)
        except Exception as exc:  # noqa: BLE001 - a failing job must not stop the worker
            tb = traceback.format_exc()
            log.error("job %s (%s %r) failed:\n%s", job.id, job.kind, job.name, tb)
            with self._cond:
                job.error = str(exc) or type(exc).__name__
                job.traceback = tb
                self._finish(job, FAILED)
        else:
            with self._cond:
                job.result = result or {}
                self._finish(job, DONE)
            log.info("job %s done", job.id)

    def _report(self, job: _Job, update: dict) -> None:
        step, total, tokens, losses, message, phase = (update[k] for k in ("step", "total", "tokens", "losses",
                                                                            "message", "phase"))
        now = progress_clock()
        with self._cond:
            p = job.progress
            if phase is not None and phase != p["phase"]:  # a new phase starts its own counters
                p.update(phase=phase, step=None, total=None, tokens=None)
                job.phase_base = (now, step or 0, tokens or 0)
            for key, value in (("step", step), ("total", total), ("tokens", tokens), ("message", message)):
                if value is not None:
                    p[key] = value
            if losses is not None:
                p["losses"] = {k: float(v) for k, v in losses.items()}
            base_t, base_step, base_tokens = job.phase_base
            dt = now - base_t
            p["elapsed_s"] = time.time() - (job.started or job.created)
            p["fraction"] = min(1.0, p["step"] / p["total"]) if p["step"] is not None and p["total"] else None
            done_steps = (p["step"] or 0) - base_step
            p["eta_s"] = (dt / done_steps * max(0, p["total"] - p["step"])
                          if p["total"] and done_steps > 0 else None)
            p["tokens_per_s"] = ((p["tokens"] - base_tokens) / dt
                                 if p["tokens"] is not None and dt > 0 else None)
            job.history.append({"time": p["elapsed_s"], "step": p["step"], "tokens": p["tokens"],
                                "phase": p["phase"], "message": p["message"], "losses": p["losses"]})
            if len(job.history) > MAX_HISTORY:
                job.history[:] = job.history[::2]


_manager: JobManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> JobManager:
    """The process-wide JobManager (the app polls it, so every browser sees the same jobs)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = JobManager()
        return _manager
