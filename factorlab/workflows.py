"""Whole operations shared by the CLI, the app and the experiments: factorize, train, evaluate and
benchmark a run, and store what they measured. The only layer that writes the run store."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import parallel
from .factorize import Partition, build_moe, calibration_inputs, make_partition
from .flops import flops_table
from .models import DEFAULT_HUB_ID, load_model, model_info
from .moe import factorized_layers, set_top_k
from .recipe import Recipe
from .runs import load_moe, load_run, moe_tensors, run_path, sanitize_name, save_run, update_metrics, write_log

log = logging.getLogger(__name__)

# A fixed, varied English sample for the exactness check (not benchmark text).
CHECK_TEXT = (
    "The history of science is full of surprises. In 1905 Albert Einstein published four papers that changed "
    "physics, while working as a clerk in a patent office. Water boils at 100 degrees Celsius at sea level, "
    "but at lower temperatures on a mountain. def add(a, b):\n    return a + b\n"
    "Q: What is the capital of Japan? A: Tokyo is the capital of Japan, a city of about 14 million people."
)
FLOPS_SEQ_LEN = 512  # the context length FLOPs tables are quoted at

Progress = Callable[[dict], None]


# ---------------------------------------------------------------- factorize
def calibration_ids(loaded, recipe: Recipe) -> torch.Tensor:
    """Calibration token rows for the split and the shared neurons: the training side of the recipe's text
    when it is on disk (cheap), else of the built-in text."""
    from .data import BUILTIN_DEFAULT, reads_from_disk
    from .data import calibration_ids as data_calibration_ids

    source = recipe.data if reads_from_disk(recipe.data) else BUILTIN_DEFAULT
    return data_calibration_ids(loaded.tokenizer, num_tokens=recipe.calibration_tokens, model=loaded, source=source)


def factorize(recipe: Recipe, loaded=None) -> tuple:
    """Load the model, validate the recipe against it, and build the partition and the MoE model.

    Returns (loaded, partition, moe); the MoE model shares every weight but its FFNs' with the dense one."""
    loaded = loaded or load_model(recipe.model)
    layers = recipe.validate(model_info(loaded.model))
    inputs = None  # FFN inputs on calibration text, for the cluster split and the shared neurons
    if recipe.split == "cluster" or recipe.shared_size:
        calib = calibration_ids(loaded, recipe).to(next(loaded.model.parameters()).device)
        # data-parallel: each process passes its block of the calibration rows, and the FFN inputs are gathered
        # (rank order = the one-process order), so every process computes the one-process split
        inputs = {i: parallel.gather_rows(x)
                  for i, x in calibration_inputs(loaded.model, parallel.shard(calib), layers).items()}
    partition = make_partition(loaded.model, recipe.num_experts, recipe.split, layers, seed=recipe.seed,
                               shared_size=recipe.shared_size, inputs=inputs)
    for permutation in partition.permutations.values():  # the main process's split everywhere (no-op alone)
        parallel.broadcast_(permutation)
    moe = build_moe(loaded.model, partition, recipe.top_k, recipe.output_mode, router_seed=recipe.seed)
    return loaded, partition, moe


def exactness_check(dense: nn.Module, moe: nn.Module, tokenizer, fp64: bool = False) -> dict:
    """Max |logit difference| of the factorized model at K=N (scaled) against dense, on CHECK_TEXT."""
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    layers = factorized_layers(moe)
    saved = {i: (m.top_k, m.output_mode, m.thresholds, m.expected_k, m.min_experts) for i, m in layers.items()}
    try:
        for m in layers.values():
            m.set_thresholds(None)
            m.set_top_k(m.num_experts)
            m.set_output_mode("scaled")
        with torch.no_grad():
            ref = dense(ids).logits
            out = moe(ids).logits
    finally:
        for i, m in layers.items():
            top_k, mode, thresholds, expected, least = saved[i]
            m.set_thresholds(thresholds, expected, least)
            m.set_top_k(top_k)
            m.set_output_mode(mode)
    diff = (out - ref).abs().max().item()
    result = {"max_abs_logit_diff": diff, "max_abs_logit": ref.abs().max().item(), "tokens": ids.shape[1]}
    if fp64:
        # The same check in float64 separates the maths (exact) from fp32 summation-order noise.
        dense64, moe64 = (m.double() for m in copy.deepcopy((dense, moe)))
        result["max_abs_logit_diff_fp64"] = exactness_check(dense64, moe64, tokenizer)["max_abs_logit_diff"]
        with torch.no_grad():  # the fp32 noise floor: the dense model itself against its fp64 copy
            result["dense_fp32_vs_fp64"] = (dense64(ids).logits - ref.double()).abs().max().item()
    return result


def run_config(recipe: Recipe, partition: Partition, loaded, moe: nn.Module) -> dict:
    """What a run's config.json holds: the recipe once, and facts derived from it (never a setting twice)."""
    config = {"recipe": recipe.to_dict(), "model_source": loaded.source, "layers": partition.layers,
              "expert_size": partition.expert_size, "intermediate_size": partition.intermediate_size}
    per_token = {str(i): [round(float(v), 4) for v in m.expected_k]
                 for i, m in factorized_layers(moe).items() if m.adaptive}
    if per_token:  # per-token K: the mean experts per token training measured at each K
        config["per_token_k"] = per_token
    return config


def factorize_run(recipe: Recipe, *, name: str | None = None, runs_dir=None, loaded=None,
                  overwrite: bool = False) -> dict:
    """Factorize (no training), check exactness at K=N, compute FLOPs per K, and (if named) save the run.

    A saved factorize-only run has an untrained router and untouched experts: its recipe's mode is `none`."""
    start = time.perf_counter()
    loaded, partition, moe = factorize(recipe, loaded)
    seconds = time.perf_counter() - start
    check = exactness_check(loaded.model, moe, loaded.tokenizer, fp64=True)
    flops = flops_table(model_info(loaded.model), FLOPS_SEQ_LEN, recipe.num_experts,
                        factorized_layers=partition.layers, shared_size=recipe.shared_size)
    result = {"model": recipe.model, "model_source": loaded.source, "num_experts": recipe.num_experts,
              "top_k": recipe.top_k, "split": recipe.split, "layers": partition.layers,
              "expert_size": partition.expert_size, "shared_size": recipe.shared_size,
              "factorize_seconds": round(seconds, 3), **check, "flops_seq_len": FLOPS_SEQ_LEN,
              "flops": flops, "ffn_ratio_by_k": {k: v["ffn_ratio"] for k, v in flops["k"].items()}, "run": None}
    if name:
        saved = recipe.replace(mode="none")
        path = save_run(sanitize_name(name), run_config(saved, partition, loaded, moe),
                        moe_tensors(moe, partition, ()), {"exactness": check, "factorize_seconds": seconds},
                        root=runs_dir, overwrite=overwrite)
        result["run"] = str(path)
    result["_moe"] = moe
    return result


# ---------------------------------------------------------------- train
def load_data(loaded, recipe: Recipe, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token rows of the recipe's text (cached where the source caches)."""
    from .data import train_heldout

    opts = {"progress": progress} if progress else {}
    return train_heldout(recipe.data, loaded.tokenizer, recipe.train_tokens, recipe.heldout_tokens, recipe.seq_len,
                         recipe.seed, model=loaded, **opts)


@dataclass
class Trained:
    """A factorized model trained in memory, with what is needed to save or evaluate it."""
    recipe: Recipe
    loaded: object
    partition: Partition
    moe: nn.Module
    result: object  # par.TrainResult
    seconds: float
    tokens: int
    heldout: dict  # K -> held-out metrics


def tuned_params(recipe: Recipe) -> tuple[str, ...]:
    """The expert tensors a recipe's training changes (the rest are rebuilt from the partition on load)."""
    if recipe.mode != "experts":
        return ()
    if recipe.e2e_steps and recipe.e2e_params == "all":
        return ("gate_up", "down", "shared_gate_up", "shared_down")
    return ("down", "shared_down")


def default_eval_ks(recipe: Recipe) -> list[int]:
    """The K values held-out metrics are measured at by default: every K in 1..N (each its own model: its own
    refit, and K = N the dense model again), so the K slider shows a measured value everywhere."""
    return list(range(1, recipe.num_experts + 1))


def train_model(recipe: Recipe, *, loaded=None, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None, eval_ks: list[int] | None = None,
                device: str | torch.device | None = None) -> Trained:
    """Factorize, train with PAR and measure held-out metrics per K, all in memory.

    device: where to train (e.g. "cuda"); the model is moved there (in place: a shared copy moves
    too) after the text is prepared. None: where the model is.
    Data-parallel (started by `accelerate launch`, see factorlab.parallel): each process trains on its block
    of the rows and scores its block of the held-out rows; only the main process reports progress."""
    from .evaluate import heldout_metrics
    from .par import TrainingCancelled, train

    progress = progress if parallel.is_main() else None

    def emit(rec: dict) -> None:
        if progress:
            progress(rec)

    def check() -> None:
        if should_stop and should_stop():
            raise TrainingCancelled("training cancelled")

    loaded = loaded or load_model(recipe.model)
    recipe.validate(model_info(loaded.model))  # before the text is prepared: a bad N fails at once
    memory = memory_plan(loaded, recipe, device)  # refuses a recipe that cannot fit
    emit({"phase": "memory", "message": f"peak memory about {memory.peak / 2**30:.2f} GiB per process"})
    emit({"phase": "data", "message": f"preparing {recipe.train_tokens} training tokens from {recipe.data}"})

    def data_progress(done: int, wanted: int) -> None:
        check()  # raising here drops the batch being generated cleanly
        emit({"phase": "data", "message": f"generating training text: {done}/{wanted}"})

    with parallel.main_first():  # text generated once (the main process caches it), then read by the others
        train_ids, heldout_ids = load_data(loaded, recipe, data_progress)
    check()
    train_ids, heldout_ids = _shards(train_ids, heldout_ids)
    if device is not None:
        loaded.model.to(device)
        train_ids, heldout_ids = train_ids.to(device), heldout_ids.to(device)
    emit({"phase": "factorize", "message": f"{recipe.split} split into {recipe.num_experts} experts"})
    start = time.monotonic()  # the budget (recipe.minutes) and the reported seconds cover the split too
    loaded, partition, moe = factorize(recipe, loaded)
    check()
    result = train(loaded.model, moe, train_ids, recipe, progress=progress, should_stop=should_stop, started=start,
                   cache_teacher=memory.cache_teacher)
    seconds = time.monotonic() - start
    heldout = {}
    if heldout_ids.numel():
        for k in eval_ks or default_eval_ks(recipe):
            check()
            emit({"phase": "heldout", "message": f"held-out metrics at K={k}"})
            set_top_k(moe, k)
            heldout[str(k)] = parallel.reduce_heldout(heldout_metrics(loaded.model, moe, heldout_ids))
        set_top_k(moe, recipe.top_k)
    return Trained(recipe, loaded, partition, moe, result, seconds, result.tokens, heldout)


def memory_plan(loaded, recipe: Recipe, device=None):
    """The memory estimate of training `recipe` on this loaded model here (memory.plan), decided by the main
    process for all; raises MemoryPlanError when what training adds to the weights cannot fit."""
    from .memory import MemoryPlanError, plan

    param = next(loaded.model.parameters())
    where = str(device if device is not None else param.device)
    choice = None
    if parallel.is_main():
        try:
            choice = plan(model_info(loaded.model), recipe, processes=parallel.world_size(),
                          dtype_bytes=param.element_size(), device=where, weights_loaded=True)[0]
        except MemoryPlanError as exc:
            choice = exc
    choice = parallel.broadcast_value(choice)
    if isinstance(choice, MemoryPlanError):
        raise choice
    return choice


def _shards(train_ids: torch.Tensor, heldout_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's blocks of the training and held-out rows (all of them in one process)."""
    world = parallel.world_size()
    for what, rows, setting in (("training", train_ids, "train_tokens"), ("held-out", heldout_ids, "heldout_tokens")):
        if 0 < rows.shape[0] < world:
            raise ValueError(f"{rows.shape[0]} {what} rows cannot be split over {world} processes: raise "
                             f"{setting} to at least {world} rows of seq_len tokens, or use fewer processes")
    return parallel.shard(train_ids), parallel.shard(heldout_ids)


def train_run(recipe: Recipe, name: str, *, runs_dir=None, loaded=None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, overwrite: bool = False,
              eval_ks: list[int] | None = None, device: str | torch.device | None = None) -> dict:
    """train_model, then save the run (all or nothing: a failed or cancelled job writes nothing)."""
    name = sanitize_name(name)
    if run_path(name, runs_dir).exists() and not overwrite:
        raise ValueError(f"a run named {name!r} already exists: pick another name or delete it first")
    t = train_model(recipe, loaded=loaded, progress=progress, should_stop=should_stop, eval_ks=eval_ks,
                    device=device)
    summary = t.result.summary()
    where = str(next(t.loaded.model.parameters()).device)  # the seconds depend on it
    metrics = {"train": {**summary, "seconds": t.seconds, "tokens": t.tokens, "device": where,
                         "processes": parallel.world_size()}, "heldout": t.heldout}
    path = run_path(name, runs_dir)
    if parallel.is_main():  # data-parallel: every process holds the same model; one writes it
        path = save_run(name, run_config(recipe, t.partition, t.loaded, t.moe),
                        moe_tensors(t.moe, t.partition, tuned_params(recipe)), metrics, root=runs_dir,
                        overwrite=overwrite)
        write_log(path, t.result.log)
    parallel.barrier()
    return {"run": str(path), "name": path.name, "seconds": t.seconds, "tokens": t.tokens,
            "heldout": t.heldout.get(str(recipe.top_k), {}), "heldout_by_k": t.heldout, "train": summary,
            "recipe": recipe.to_dict(), "_moe": t.moe}


# ---------------------------------------------------------------- evaluate and benchmark a saved run
def open_run(name: str, runs_dir=None) -> tuple:
    """(run, loaded dense model, its factorized model) of a saved run: a private factorized copy."""
    run = load_run(name, runs_dir)
    loaded = load_model(run.recipe.model)
    return run, loaded, load_moe(run, loaded.model)


def evaluate_run(name: str, tasks, ks: list[int], *, limit: int | None = None, seed: int = 0, data_dir=None,
                 split: str | None = None, batch_size: int = 16, runs_dir=None, store: bool = True,
                 progress: bool = False, callback=None, dense_cache: dict | None = None) -> dict:
    """Benchmark sweep of a run (dense once, the run at each K, the same items); merged into its metrics."""
    from .evaluate import run_sweep

    run, loaded, moe = open_run(name, runs_dir)
    sweep = run_sweep(loaded.model, loaded.tokenizer, moe, tasks, ks, limit=limit, seed=seed, data_dir=data_dir,
                      split=split, batch_size=batch_size, progress=progress, callback=callback,
                      dense_cache=dense_cache)
    sweep["model"], sweep["run"] = run.recipe.model, run.name
    if store:
        store_eval(run.name, sweep, runs_dir)
    return sweep


def store_eval(run_name: str, sweep: dict, root=None) -> dict:
    """Merge a sweep into the run's metrics.json under "eval": other tasks and K values are kept; a
    task scored on different items (limit, seed, split, n) replaces the old entry. Returns the merged eval."""
    from .evaluate import summarize

    current = load_run(run_name, root).metrics.get("eval") or {}
    tasks = dict(current.get("tasks", {}))
    same = ("limit", "seed", "split", "n")
    for task, new in sweep["tasks"].items():
        old = tasks.get(task)
        if old and all(old.get(f) == new.get(f) for f in same):
            new = {**new, "k": {**old.get("k", {}), **new["k"]}}
        tasks[task] = new
    merged = {"tasks": tasks, "summary": summarize(tasks)}
    update_metrics(run_name, {"eval": merged}, root)
    return merged


def bench_run(name: str, ks: list[int] | None = None, *, prefill: int = 512, decode: int = 64, batch: int = 8,
              repeats: int = 5, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              runs_dir=None, store: bool = True, progress: Progress | None = None) -> dict:
    """Wall-clock dense vs the run's factorized model (bench.run_benchmark); stored under metrics["bench"]."""
    from .bench import run_benchmark

    run, loaded, moe = open_run(name, runs_dir)
    dense = loaded.model.to(device=device, dtype=dtype)
    moe = moe.to(device=device, dtype=dtype)
    result = run_benchmark(dense, moe, ks, prefill=prefill, decode=decode, batch=batch, repeats=repeats,
                           progress=progress)
    result["model"], result["run"] = run.recipe.model, run.name
    if store:
        update_metrics(run.name, {"bench": result}, runs_dir)
    return result


def fidelity_run(name: str, ks: list[int] | None = None, *, runs_dir=None, store: bool = True,
                 progress: Callable[[str, float], None] | None = None) -> dict:
    """Chat fidelity of a run at each K (fidelity.chat_fidelity); stored under metrics["chat_fidelity"], where K
    values measured before on the same prompts are kept."""
    from .fidelity import chat_fidelity

    run = load_run(name, runs_dir)
    loaded = load_model(run.recipe.model)  # the process-wide copy: only read here
    moe = load_moe(run, loaded.model)
    result = chat_fidelity(loaded.model, moe, loaded.tokenizer, ks or default_eval_ks(run.recipe), progress=progress)
    result["model"], result["run"] = run.recipe.model, run.name
    if store:
        old = run.metrics.get("chat_fidelity") or {}
        if old.get("prompts") == result["prompts"] and old.get("settings") == result["settings"]:
            for part in ("by_k", "per_prompt", "replies"):
                result[part] = {**old.get(part, {}), **result[part]}
        update_metrics(run.name, {"chat_fidelity": result}, runs_dir)
    return result


# ---------------------------------------------------------------- export a run
CHAT_CHECK = "What is the capital of France? Answer in one sentence."  # the greedy-generation check's prompt


def export_run(name: str, out_dir, *, fmt: str = "qwen2_moe", top_k: int | None = None, runs_dir=None,
               store: bool = True, overwrite: bool = False, command: str | None = None,
               progress: Progress | None = None) -> dict:
    """Write a run as a standard transformers MoE checkpoint in out_dir (factorlab.export), load it back with plain
    transformers and compare it with the run; for per-token K runs (exported at a fixed K) measure the difference
    on the run's held-out text. The summary goes into the model card and (store) the run's metrics["export"]."""
    from . import export as ex
    from .evaluate import heldout_metrics
    from .runs import versions

    def emit(message: str) -> None:
        log.info(message)
        if progress:
            progress({"phase": "export", "message": message})

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: give a folder for the export")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty: choose a new folder or pass overwrite")
    emit(f"loading run {name}")
    run, loaded, moe = open_run(name, runs_dir)
    plan = ex.plan_export(moe, fmt, top_k)
    ex.check_source(loaded.model)
    approximation = None
    if not plan.exact:  # per-token K: the run itself against the fixed K that the export computes
        emit(f"measuring the fixed K={plan.top_k} against the run's per-token K on held-out text")
        heldout_ids = load_data(loaded, run.recipe)[1]
        if heldout_ids.numel():
            fixed = ex.fix_k(load_moe(run, loaded.model), plan.top_k)
            with torch.no_grad():
                of_run, of_export = (heldout_metrics(loaded.model, m, heldout_ids) for m in (moe, fixed))
                vs_run = heldout_metrics(moe, fixed, heldout_ids)
            approximation = {"tokens": of_run["tokens"], "dense_perplexity": of_run["dense_perplexity"],
                             "run": of_run, "export": of_export, "vs_run": vs_run,
                             "perplexity_change": of_export["perplexity"] - of_run["perplexity"],
                             "agreement_change": of_export["agreement"] - of_run["agreement"]}
    ex.fix_k(moe, plan.top_k)
    emit(f"building {ex.CLASSES[fmt]} ({plan.routing})")
    hf = ex.build_export(moe, plan)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        del hf
        emit("loading the export back with plain transformers and comparing it with the run")
        check, back = ex.verify_export(moe, tmp, loaded.tokenizer, CHECK_TEXT, CHAT_CHECK)
        info = model_info(loaded.model)
        summary = {
            "run": run.name, "model": run.recipe.model, "model_source": loaded.source, "format": fmt,
            "class": ex.CLASSES[fmt], "plan": plan.to_dict(), "check": check, "approximation": approximation,
            "size": {"export_parameters": ex.parameter_count(back), "dense_parameters": ex.parameter_count(loaded.model),
                     "export_bytes": ex.folder_bytes(tmp), "dense_bytes": ex.tensor_bytes(loaded.model)},
            "flops": {"seq_len": FLOPS_SEQ_LEN, "dense": flops_table(info, FLOPS_SEQ_LEN, 1, [1])["dense"],
                      "export": ex.export_flops(info, plan, FLOPS_SEQ_LEN),
                      "run": flops_table(info, FLOPS_SEQ_LEN, run.recipe.num_experts, [plan.top_k], run.layers,
                                         run.recipe.shared_size, run.per_token_k)["k"][str(plan.top_k)]},
            "recipe": run.recipe.to_dict(), "preset": run.recipe.preset_name(), "metrics": run.metrics,
            "base_model": DEFAULT_HUB_ID if run.recipe.model == "default" else
            (run.recipe.model if not Path(run.recipe.model).exists() else None),
            "versions": versions(), "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command or f"python -m factorlab export {run.name} OUT_DIR --format {fmt} --k {plan.top_k}"}
        del back
        (tmp / "README.md").write_text(ex.model_card(summary))
        ex.check_folder(tmp)
        ex.replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.pop("metrics")
    summary["folder"] = str(out)
    if store:
        stored = dict(load_run(run.name, runs_dir).metrics.get("export") or {})
        stored[f"{fmt} K={plan.top_k}"] = summary
        update_metrics(run.name, {"export": stored}, runs_dir)
    return summary


# ---------------------------------------------------------------- the expert atlas
def atlas_run(name: str, *, runs_dir=None, upload: str | None = None, settings=None, domains: dict | None = None,
              store: bool = True, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """The expert atlas of a saved run (factorlab.atlas) on the default corpus (or `domains`: label -> source)
    plus an uploaded text, stored in the run's folder as atlas.json (atomically; a cancelled job stores nothing)."""
    from .atlas import ATLAS_FILE, AtlasSettings, build_corpus, compute_atlas
    from .runs import atomic_write_json

    settings = settings or AtlasSettings()
    started = time.perf_counter()
    run, loaded, moe = open_run(name, runs_dir)
    untrained = {i: m.router.linear.weight.detach().clone()
                 for i, m in factorized_layers(load_moe(run, loaded.model, trained=False)).items()}
    corpus = build_corpus(loaded, settings, upload=upload, domains=domains, progress=progress, should_stop=should_stop)
    setup = time.perf_counter() - started
    atlas = compute_atlas(moe, loaded.model, loaded.tokenizer, untrained, corpus, settings, progress=progress,
                          should_stop=should_stop)
    atlas["run"], atlas["model"] = run.name, run.recipe.model
    atlas["timing"]["setup_seconds"] = setup  # loading the run and the corpus (a first selfgen generates text)
    if store:
        atomic_write_json(run_path(run.name, runs_dir) / ATLAS_FILE, atlas, in_run=True)
    return atlas


def stored_atlas(name: str, runs_dir=None) -> dict | None:
    """The atlas stored with a run, or None if it has none yet."""
    import json

    from .atlas import ATLAS_FILE

    path = run_path(load_run(name, runs_dir).name, runs_dir) / ATLAS_FILE
    return json.loads(path.read_text()) if path.exists() else None
