"""The warm start: a lab that starts with no usable run trains one by itself, so the first visitor of a
fresh Space sees a working factorized model within minutes instead of an empty page.

`start()` (called once when the app launches) reads FACTORLAB_WARM_START (`limits.warm_start`) and, when
the runs folder holds no run but the warm start's own, queues its stages in the background worker one after
the other, as the server's jobs (no visitor can cancel them): the `quick` preset first, then the default
recipe. A page with no run adopts the newest finished one (`page_run`); a page showing the quick run is
offered the default one when it is ready (`offer`): a visitor's current run never changes under them.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import lab, lab_jobs
from .jobs import DONE, get_manager
from .limits import WARM_START_MODES, QuotaError, warm_start
from .recipe import PRESETS, Recipe, preset
from .runs import runs_root

log = logging.getLogger(__name__)

QUICK_RUN, DEFAULT_RUN = "warm-quick", "warm-default"  # the runs a warm start makes, by their role
RETRY_S = 10.0  # the queue is full of visitors' jobs: try to queue the next stage again after this long


@dataclass(frozen=True)
class Stage:
    """One training job of a warm start: the run it saves and its recipe (`label`: the preset's name)."""
    run: str
    recipe: Recipe
    label: str


def plan(mode: str, model: str = "default") -> list[Stage]:
    """The stages of a FACTORLAB_WARM_START mode: quick -> [quick, default]; default -> [default]; off -> []."""
    if mode not in WARM_START_MODES:
        raise ValueError(f"unknown warm start {mode!r}: choose one of {', '.join(WARM_START_MODES)}")
    stages = [Stage(QUICK_RUN, preset("quick", model=model), "quick")] if mode == "quick" else []
    if mode != "off":
        stages.append(Stage(DEFAULT_RUN, preset("default", model=model), "default"))
    return stages


def banner_note(stage: Stage, first: bool) -> str:
    """What the job banner says while a stage trains (plain text): what it is, what a visitor can do meanwhile."""
    what = f"the {stage.label} recipe ({PRESETS[stage.label][0]})" if stage.label in PRESETS else stage.run
    if first:
        return (f"The lab is training its first model by itself: {what}. Meanwhile the dense side of Chat "
                "answers at once and About explains the method; the run becomes current on this page when it "
                "is done.")
    return (f"The lab is now training {what}. Meanwhile every tab works on the current run; when this one is "
            "done, the page offers to switch to it.")


class WarmStart:
    """The warm start's thread: queue each stage once the one before it is done; stop at a failure."""

    def __init__(self, stages: list[Stage], job: Callable | None = None):
        self.stages = list(stages)
        self.job = job or lab_jobs._train_job  # the job function (tests substitute a fast one)
        self.job_ids: dict[str, str] = {}  # run -> job id, in the order queued
        self.state = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="factorlab-warm-start", daemon=True)

    def start(self) -> WarmStart:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Queue no further stage (a job already queued runs on; cancel it through the job manager)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._stages()
        except Exception as exc:  # noqa: BLE001 - the app serves on without a warm start; the log says why
            self.state = f"failed: {exc}"
            log.exception("warm start failed")

    def _stages(self) -> None:
        first = True
        for stage in self.stages:
            if (runs_root() / stage.run).exists():  # made by an earlier start (persistent storage)
                first = False
                continue
            job_id = self._queue(stage, first)
            if job_id is None:
                return
            self.state = f"training {stage.label}"
            info = get_manager().wait(job_id)
            if info.state != DONE:
                self.state = f"{stage.label} {info.state}" + (f": {info.error}" if info.error else "")
                log.warning("warm start stopped: the %s job %s", stage.label, self.state)
                return
            log.info("warm start: run %s is ready (%.0f s)", stage.run, info.finished - info.started)
            first = False
        self.state = "done"

    def _queue(self, stage: Stage, first: bool) -> str | None:
        """Queue a stage's training job within the host's quotas (retried while the queue is full)."""
        params = {"run": stage.run, "recipe": stage.recipe.to_dict(), "warm_start": stage.label,
                  "note": banner_note(stage, first)}
        while not self._stop.is_set():
            try:
                lab.check_writable()
                with lab._start_lock:
                    job_id = lab_jobs._submit("train", stage.run, self.job, params, lab.WARM_START_OWNER)
                self.job_ids[stage.run] = job_id
                return job_id
            except QuotaError as exc:
                self.state = f"waiting: {exc}"
                self._stop.wait(RETRY_S)
            except lab.LabError as exc:  # the runs folder cannot be written: nothing to warm
                self.state = f"off: {exc}"
                log.warning("warm start off: %s", exc)
                return None
        self.state = "stopped"
        return None


_current: WarmStart | None = None
_current_lock = threading.Lock()


def start(mode: str | None = None, *, stages: list[Stage] | None = None, job: Callable | None = None
          ) -> WarmStart | None:
    """Start the warm start of `mode` (default: FACTORLAB_WARM_START) in the background, unless it is off or
    the runs folder holds a usable run that is not the warm start's own; returns it, or None."""
    mode = warm_start() if mode is None else mode
    stages = plan(mode) if stages is None else stages
    others = set(lab.run_names()) - {s.run for s in stages}
    global _current
    with _current_lock:
        if not stages or others or (_current is not None and _current.alive):
            if others and stages:
                log.info("warm start skipped: the runs folder holds runs (%s)", ", ".join(sorted(others)[:3]))
            return None
        _current = WarmStart(stages, job).start()
        return _current


def page_run(run: str | None) -> str | None:
    """The run a page shows: its own, else the newest finished run of the warm start (None: neither)."""
    if run:
        return run
    names = lab.run_names()
    return next((name for name in (DEFAULT_RUN, QUICK_RUN) if name in names), None)


def offer(run: str | None) -> str | None:
    """The default recipe's run once it is ready, while the page still shows the quick one; else None."""
    return DEFAULT_RUN if run == QUICK_RUN and DEFAULT_RUN in lab.run_names() else None


def offer_text(run: str | None) -> str:
    """Markdown offering the switch (empty when there is nothing to offer): both runs' held-out numbers."""
    target = offer(run)
    if target is None:
        return ""
    k = lab.run_shape(target)["top_k"]
    new, old = lab.heldout_at(target, k), lab.heldout_at(run, k)
    numbers = (f" At K={k} its held-out perplexity is {new['perplexity']:.1f} against {old['perplexity']:.1f} for "
               f"the quick run (dense {new['dense_perplexity']:.1f})." if new and old else "")
    return (f"**The default recipe is trained** (run `{target}`).{numbers} Switch when you like: your chat stays "
            "as it is.")
