"""A resumable grid of factorize -> train -> evaluate settings, one JSON row per setting.

Config file (JSON):
  {"base": {...}, "grid": {"key": [values, ...], ...}, "rows": [{...}, ...],
   "eval": {"tasks": "arc_easy,piqa", "limit": 500, "seed": 0, "ks": [1, 2]}}
A setting holds Recipe fields (factorlab.recipe; `python -m factorlab recipe` lists them), optionally
"preset" (the recipe it starts from, default `default`) and "label" (a name for the tables).
Rows = every combination of grid values over base, plus `rows` (each over base).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

from .recipe import Recipe, preset, recipe_fields
from .runs import atomic_write_json
from .workflows import train_model

log = logging.getLogger(__name__)

_EXTRA = {"label", "preset"}  # setting keys that are not Recipe fields


def expand(config: dict) -> list[dict]:
    """Every setting of the grid (base overridden by each combination), then the explicit rows."""
    if "data" in config:
        raise ValueError("the grid's `data` block is gone: put its settings in `base` as Recipe fields "
                         "(data, train_tokens, heldout_tokens, seq_len)")
    base = config.get("base", {})
    grid = config.get("grid", {})
    keys = list(grid)
    settings = [{**base, **dict(zip(keys, combo))} for combo in itertools.product(*(grid[k] for k in keys))]
    if not keys and config.get("rows"):
        settings = []  # only explicit rows: the bare base is not a row of its own
    settings += [{**base, **row} for row in config.get("rows", [])]
    names = {f.name for f in recipe_fields()}
    for s in settings:
        unknown = set(s) - names - _EXTRA
        if unknown:
            raise ValueError(f"unknown setting(s) {sorted(unknown)}: use Recipe fields (`python -m factorlab "
                             "recipe` lists them), `preset` or `label`")
        setting_recipe(s)  # every row is checked before the first one trains
    return settings


def setting_recipe(setting: dict) -> Recipe:
    """The Recipe of one grid row: its preset (default `default`) with the row's fields."""
    return preset(setting.get("preset", "default"), **{k: v for k, v in setting.items() if k not in _EXTRA})


def setting_key(setting: dict, config: dict) -> str:
    """Stable id of a row: its setting plus the eval settings."""
    blob = json.dumps({"s": setting, "e": config.get("eval", {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_experiment(config: dict, out_path: str | Path, progress=None, shard: tuple[int, int] | None = None) -> dict:
    """Run every row not already in out_path (resumable); rewrite out_path after each row.

    shard (i, n): only rows i, i+n, ... (to spread a grid over processes, each with its own out_path).
    """
    from .evaluate import run_sweep
    from .models import load_model

    out_path = Path(out_path)
    done = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    finished = {r["key"] for r in done["rows"] if r.get("status") == "done"}
    settings = expand(config)
    ev = config.get("eval", {})
    dense_caches: dict[str, dict] = {}
    cache_file = Path(ev["dense_cache"]) if ev.get("dense_cache") else None
    for n, setting in enumerate(settings):
        if shard and n % shard[1] != shard[0]:
            continue
        key = setting_key(setting, config)
        if key in finished:
            log.info("row %d/%d already done: %s", n + 1, len(settings), setting)
            continue
        recipe = setting_recipe(setting)
        log.info("row %d/%d: %s", n + 1, len(settings), setting)
        if progress:
            progress({"row": n + 1, "rows": len(settings), "setting": setting})
        loaded = load_model(recipe.model)
        start = time.perf_counter()
        trained = train_model(recipe, loaded=loaded, eval_ks=ev.get("ks") and sorted(set(ev["ks"])))
        row = {"key": key, "status": "done", "setting": setting, "recipe": recipe.to_dict(), "train_seconds": round(trained.seconds, 1),
               "train_tokens": trained.tokens, "heldout": trained.heldout,
               "router_label_accuracy": trained.result.summary()["mean_router_label_accuracy"]}
        if ev.get("tasks"):
            cache = dense_caches.setdefault(recipe.model, {})
            if cache_file:
                cache.update(read_dense_cache(cache_file, recipe.model))
            sweep = run_sweep(loaded.model, loaded.tokenizer, trained.moe, ev["tasks"], ev.get("ks") or [recipe.top_k],
                              limit=ev.get("limit"), seed=ev.get("seed", 0), data_dir=ev.get("data_dir"),
                              batch_size=ev.get("batch_size", 16), progress=False, dense_cache=cache)
            if cache_file:
                write_dense_cache(cache_file, recipe.model, cache)
            row["eval"] = sweep
            if ev.get("summary_tasks"):  # e.g. the seven tasks of a goal, with MMLU scored but kept apart
                from .evaluate import summarize

                keep = parse_summary_tasks(ev["summary_tasks"])
                sweep["summary_subset"] = {"tasks": keep, **summarize(
                    {t: v for t, v in sweep["tasks"].items() if t in keep})}
        row["gflops_per_token"] = gflops_by_k(loaded.model, trained.moe, sorted({int(k) for k in trained.heldout}
                                                                                  | {recipe.top_k}))
        row["total_seconds"] = round(time.perf_counter() - start, 1)
        done["rows"] = [r for r in done["rows"] if r["key"] != key] + [row]
        atomic_write_json(out_path, done)
    return done


def read_dense_cache(path: Path, model: str) -> dict:
    """Dense task scores saved by an earlier (or a parallel) experiment: {(task, limit, seed, split, source): TaskScores}."""
    from .evaluate import TaskScores

    if not path.exists():
        return {}
    stored = json.loads(path.read_text()).get(model, {})
    return {tuple(json.loads(k)): TaskScores(**v) for k, v in stored.items()}


def write_dense_cache(path: Path, model: str, cache: dict) -> None:
    """Merge this process's dense scores into the file (other models' and processes' entries kept)."""
    from dataclasses import asdict

    data = json.loads(path.read_text()) if path.exists() else {}
    entries = data.setdefault(model, {})
    for key, scores in cache.items():
        entries[json.dumps(list(key))] = asdict(scores)
    atomic_write_json(path, data)


def parse_summary_tasks(value) -> list[str]:
    return [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)


def gflops_by_k(dense, moe, ks, seq_len: int = 512) -> dict:
    """GFLOPs per token of the dense model and the factorized one at each K (sequence of seq_len)."""
    from .evaluate import gflops
    from .models import model_info

    info = model_info(dense)
    return {"seq_len": seq_len, "dense": gflops(info, seq_len),
            **{str(k): gflops(info, seq_len, moe, k) for k in ks}}


def table(rows: list[dict], k: str | None = None) -> list[dict]:
    """One flat line per row and K: setting, time, held-out ppl/agreement, eval summary."""
    out = []
    for r in rows:
        ks = [k] if k else sorted(r.get("heldout", {}) or {"": None})
        for kk in ks:
            h = (r.get("heldout") or {}).get(kk, {})
            ev = r.get("eval") or {}
            summ = (ev.get("summary_subset") or ev.get("summary") or {}).get("k", {}).get(kk, {})
            out.append({"label": r["setting"].get("label", ""), "K": kk, "train_s": r.get("train_seconds"),
                        "ppl": h.get("perplexity"), "dense_ppl": h.get("dense_perplexity"),
                        "agreement": h.get("agreement"), "relative": summ.get("relative_capped"),
                        "above_chance": summ.get("above_chance"),
                        "gflops": (r.get("gflops_per_token") or {}).get(kk)})
    return out
