"""The logic behind the Gradio lab, importable without gradio: shared models, runs, jobs and views.

Models load once per process and are shared by every session: the dense model (read-only, no
lock) and the factorized model of each run in use (a lock, because a stream sets K on it before
each forward). Background jobs (training, evaluations, benchmarks) build their own copies.
Per-user state (the current run) lives in the app's gr.State; jobs in factorlab.jobs.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .chat import ModelHandle
from .flops import flops_per_token, flops_table, mean_k_plan
from .jobs import JobCancelled, JobInfo, get_manager
from .models import HUB_MODELS, ModelLoadError, hub_reachable, load_model, model_info
from .data import BUILTIN_DEFAULT
from .moe import chosen_lists, factorized_layers, k_offsets, record_routing, set_k_offsets, set_top_k
from .runs import RunError, config_k_offsets, list_runs, load_moe, load_run, runs_root, sanitize_name

MODEL_CHOICES = ("default", *HUB_MODELS)
TRAIN_MODES = {"router + experts (PAR)": "experts", "router only (PAR)": "router", "no PAR (untrained router)": "none"}
_BUILTIN_LABELS = {"everyday": "built-in: everyday English (non-evaluated datasets)",
                   "local": "built-in: local prose (Python docs, fast)",
                   "selfgen": "built-in: text the model writes itself (slow)"}
# The default source first (what `builtin` means), then the other built-ins, then upload and Hub.
DATA_SOURCES = {_BUILTIN_LABELS[BUILTIN_DEFAULT] + " — default": BUILTIN_DEFAULT,
                **{label: kind for kind, label in _BUILTIN_LABELS.items() if kind != BUILTIN_DEFAULT},
                "uploaded file (.txt / .jsonl)": "upload", "Hugging Face dataset": "hub"}
UPLOAD_SUFFIXES = (".txt", ".md", ".jsonl")
MAX_ROUTE_TOKENS = 160
MOE_CACHE_SIZE = 3
HELDOUT_TASK, MEAN_TASK = "held-out agreement with dense", "mean relative maintenance (capped at 100%)"


class LabError(ValueError):
    """Something the user must fix; the message says what and how."""


def user_message(exc: BaseException) -> str | None:
    """The message to show for an error the user can act on, or None for a bug."""
    from .data import DataError
    from .jobs import UnknownJobError
    from .tasks import TaskDataError

    if isinstance(exc, (LabError, ValueError, ModelLoadError, RunError, DataError, TaskDataError, UnknownJobError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename or 'file system'}): check the path and its permissions."
    return None


# ---------------------------------------------------------------- shared models
_models_lock = threading.Lock()
_moe_cache: OrderedDict[tuple, ModelHandle] = OrderedDict()
_info_cache: dict[str, dict] = {}


def dense_handle(spec: str) -> ModelHandle:
    """The process-wide dense model (read-only, so no lock)."""
    loaded = load_model(spec)
    return ModelHandle(loaded.model, loaded.tokenizer)


def dense_info(spec: str) -> dict:
    """Shapes of a dense model (models.model_info), computed once per model."""
    if spec not in _info_cache:
        _info_cache[spec] = model_info(load_model(spec).model)
    return _info_cache[spec]


def run_handle(name: str, trained: bool = True) -> ModelHandle:
    """The run's factorized model, shared and locked; trained=False gives the same partition with an
    untrained router and untuned experts (FactorLLM's Ex0, "no PAR")."""
    run = load_run(name)
    key = (run.name, str(run.path), run.config.get("created"), trained)
    with _models_lock:
        if key in _moe_cache:
            _moe_cache.move_to_end(key)
            return _moe_cache[key]
    loaded = load_model(run.config["model"])
    if trained:
        model = load_moe(run, loaded.model)
    else:
        from .factorize import build_moe
        model = build_moe(loaded.model, run.partition, run.config.get("top_k", 1),
                          run.config.get("output_mode", "scaled"), router_seed=run.config.get("seed", 0),
                          first_token_dense=run.config.get("first_token_dense", False))
        set_k_offsets(model, config_k_offsets(run.config), run.config.get("top_k", 1))
    handle = ModelHandle(model, loaded.tokenizer, threading.Lock())
    with _models_lock:
        _moe_cache[key] = handle
        while len(_moe_cache) > MOE_CACHE_SIZE:
            _moe_cache.popitem(last=False)
    return handle


def forget_run(name: str) -> None:
    """Drop a run's shared models (after it was deleted or replaced)."""
    with _models_lock:
        for key in [k for k in _moe_cache if k[0] == name]:
            del _moe_cache[key]


def run_shape(name: str) -> dict:
    """N, K, factorized layers and shared width of a run, from its config."""
    config = load_run(name).config
    part = config["partition"]
    return {"model": config["model"], "num_experts": part["num_experts"], "top_k": config.get("top_k", 1),
            "layers": part["layers"], "shared_size": part.get("shared_size", 0), "mode": config.get("mode"),
            "first_token_dense": config.get("first_token_dense", False), "k_offsets": config_k_offsets(config),
            "per_token_k": config.get("per_token_k")}


def _run_flops(info: dict, shape: dict, k: int, seq_len: int) -> dict:
    """FLOPs per token of a run at K, from its config (per-token K: the means training measured)."""
    return flops_per_token(info, seq_len, shape["num_experts"], k, shape["layers"], shape["shared_size"],
                           top_k_per_layer=mean_k_plan(shape["per_token_k"], k, shape["num_experts"],
                                                       shape["k_offsets"]),
                           first_token_dense=shape["first_token_dense"], k_offsets=shape["k_offsets"])


def dense_ffn_gflops(spec: str, seq_len: int = 512) -> float:
    """Active FFN GFLOPs per token of the dense model."""
    return flops_per_token(dense_info(spec), seq_len)["ffn"] / 1e9


def ffn_gflops(name: str, k: int, seq_len: int = 512) -> tuple[float, float]:
    """Active FFN GFLOPs per token: (dense, the run at K)."""
    shape = run_shape(name)
    info = dense_info(shape["model"])
    moe = _run_flops(info, shape, k, seq_len)
    return flops_per_token(info, seq_len)["ffn"] / 1e9, moe["ffn"] / 1e9


# ---------------------------------------------------------------- runs
RUN_COLUMNS = ["run", "model", "N", "K", "split", "layers", "training", "dense ppl",
               "held-out by K: perplexity (agreement)", "eval: mean relative at K", "created"]


def run_rows() -> list[list]:
    """One row per run on disk, newest first; a corrupt run shows its error."""
    rows = []
    for r in list_runs():
        if not r.ok:
            rows.append([r.name, "corrupt", None, None, None, None, r.error, None, None, None, None])
            continue
        c, m = r.config, r.metrics
        held = sorted(((int(k), v) for k, v in (m.get("heldout") or {}).items() if v))
        mean = (((m.get("eval") or {}).get("summary") or {}).get("k") or {}).get(str(c.get("top_k"))) or {}
        rows.append([r.name, c.get("model"), c.get("num_experts"), c.get("top_k"), c.get("split"),
                     _layers_text(c.get("layers") or []), c.get("mode"),
                     f"{held[0][1]['dense_perplexity']:.2f}" if held else None,
                     " · ".join(f"K={k}: {v['perplexity']:.1f} ({_pct(v['agreement'])})" for k, v in held) or None,
                     _pct(mean.get("relative_capped")),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(c.get("created", 0)))])
    return rows


def run_names() -> list[str]:
    """Names of the readable runs, newest first."""
    return [r.name for r in list_runs() if r.ok]


def describe_run(name: str | None) -> str:
    """Markdown: the run's configuration and headline metrics."""
    if not name:
        return "**No run loaded.** Train one (or load one from the list) in *Factorize & train*."
    run = load_run(name)
    c, m = run.config, run.metrics
    lines = [f"**Current run: `{run.name}`** — {c['model']}, N={c['num_experts']} experts, K={c['top_k']}, "
             f"{c['split']} split over {len(c['layers'])} layer(s), training: {c.get('mode')}, "
             f"output: {c.get('output_mode')}"]
    offsets = config_k_offsets(c)
    if offsets:
        plan = ", ".join(f"layer {i}: K{o:+d}" for i, o in sorted(offsets.items()))
        lines[0] += f", per-layer K plan ({plan}; mean K {c['top_k'] + sum(offsets.values()) / len(c['layers']):.2f})"
    if c.get("first_token_dense"):
        lines[0] += ", first token of each sequence through the whole FFN"
    if c.get("per_token_k"):
        means = [v[c["top_k"] - 1] for v in c["per_token_k"].values()]
        lines[0] += (f", per-token K (each token runs the experts its router scores above a threshold; "
                     f"{sum(means) / len(means):.2f} experts per token at K={c['top_k']}, measured in training)")
    for k, h in sorted((m.get("heldout") or {}).items(), key=lambda kv: int(kv[0])):
        if h:
            lines.append(f"- held-out at K={k}: perplexity {h['perplexity']:.2f} (dense {h['dense_perplexity']:.2f}), "
                         f"top-1 agreement with dense {_pct(h['agreement'])}, KL {h['kl']:.3f} nats/token")
    return "\n".join(lines)


def delete(name: str) -> None:
    """Delete a run from disk (atomically), unless a job is using it."""
    from .runs import delete_run

    if not name:
        raise LabError("choose a run to delete")
    busy = [j for j in get_manager().jobs() if not j.is_finished and j.params.get("run") == name]
    if busy:
        raise LabError(f"run {name!r} is in use by a {busy[0].kind} job: cancel it first")
    try:
        delete_run(name)
    except OSError as exc:
        raise LabError(f"cannot delete {name!r}: {readonly_hint(exc)}") from exc
    forget_run(name)


def readonly_hint(exc: OSError) -> str:
    """Why the runs folder cannot be written, and what to do."""
    return (f"the runs folder {runs_root().resolve()} is not writable ({exc.strerror or exc}). Existing runs can "
            "still be browsed and chatted with; set FACTORLAB_RUNS to a writable folder to save new ones.")


def check_writable() -> None:
    """Fail fast, with the fix, when new runs or metrics could not be saved."""
    root = runs_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check."):
            pass
    except OSError as exc:
        raise LabError(readonly_hint(exc)) from exc


def _layers_text(layers: list[int]) -> str:
    if not layers:
        return ""
    parts, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def _ci(interval: list[float] | None) -> str:
    """A 95% bootstrap interval after a percentage (evaluate.bootstrap_means), or nothing."""
    return "" if not interval else f" (95% CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%)"


# ---------------------------------------------------------------- factorize
def factorize_spec(model: str, num_experts, top_k, split: str, layers: str, output_mode: str, seed,
                   shared_size=0, calibration_tokens=4096, first_token_dense=False, layer_k="uniform",
                   shared_choice=None):
    """A validated FactorizeSpec from the page's controls (ValueError says what to fix);
    shared_choice None: the recipe's."""
    from .workflows import RECIPE_SHARED_CHOICE, FactorizeSpec

    return FactorizeSpec((model or "default").strip(), _int(num_experts, "N"), _int(top_k, "K"), split,
                         (layers or "all").strip(), output_mode, _int(seed, "seed"), _int(shared_size, "shared size"),
                         _int(calibration_tokens, "calibration tokens"), bool(first_token_dense),
                         (layer_k or "uniform").strip(), shared_choice or RECIPE_SHARED_CHOICE)


def quick_factorize(spec) -> tuple[str, list[list]]:
    """Factorize without saving: the K=N exactness check as markdown and the FLOPs table per K."""
    from .workflows import factorize_run

    result = factorize_run(spec, None)
    offsets = k_offsets(result.pop("_moe"))
    diff = result["max_abs_logit_diff"]
    verdict = "exact (fp32 rounding)" if diff < 1e-3 else "NOT exact: something is wrong"
    text = (f"**K=N exactness check:** max |logit difference| = **{diff:.2e}** over {result['tokens']} tokens "
            f"(largest |logit| {result['max_abs_logit']:.1f}) — {verdict}.\n\n"
            f"{result['model_source']}: {spec.split} split of {len(result['layers'])} layer(s) into "
            f"{spec.num_experts} experts of {result['expert_size']} neurons"
            f"{f' + {spec.shared_size} shared' if spec.shared_size else ''}, in {result['factorize_seconds']:.1f} s. "
            "Nothing was saved: *Start training* saves a run.")
    info = dense_info(spec.model)
    table = flops_table(info, result["flops_seq_len"], spec.num_experts, factorized_layers=result["layers"],
                        shared_size=spec.shared_size, first_token_dense=spec.first_token_dense, k_offsets=offsets)
    rows = [["dense", round(table["dense"]["ffn"] / 1e9, 4), round(table["dense"]["total"] / 1e9, 4), "100%", "100%"]]
    rows += [[f"K={k}", round(r["ffn"] / 1e9, 4), round(r["total"] / 1e9, 4), _pct(r["ffn_ratio"]),
              _pct(r["total_ratio"])] for k, r in table["k"].items()]
    return text, rows


def _int(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise LabError(f"{what} must be a whole number, got {value!r}")
    return int(number)


# ---------------------------------------------------------------- training jobs
def data_source(kind: str, upload: str | None, hub_id: str | None) -> str:
    """The data source string for a UI choice, validated now (uploads are copied somewhere stable)."""
    from .data import load_texts

    if kind in ("builtin", *_BUILTIN_LABELS):
        return kind
    if kind == "upload":
        if not upload:
            raise LabError("choose a .txt or .jsonl file to upload, or pick a built-in source")
        path = Path(upload)
        if path.suffix.lower() not in UPLOAD_SUFFIXES:
            raise LabError(f"{path.name}: unsupported file type; upload .txt (paragraphs separated by blank "
                           "lines) or .jsonl (a `text` field per line)")
        load_texts(str(path), max_chars=1)  # raises DataError: empty, binary, not UTF-8, too large, bad JSON
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        from .models import cache_dir
        target = cache_dir() / "uploads" / f"{digest}{path.suffix.lower()}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        return str(target)
    if kind == "hub":
        name = (hub_id or "").strip()
        if not name:
            raise LabError("type a Hugging Face dataset id, e.g. HuggingFaceFW/fineweb-edu:sample-10BT")
        source = name if name.startswith("hub:") else f"hub:{name}"
        load_texts(source, max_chars=1)  # offline, unknown or benchmark datasets fail here, with the fix
        return source
    raise LabError(f"unknown data source {kind!r}: choose one of {', '.join(DATA_SOURCES.values())}")


def start_training(spec, mode: str, data_kind: str, upload: str | None, hub_id: str | None, train_tokens,
                   heldout_tokens, seq_len, router_steps, minutes, name: str | None,
                   gate_up_steps=0, e2e_steps=0, adaptive_rounds=None) -> str:
    """Validate everything the user chose, then queue a training job; returns its id."""
    from .factorize import resolve_layers, validate_experts
    from .par import TrainConfig
    from .workflows import DataSpec

    if mode not in TRAIN_MODES.values():
        raise LabError(f"unknown training mode {mode!r}: choose one of {', '.join(TRAIN_MODES.values())}")
    minutes = float(minutes) if minutes not in (None, "") and float(minutes) > 0 else None
    cfg = TrainConfig(mode=mode, top_k=spec.top_k, router_steps=_int(router_steps, "router steps"), minutes=minutes,
                      seed=spec.seed, gate_up_steps=_int(gate_up_steps, "gate/up steps"),
                      e2e_steps=_int(e2e_steps, "end-to-end steps"),
                      adaptive_rounds=(TrainConfig.adaptive_rounds if adaptive_rounds in (None, "")
                                       else _int(adaptive_rounds, "per-token K rounds")))
    data = DataSpec(data_source(data_kind, upload, hub_id), _int(train_tokens, "train tokens"),
                    _int(heldout_tokens, "held-out tokens"), _int(seq_len, "sequence length"))
    if spec.model == "default" or Path(spec.model).expanduser().exists() or not hub_reachable():
        info = dense_info(spec.model)  # loads now (cached): bad models fail here, not in the job
        validate_experts(info["intermediate_size"], spec.num_experts, spec.shared_size)
        resolve_layers(spec.layers, info["num_layers"])
    run_name = sanitize_name(name or f"{Path(spec.model).name or 'model'}-{spec.num_experts}e{spec.top_k}k-"
                             f"{spec.split}-{mode}-{time.strftime('%m%d-%H%M%S')}")
    if (runs_root() / run_name).exists():
        raise LabError(f"a run named {run_name!r} already exists: pick another name or delete it first")
    if any(j.params.get("run") == run_name and not j.is_finished for j in get_manager().jobs()):
        raise LabError(f"a job is already making the run {run_name!r}: pick another name")
    check_writable()
    params = {"run": run_name, "spec": asdict(spec), "train": asdict(cfg), "data": asdict(data)}
    return _submit("train", run_name, _train_job, params)


def _submit(kind: str, name: str, fn, params: dict) -> str:
    """Queue a job and give it up to half a second to report, so the page shows progress at once."""
    manager = get_manager()
    job_id = manager.submit(kind, name, fn, params)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not manager.get(job_id).history:
        time.sleep(0.02)
    return job_id


def _train_job(ctx) -> dict:
    from .par import TrainConfig, TrainingCancelled
    from .workflows import DataSpec, FactorizeSpec, train_run

    p = ctx.params
    spec, cfg, data = FactorizeSpec(**p["spec"]), TrainConfig(**p["train"]), DataSpec(**p["data"])
    ctx.report(message=f"loading {spec.model}", phase="load")
    loaded = load_model(spec.model)

    def progress(rec: dict) -> None:
        if "step" in rec:  # a trainer step: one layer and phase over all training tokens
            where = f" layer {rec['layer']}" if rec.get("layer") is not None else ""
            ctx.report(step=rec["step"], total=rec["total"], tokens=rec["step"] * data.train_tokens,
                       losses=rec.get("losses") or {}, message=f"{rec['phase']}{where}", phase="train")
        else:
            ctx.report(message=rec.get("message"), phase=rec.get("phase"))

    try:
        result = train_run(spec, cfg, data, p["run"], loaded=loaded, progress=progress,
                           should_stop=lambda: ctx.cancelled)
    except TrainingCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    except OSError as exc:
        raise LabError(f"the run could not be saved: {readonly_hint(exc)}") from exc
    return {"run": result["name"], "seconds": result["seconds"], "heldout": result["heldout_by_k"]}


def start_eval(name: str, tasks: list[str], limit) -> str:
    """Queue a job scoring the run's missing K values on these tasks (a seeded subset of `limit` items)."""
    from .tasks import parse_tasks

    if not name:
        raise LabError("load a run first")
    tasks = parse_tasks(list(tasks or []) or "arc_easy")
    limit = _int(limit, "items per task") if limit not in (None, "", 0) else None
    missing = missing_evals(name, tasks, limit)
    if not missing:
        raise LabError(f"every K is already measured for {', '.join(tasks)} with {limit or 'all'} items")
    check_writable()
    return _submit("eval", name, _eval_job, {"run": name, "missing": missing, "limit": limit})


def missing_evals(name: str, tasks: list[str], limit: int | None) -> dict[str, list[int]]:
    """Task -> K values not yet stored for this run with the same items."""
    run = load_run(name)
    stored = (run.metrics.get("eval") or {}).get("tasks", {})
    ks = range(1, run.config["num_experts"] + 1)
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
    from .evaluate import run_sweep, store_eval

    p = ctx.params
    run = load_run(p["run"])
    loaded = load_model(run.config["model"])
    ctx.report(message="loading the run (a private copy)", phase="load")
    moe = load_moe(run, loaded.model)
    for i, (task, ks) in enumerate(p["missing"].items(), 1):
        def callback(done: int, total: int, message: str, i=i) -> None:
            ctx.check_cancel()
            ctx.report(step=done, total=total, message=f"{message} (task {i}/{len(p['missing'])})",
                       phase=f"eval {task}")

        sweep = run_sweep(loaded.model, loaded.tokenizer, moe, [task], ks, p["limit"], 0, progress=False,
                          callback=callback, dense_cache=_dense_scores.setdefault(run.config["model"], {}))
        try:
            store_eval(run.name, sweep)
        except OSError as exc:
            raise LabError(f"results could not be stored: {readonly_hint(exc)}") from exc
    return {"run": run.name, "tasks": list(p["missing"])}


def start_bench(name: str, prefill, decode, repeats) -> str:
    """Queue a wall-clock benchmark of dense vs every K of the run (stored in metrics["bench"])."""
    if not name:
        raise LabError("load a run first")
    params = {"run": name, "prefill": _int(prefill, "prefill tokens"), "decode": _int(decode, "decode tokens"),
              "repeats": _int(repeats, "repeats")}
    if params["prefill"] < 1 or params["repeats"] < 1 or params["decode"] < 0:
        raise LabError("prefill and repeats must be at least 1, decode at least 0")
    check_writable()
    return _submit("bench", name, _bench_job, params)


def _bench_job(ctx) -> dict:
    from .bench import run_benchmark
    from .runs import update_metrics

    p = ctx.params
    run = load_run(p["run"])
    loaded = load_model(run.config["model"])
    ctx.report(message="loading the run (a private copy)", phase="load")
    moe = load_moe(run, loaded.model)

    def progress(rec: dict) -> None:
        ctx.check_cancel()
        ctx.report(step=rec["step"], total=rec["total"], message=rec["phase"], phase="bench")

    result = run_benchmark(loaded.model, moe, prefill=p["prefill"], decode=p["decode"], batch=0,
                           repeats=p["repeats"], progress=progress)
    try:
        update_metrics(run.name, {"bench": result})
    except OSError as exc:
        raise LabError(f"results could not be stored: {readonly_hint(exc)}") from exc
    return {"run": run.name}


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
            job.state == "running" else None, "history": job.history, "result": job.result}


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
    return [[j.id, j.kind, j.name, j.state, "100%" if j.state == "done" else _pct(j.progress.get("fraction")),
             _duration(j.progress.get("elapsed_s")), j.error] for j in get_manager().jobs()[:10]]


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


# ---------------------------------------------------------------- routing
@dataclass
class Routing:
    """Routing of one text: tokens, layers, per layer chosen experts (per token a list, best first: K of
    them, or 0..N with per-token K) and probabilities (T, N)."""
    tokens: list[str]
    layers: list[int]
    top_k_index: dict[int, list[list[int]]]
    probs: dict[int, list[list[float]]]
    num_experts: int

    def loads(self) -> dict[int, list[float]]:
        """Per layer, the share of (token, slot) assignments each expert receives."""
        out = {}
        for i in self.layers:
            counts = torch.bincount(torch.tensor([e for row in self.top_k_index[i] for e in row], dtype=torch.long),
                                    minlength=self.num_experts).float()
            out[i] = (counts / counts.sum()).tolist()
        return out

    def load_entropy(self) -> list[float]:
        """Per layer, the entropy of the load over log N: 1 = even, 0 = one expert takes everything."""
        out = []
        for share in self.loads().values():
            out.append(-sum(p * math.log(p) for p in share if p > 0) / math.log(self.num_experts))
        return out


def route(name: str, text: str, top_k: int, trained: bool = True) -> Routing:
    """Run the run's factorized model (or its untrained twin) on `text` at K and record the routing."""
    if not name:
        raise LabError("load a run first (Factorize & train → runs on disk → Load)")
    if not (text or "").strip():
        raise LabError("type some text (or pick an example) to route")
    handle = run_handle(name, trained)
    ids = handle.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :MAX_ROUTE_TOKENS]
    with handle.guard():
        set_top_k(handle.model, _int(top_k, "K"))
        with torch.inference_mode(), record_routing(handle.model) as rec:
            handle.model(input_ids=ids, use_cache=False)
    chosen, probs = rec.stacked()
    layers = sorted(chosen)
    return Routing([handle.tokenizer.decode([t]) for t in ids[0].tolist()], layers,
                   {i: chosen_lists(chosen[i]) for i in layers}, {i: probs[i].tolist() for i in layers},
                   factorized_layers(handle.model)[layers[0]].num_experts)


# ---------------------------------------------------------------- trade-offs
def tradeoff_tasks(name: str | None) -> list[str]:
    """What the trade-off plot can show for this run: held-out agreement, the mean, each evaluated task."""
    if not name:
        return []
    m = load_run(name).metrics
    tasks = sorted(((m.get("eval") or {}).get("tasks") or {}))
    return ([HELDOUT_TASK] if any(m.get("heldout") or {}) else []) + ([MEAN_TASK] if tasks else []) + tasks


def tradeoff_view(name: str, task: str, top_k: int, seq_len: int) -> dict:
    """From stored results only: plot points, a table, FLOPs per component, measured speed."""
    run = load_run(name)
    m, shape = run.metrics, run_shape(name)
    info = dense_info(shape["model"])
    dense_flops = flops_per_token(info, seq_len)
    flops_k = {k: _run_flops(info, shape, k, seq_len) for k in range(1, shape["num_experts"] + 1)}
    gflops = {None: dense_flops["total"] / 1e9, **{k: f["total"] / 1e9 for k, f in flops_k.items()}}
    points, headers, rows, metric = _task_points(m, task, gflops)
    for row, point in zip(rows, points):
        row.insert(1, "◀ current" if point["k"] == top_k else "")
    return {"points": points, "metric": metric, "headers": [headers[0], ""] + headers[1:], "rows": rows,
            "flops": {"dense": dense_flops, f"K={top_k}": flops_k[top_k]}, "bench": bench_rows(m, top_k),
            "bench_note": bench_note(m)}


def _task_points(m: dict, task: str, gflops: dict) -> tuple[list[dict], list[str], list[list], str]:
    def point(label, k, score, stderr=None):
        return {"label": label, "k": k, "gflops": gflops[k], "score": score, "stderr": stderr}

    points, rows = [], []
    if task == HELDOUT_TASK:
        headers = ["model", "agreement", "perplexity", "KL (nats/token)", "tokens", "GFLOPs/token"]
        held = {int(k): v for k, v in (m.get("heldout") or {}).items() if v}
        if held:
            first = next(iter(held.values()))
            points.append(point("dense", None, 1.0))
            rows.append(["dense", "100%", round(first["dense_perplexity"], 3), 0.0, first["tokens"], gflops[None]])
        for k, v in sorted(held.items()):
            points.append(point(f"K={k}", k, v["agreement"]))
            rows.append([f"K={k}", _pct(v["agreement"]), round(v["perplexity"], 3), round(v["kl"], 4), v["tokens"],
                         gflops[k]])
        return points, headers, _round(rows), "top-1 agreement with dense"
    ev = m.get("eval") or {}
    if task == MEAN_TASK:
        headers = ["model", "relative (capped)", "relative (uncapped)", "above-chance retention", "tasks"]
        points.append(point("dense", None, 1.0))
        rows.append(["dense", "100%", "100%", "100%", ", ".join(sorted(ev.get("tasks", {})))])
        for k, s in sorted(((ev.get("summary") or {}).get("k") or {}).items(), key=lambda kv: int(kv[0])):
            if s.get("relative_capped") is not None:
                points.append(point(f"K={k}", int(k), s["relative_capped"]))
            excluded = s.get("above_chance_excluded") or []
            note = f" (undefined for {', '.join(excluded)}: left out)" if excluded else ""
            ci = s.get("ci95") or {}
            rows.append([f"K={k}", f"{_pct(s.get('relative_capped'))}{_ci(ci.get('relative_capped'))}",
                         _pct(s.get("relative")), f"{_pct(s.get('above_chance'))}{_ci(ci.get('above_chance'))}{note}",
                         ", ".join(s.get("tasks", []))])
        return points, headers, rows, "relative maintenance (factorized / dense)"
    entry = (ev.get("tasks") or {}).get(task)
    if not entry:
        return [], ["model"], [], "score"
    metric = entry.get("main_metric", "acc")
    headers = ["model", metric, "± stderr", "acc", "acc_norm", "relative", "above chance", "items", "GFLOPs/token"]
    d = entry["dense"]
    points.append(point("dense", None, d[metric], d["stderr"].get(metric)))
    rows.append(["dense", _pct(d[metric]), _pct(d["stderr"].get(metric)), _pct(d["acc"]), _pct(d.get("acc_norm")),
                 "100%", "100%", d["n"], gflops[None]])
    for k, r in sorted(entry["k"].items(), key=lambda kv: int(kv[0])):
        points.append(point(f"K={k}", int(k), r[metric], r["stderr"].get(metric)))
        rows.append([f"K={k}", _pct(r[metric]), _pct(r["stderr"].get(metric)), _pct(r["acc"]), _pct(r.get("acc_norm")),
                     _pct(r.get("relative")), _pct(r.get("above_chance")) or "undefined (dense ≤ chance)", r["n"],
                     gflops[int(k)]])
    return points, headers, _round(rows), f"{task} {metric} (chance {_pct(entry.get('chance'))})"


def _round(rows: list[list]) -> list[list]:
    return [[round(v, 4) if isinstance(v, float) else v for v in row] for row in rows]


def bench_rows(m: dict, top_k: int) -> list[list] | None:
    """Measured speed ratios per K from metrics["bench"], or None when no benchmark was stored."""
    bench = m.get("bench")
    if not bench or "k" not in bench:
        return None
    raw = bench.get("raw", {})
    rows = []
    for k, speed in sorted(bench["k"].items(), key=lambda kv: int(kv[0])):
        limits = bench.get("limits", {}).get(k, {})
        decode = raw.get("decode", {})
        rows.append([f"K={k}{' ◀' if int(k) == top_k else ''}", _ratio(speed.get("prefill_speedup")),
                     _ratio(limits.get("prefill")), _ratio(speed.get("decode_speedup")), _ratio(limits.get("decode")),
                     _ratio(speed.get("ffn_speedup")),
                     f"{decode[k]['tokens_per_s']:.1f} vs {decode['dense']['tokens_per_s']:.1f}"
                     if k in decode and "dense" in decode else None])
    return rows


def bench_note(m: dict) -> str | None:
    """How the stored benchmark was measured, so a noisy number can be judged; None without one."""
    bench = m.get("bench")
    if not bench or "settings" not in bench:
        return None
    s, machine = bench["settings"], bench.get("machine", {})
    load = machine.get("load_average_before")
    return (f"prefill {s.get('prefill')} tokens, decode {s.get('decode')} tokens, median of {s.get('repeats')} "
            f"alternating repeats, {machine.get('threads')} threads on {machine.get('cpu') or machine.get('device')}"
            f"{f', load average {load[0]:.1f} before' if load else ''}")


BENCH_COLUMNS = ["K", "prefill speedup", "prefill limit (FLOPs)", "decode speedup", "decode limit (FLOPs)",
                 "one FFN layer speedup", "decode tokens/s (K vs dense)"]


def _ratio(x: float | None) -> str | None:
    return None if x is None else f"{x:.2f}×"


def newest_run() -> str | None:
    """The most recently created readable run, if any."""
    names = run_names()
    return names[0] if names else None


def env_flag(name: str) -> bool:
    """True when an environment variable is set to something other than 0/false/no."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
