"""The lab's background jobs, importable without gradio: training, evaluations, benchmarks, chat fidelity,
export and the expert atlas. Each is checked here (quotas, names, a writable store), queued on
factorlab.jobs' worker (progress, cancel) and writes through factorlab.workflows; the views of jobs (progress,
loss curves, the jobs table) are here too. Run-store and model helpers come from factorlab.lab.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import lab
from .jobs import JobCancelled, JobInfo, get_manager
from .lab import WARM_START_OWNER, LabError, checked_run_name, pct, readonly_hint
from .limits import QuotaError, check_recipe, limits
from .models import hub_reachable, load_model
from .recipe import Recipe
from .runs import RunError, runs_root, sanitize_name


# ---------------------------------------------------------------- training jobs
def start_training(recipe: Recipe, *, name: str | None = None, owner: str | None = None) -> str:
    """Check the recipe against the host's quotas and the model's shapes, then queue a training job of
    `owner` (a browser session); returns its id."""
    check_recipe(recipe)
    if recipe.model == "default" or Path(recipe.model).expanduser().exists() or not hub_reachable():
        # the model loads now (cached): a bad model, N or layer fails here, not in the job. A Hub model
        # would be downloaded in the request: its job checks the recipe instead.
        recipe.validate(lab.dense_info(recipe.model))
    run_name = sanitize_name(name or f"{Path(recipe.model).name or 'model'}-{recipe.preset_name() or 'custom'}-"
                             f"{recipe.num_experts}e{recipe.top_k}k-{time.strftime('%m%d-%H%M%S')}")
    lab.check_writable()
    with lab._start_lock:
        if (runs_root() / run_name).exists():
            raise LabError(f"a run named {run_name!r} already exists: pick another name or delete it first")
        if any(j.params.get("run") == run_name and not j.is_finished for j in get_manager().jobs()):
            raise LabError(f"a job is already making the run {run_name!r}: pick another name")
        recipe = lab.keep_upload(recipe)
        return _submit("train", run_name, _train_job, {"run": run_name, "recipe": recipe.to_dict()}, owner)


def _submit(kind: str, name: str, fn, params: dict, owner: str | None) -> str:
    """Queue a job within the host's quotas (call under lab._start_lock) and give it up to half a second to
    report, so the page shows progress at once."""
    manager = get_manager()
    quota = limits()
    waiting = [j for j in manager.jobs() if not j.is_finished]
    if owner is not None:
        mine = sum(j.owner == owner for j in waiting)
        if quota.jobs_per_session and mine >= quota.jobs_per_session:
            raise QuotaError(f"you already have {mine} job(s) queued or running, this server's limit per visitor "
                             f"(FACTORLAB_MAX_JOBS_PER_SESSION): wait for one to finish or cancel it")
    if quota.queue and len(waiting) >= quota.queue:
        raise QuotaError(f"{len(waiting)} jobs are queued or running, this server's limit (FACTORLAB_MAX_QUEUE): "
                         "try again when one has finished")
    job_id = manager.submit(kind, name, fn, params, owner)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not manager.get(job_id).history:
        time.sleep(0.02)
    return job_id


@contextmanager
def _storing() -> Iterator[None]:
    """A run store that cannot be written becomes a message with the fix."""
    try:
        yield
    except OSError as exc:
        raise LabError(f"results could not be stored: {readonly_hint(exc)}") from exc


def _train_job(ctx) -> dict:
    from .par import TrainingCancelled
    from .workflows import train_run

    recipe = Recipe.from_dict(ctx.params["recipe"])
    ctx.report(message=f"loading {recipe.model}", phase="load")
    loaded = load_model(recipe.model)

    def progress(rec: dict) -> None:
        if "step" in rec:  # a trainer step: one layer and phase over all training tokens
            where = f" layer {rec['layer']}" if rec.get("layer") is not None else ""
            ctx.report(step=rec["step"], total=rec["total"], tokens=rec["step"] * recipe.train_tokens,
                       losses=rec.get("losses") or {}, message=f"{rec['phase']}{where}", phase="train")
        else:
            ctx.report(message=rec.get("message"), phase=rec.get("phase"))

    try:
        with _storing():
            result = train_run(recipe, ctx.params["run"], loaded=loaded, progress=progress,
                               should_stop=lambda: ctx.cancelled)
    except TrainingCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    return {"run": result["name"], "seconds": result["seconds"], "heldout": result["heldout_by_k"]}


def start_eval(name: str, tasks: list[str], limit, *, owner: str | None = None) -> str:
    """Queue a job scoring the run's missing K values on these tasks (a seeded subset of `limit` items)."""
    from .tasks import parse_tasks, task_size

    if not name:
        raise LabError("load a run first")
    name = checked_run_name(name)
    tasks = parse_tasks(list(tasks or []) or "arc_easy")
    limit = lab._int(limit, "items per task") if limit not in (None, "", 0) else None
    if limit is not None and limit < 1:
        raise LabError(f"items per task must be at least 1 (0 = all), got {limit}")
    quota = limits()
    for task in tasks:
        size = task_size(task)
        quota.check("eval_items", min(limit or size, size), f"{task}: {'all' if limit is None else 'the'} items")
    missing = missing_evals(name, tasks, limit)
    if not missing:
        raise LabError(f"every K is already measured for {', '.join(tasks)} with {limit or 'all'} items")
    lab.check_writable()
    with lab._start_lock:
        lab.load_run(name)  # not deleted meanwhile
        return _submit("eval", name, _eval_job, {"run": name, "missing": missing, "limit": limit}, owner)


def missing_evals(name: str, tasks: list[str], limit: int | None) -> dict[str, list[int]]:
    """Task -> K values not yet stored for this run with the same items."""
    run = lab.load_run(name)
    stored = (run.metrics.get("eval") or {}).get("tasks", {})
    ks = range(1, run.recipe.num_experts + 1)
    out = {}
    for task in tasks:
        entry = stored.get(task) or {}
        have = set(entry.get("k", {})) if entry.get("limit") == limit and entry.get("seed", 0) == 0 else set()
        todo = [k for k in ks if str(k) not in have]
        if todo:
            out[task] = todo
    return out


_dense_scores: dict[str, dict] = {}  # per dense model: scores reused across evaluation jobs


def _eval_job(ctx) -> dict:
    from .workflows import evaluate_run

    p = ctx.params
    dense_cache = _dense_scores.setdefault(lab.load_run(p["run"]).recipe.model, {})
    by_ks: dict[tuple[int, ...], list[str]] = {}  # tasks missing the same K values are scored in one sweep
    for task, ks in p["missing"].items():
        by_ks.setdefault(tuple(ks), []).append(task)
    for i, (ks, tasks) in enumerate(by_ks.items(), 1):
        ctx.report(message="loading the run (a private copy)", phase="load")

        def callback(done: int, total: int, message: str, i=i, phase=f"eval {', '.join(tasks)}") -> None:
            ctx.check_cancel()
            ctx.report(step=done, total=total, message=f"{message} (sweep {i}/{len(by_ks)})", phase=phase)

        with _storing():
            evaluate_run(p["run"], tasks, list(ks), limit=p["limit"], callback=callback, dense_cache=dense_cache)
    return {"run": p["run"], "tasks": list(p["missing"])}


def start_bench(name: str, prefill, decode, repeats, *, owner: str | None = None) -> str:
    """Queue a wall-clock benchmark of dense vs every K of the run (stored in metrics["bench"])."""
    if not name:
        raise LabError("load a run first")
    name = lab.load_run(name).name
    params = {"run": name, "prefill": lab._int(prefill, "prefill tokens"), "decode": lab._int(decode, "decode tokens"),
              "repeats": lab._int(repeats, "repeats")}
    if params["prefill"] < 1 or params["repeats"] < 1 or params["decode"] < 0:
        raise LabError("prefill and repeats must be at least 1, decode at least 0")
    quota = limits()
    quota.check("bench_tokens", params["prefill"] + params["decode"], "prefill + decode tokens")
    quota.check("bench_repeats", params["repeats"], "repeats")
    lab.check_writable()
    with lab._start_lock:
        lab.load_run(name)  # not deleted meanwhile
        return _submit("bench", name, _bench_job, params, owner)


def start_fidelity(name: str, *, owner: str | None = None) -> str:
    """Queue the chat-fidelity measurement of the run at every K not yet measured (stored in metrics)."""
    if not name:
        raise LabError("load a run first")
    run = lab.load_run(name)
    stored = (run.metrics.get("chat_fidelity") or {}).get("by_k") or {}
    missing = [k for k in range(1, run.recipe.num_experts + 1) if str(k) not in stored]
    if not missing:
        raise LabError(f"chat fidelity is already measured at every K of {run.name}")
    lab.check_writable()
    with lab._start_lock:
        lab.load_run(name)  # not deleted meanwhile
        return _submit("fidelity", run.name, _fidelity_job, {"run": run.name, "ks": missing}, owner)


def _fidelity_job(ctx) -> dict:
    from .workflows import fidelity_run

    p = ctx.params

    def progress(what: str, fraction: float) -> None:
        ctx.check_cancel()
        ctx.report(step=round(100 * fraction), total=100, message=what, phase="chat fidelity")

    with _storing():
        fidelity_run(p["run"], p["ks"], progress=progress)
    return {"run": p["run"], "ks": p["ks"]}


def cancel_job(owner: str | None) -> JobInfo:
    """Cancel the newest queued or running job of `owner` (a browser session); returns what was cancelled.
    A job of another visitor is theirs to cancel."""
    manager = get_manager()
    waiting = [j for j in manager.jobs() if not j.is_finished]
    mine = [j for j in waiting if j.owner is None or j.owner == owner]
    if not mine:
        if waiting and waiting[0].owner == WARM_START_OWNER:
            raise LabError(f"the training job `{waiting[0].id}` is the lab's warm start (FACTORLAB_WARM_START): it "
                           "gives every visitor a first run, so only the host can stop it")
        if waiting:
            raise LabError(f"the {waiting[0].kind} job `{waiting[0].id}` was started by another visitor: only they "
                           "can cancel it")
        raise LabError("no job is queued or running")
    running = [j for j in mine if j.state == "running"]
    job = (running or mine)[0]
    manager.cancel(job.id)
    return job


def _bench_job(ctx) -> dict:
    from .workflows import bench_run

    p = ctx.params
    ctx.report(message="loading the run (a private copy)", phase="load")

    def progress(rec: dict) -> None:
        ctx.check_cancel()
        ctx.report(step=rec["step"], total=rec["total"], message=rec["phase"], phase="bench")

    with _storing():
        bench_run(p["run"], prefill=p["prefill"], decode=p["decode"], batch=0, repeats=p["repeats"], progress=progress)
    return {"run": p["run"]}


# ---------------------------------------------------------------- export
def exports_root() -> Path:
    """Where the lab writes exports: the system temp folder (Gradio serves downloads from there), one zip per run
    and format; gone after a restart, like the jobs that made them."""
    return Path(tempfile.gettempdir()) / "factorlab-exports"


def start_export(name: str, fmt: str, *, owner: str | None = None) -> str:
    """Queue a job writing a run as a standard transformers MoE checkpoint (factorlab.export), zipped for download."""
    from .export import FORMATS

    if not name:
        raise LabError("choose a run in the list first")
    name = lab.load_run(name).name
    if fmt not in FORMATS:
        raise LabError(f"format {str(fmt)[:40]!r} is not one of {', '.join(FORMATS)}")
    lab.check_writable()
    with lab._start_lock:
        lab.load_run(name)  # not deleted meanwhile
        return _submit("export", name, _export_job, {"run": name, "format": fmt}, owner)


def _export_job(ctx) -> dict:
    from .export import zip_folder
    from .workflows import export_run

    p = ctx.params
    folder = exports_root() / f"{p['run']}-{p['format']}"

    def progress(rec: dict) -> None:
        ctx.check_cancel()
        ctx.report(message=rec.get("message"), phase="export")

    with _storing():
        s = export_run(p["run"], folder, fmt=p["format"], overwrite=True, progress=progress)
    progress({"message": "zipping the folder"})
    target = zip_folder(folder, exports_root() / f"{p['run']}-{p['format']}-k{s['plan']['top_k']}.zip")
    shutil.rmtree(folder, ignore_errors=True)
    return {"run": p["run"], "zip": str(target), "class": s["class"], "top_k": s["plan"]["top_k"],
            "exact": s["plan"]["exact"], "max_abs_logit_diff": s["check"]["max_abs_logit_diff"],
            "greedy_same": s["check"]["greedy_same"], "approximation": s["approximation"]}


def export_file(name: str) -> tuple[str, str]:
    """(the zip of the run's newest finished export in this process, a line saying what it is)."""
    if not name:
        raise LabError("choose a run in the list first")
    name = checked_run_name(name)
    jobs = [j for j in get_manager().jobs() if j.kind == "export" and j.params.get("run") == name]
    if any(not j.is_finished for j in jobs):
        raise LabError(f"the export of {name!r} is still running (see the jobs table): get it when it is done")
    done = [j for j in jobs if j.state == "done" and Path(j.result["zip"]).is_file()]
    if not done:
        raise LabError(f"no export of {name!r} yet: press Export first (a background job)")
    r = done[0].result
    a = r["approximation"]
    how = (f"exact (max |logit diff| {r['max_abs_logit_diff']:.1e}, greedy reply "
           f"{'identical' if r['greedy_same'] else 'different'})" if r["exact"] else
           f"approximate: per-token K exported as top-{r['top_k']}" +
           (f", held-out perplexity {a['run']['perplexity']:.1f} -> {a['export']['perplexity']:.1f}" if a else ""))
    return r["zip"], f"`{Path(r['zip']).name}`: {r['class']} at K={r['top_k']}, {how}. The README inside says more."


# ---------------------------------------------------------------- the expert atlas
def start_atlas(name: str, upload: str | None = None, *, owner: str | None = None) -> str:
    """Queue the atlas of a run (factorlab.atlas: the default corpus, plus an uploaded text if given)."""
    if not name:
        raise LabError("load a run first")
    name = checked_run_name(name)
    upload = lab.data_source("upload", upload, None) if upload else None
    lab.check_writable()
    with lab._start_lock:
        lab.load_run(name)  # not deleted meanwhile
        upload = lab.keep_upload(Recipe(data=upload)).data if upload else None
        return _submit("atlas", name, _atlas_job, {"run": name, "upload": upload}, owner)


def _atlas_job(ctx) -> dict:
    from .atlas import AtlasCancelled
    from .workflows import atlas_run

    p = ctx.params
    ctx.report(message="loading the run (a private copy) and the corpus", phase="load")

    def progress(rec: dict) -> None:
        ctx.report(step=rec.get("step"), total=rec.get("total"), message=rec.get("message"), phase=rec.get("phase"))

    try:
        with _storing():
            atlas = atlas_run(p["run"], upload=p["upload"], progress=progress, should_stop=lambda: ctx.cancelled)
    except AtlasCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    return {"run": p["run"], "seconds": atlas["timing"]["seconds"]}


_atlas_cache: dict[str, tuple[tuple, dict]] = {}


def stored_atlas(name: str) -> dict | None:
    """The run's stored atlas (parsed once per file version), or None when it has none yet."""
    from .atlas import ATLAS_FILE

    run = lab.load_run(name)
    path = run.path / ATLAS_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    cached = _atlas_cache.get(run.name)
    if cached is None or cached[0] != key:
        from .workflows import stored_atlas as read

        cached = (key, read(run.name))
        _atlas_cache[run.name] = cached
    return cached[1]


# ---------------------------------------------------------------- job views
def job_view(job: JobInfo | None) -> dict | None:
    """A job's state with its numbers formatted for the page; None when there is no job."""
    if job is None:
        return None
    p = job.progress
    return {"id": job.id, "kind": job.kind, "name": job.name, "state": job.state, "phase": p.get("phase"),
            "fraction": p.get("fraction"), "message": p.get("message"), "error": job.error,
            "step_text": f"{p['step']}/{p['total']}" if p.get("step") is not None and p.get("total") else None,
            "rate_text": f"{p['tokens_per_s']:,.0f}" if p.get("tokens_per_s") else None,
            "elapsed_text": _duration(p.get("elapsed_s")), "eta_text": _duration(p.get("eta_s")) if
            job.state == "running" else None, "history": job.history, "result": job.result, "note": _job_note(job)}


def _job_note(job: JobInfo) -> str | None:
    """What the banner says under a queued or running training job: what it is and what to do meanwhile."""
    if job.is_finished or job.kind != "train":
        return None
    return job.params.get("note") or ("Meanwhile every tab keeps working on the current run; the new run becomes "
                                      "current on the page that started it.")


def loss_records(run: str | None) -> tuple[str, list[dict]]:
    """(title, trainer records) for the loss plot: a training job still in progress, else the current
    run's saved train_log.jsonl, else the last training job of this process."""
    from .runs import read_log

    train = next((j for j in get_manager().jobs() if j.kind == "train"), None)
    if train and not train.is_finished:
        return f"training losses — {train.name} ({train.state})", train.history
    if run:
        try:
            return f"training losses — {run} (saved log)", read_log(run)
        except (OSError, ValueError, RunError):
            pass
    if train:
        return f"training losses — {train.name} ({train.state})", train.history
    return "training losses", []


def job_rows() -> list[list]:
    """The ten newest jobs as table rows."""
    return [[j.id, j.kind, j.name, j.state, "100%" if j.state == "done" else pct(j.progress.get("fraction")),
             _duration(j.progress.get("elapsed_s")), j.error] for j in get_manager().jobs()[:10]]


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"
