"""The run store: runs/<name>/ with config.json, tensors.safetensors, metrics.json, train_log.jsonl.

Every write goes to a temporary file that is renamed into place, so a crash or a cancelled job
never leaves a half-written file; a new run is built in a temporary folder and renamed whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .factorize import Partition, build_moe
from .moe import factorized_layers
from .recipe import Recipe, layers_text

EXPERT_TENSORS = ("gate_up", "down", "shared_gate_up", "shared_down")
CONFIG, TENSORS, METRICS, LOG = "config.json", "tensors.safetensors", "metrics.json", "train_log.jsonl"
FORMAT_VERSION = 2  # 2: the settings are one `recipe`; 1: spec/train/data (read by legacy_recipe)
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_metrics_lock = threading.Lock()


class RunError(RuntimeError):
    """A run cannot be found, read or written; the message says which and why."""


# A Hugging Face Space with persistent storage mounts it here; its runs then survive restarts.
PERSISTENT_STORAGE = Path("/data")


def runs_root(root: str | Path | None = None) -> Path:
    """The runs folder: explicit argument, else $FACTORLAB_RUNS, else /data/runs when /data exists and is
    writable (persistent storage on a Space), else ./runs."""
    chosen = root or os.environ.get("FACTORLAB_RUNS")
    if chosen:
        return Path(chosen).expanduser()
    if PERSISTENT_STORAGE.is_dir() and os.access(PERSISTENT_STORAGE, os.W_OK | os.X_OK):
        return PERSISTENT_STORAGE / "runs"
    return Path("runs")


def sanitize_name(name: str) -> str:
    """A safe folder name: letters, digits, '.', '_' and '-' only; never empty, never '..'."""
    clean = _NAME_RE.sub("-", (name or "").strip()).strip(".-")
    if not clean:
        raise RunError(f"run name {name!r} is empty after removing unsafe characters: "
                       "use letters, digits, '.', '_' or '-'.")
    return clean[:80]


# Temporaries are hidden (a leading '.') and carry their writer's process id: `clean_leftovers` removes
# those whose process is gone (a crash or kill -9 mid-save), never those of a live writer.
_LEFTOVER_RE = re.compile(r"^\..*\.(?:tmp|old|deleted)(\d+)(?:\.|$)")
_OLD_RE = re.compile(r"^\.(.+)\.old\d+$")  # a run moved aside while its overwrite is renamed into place
LEFTOVER_MAX_AGE_S = 24 * 3600  # a temporary older than this is removed even if its process id is alive again


def _temp_tag(kind: str) -> str:
    return f".{kind}{os.getpid()}."


def _atomic_write(path: Path, write, *, in_run: bool = False) -> None:
    """Write a file through a temporary renamed into place. in_run: the file belongs in an existing run
    folder, which is never created here (a run deleted meanwhile stays deleted)."""
    if in_run:
        _require_run(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_temp_tag('tmp')}", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        _require_run(path.parent)
        raise
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _require_run(folder: Path) -> None:
    if not (folder / CONFIG).is_file():
        raise RunError(f"run {folder.name!r} no longer exists (deleted while a job used it): nothing was stored")


def atomic_write_json(path: Path, obj, *, in_run: bool = False) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)),
                  in_run=in_run)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(clean, tmp))


def versions() -> dict:
    import transformers

    from . import __version__
    return {"factorlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "format": FORMAT_VERSION}


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / TENSORS))

    @cached_property
    def _settings(self) -> tuple[Recipe, dict]:
        if "recipe" in self.config:
            return Recipe.from_dict(self.config["recipe"]), {}
        return legacy_recipe(self.config)

    @property
    def recipe(self) -> Recipe:
        """The settings the run was made with (runs saved before the Recipe are converted: legacy_recipe)."""
        return self._settings[0]

    @property
    def removed_settings(self) -> dict:
        """Settings of an old run that factorlab no longer has, with their values ({} for most runs)."""
        return self._settings[1]

    @property
    def layers(self) -> list[int]:
        """The factorized layers."""
        return list(self.config.get("layers") or self.config["partition"]["layers"])

    @property
    def per_token_k(self) -> dict | None:
        """{layer: [experts per token measured in training at K=1..N]} for per-token K runs, else None."""
        return self.config.get("per_token_k")

    @property
    def partition(self) -> Partition:
        recipe = self.recipe
        return Partition.from_tensors(self.tensors(), recipe.num_experts, recipe.split, recipe.shared_size, recipe.seed)


# Settings removed from factorlab (measured worse; docs/research.md), as old runs stored them: name -> default.
# Runs made with another value still load where the inference path is the same; the two that changed
# inference (first_token_dense, a per-layer K plan) are refused with the commit that reads them.
REMOVED_DEFAULTS = {"shared_choice": "energy_share", "refine_rounds": 0, "gate_up_steps": 0, "target": "teacher",
                    "token_weight": "none", "error_metric": "plain", "label_loss": "kl", "refit_down": True,
                    "adaptive_min_experts": None, "e2e_minutes": None, "layer_k": "uniform", "first_token_dense": False}
LAST_LEGACY_COMMIT = "25c6601"


def legacy_recipe(config: dict) -> tuple[Recipe, dict]:
    """(Recipe, removed settings) of a run saved before the Recipe (format 1: model, num_experts, ... at the top,
    `spec`, `train` and `data` dicts). Removed settings are those with a value the Recipe cannot express."""
    spec, train, data = config.get("spec") or {}, config.get("train") or {}, config.get("data") or {}
    part = config.get("partition") or {}
    removed = {}
    split = config.get("split", part.get("strategy", "contiguous"))
    if split == "coverage":
        removed["split"], split = "coverage", "cluster"
    values = {"model": config.get("model", "default"), "num_experts": int(config.get("num_experts", part.get("num_experts"))),
              "top_k": int(config.get("top_k", 1)), "split": split,
              "layers": spec.get("layers") or (layers_text(config.get("layers") or part.get("layers") or []) or "all"),
              "shared_size": int(config.get("shared_size", part.get("shared_size", 0))),
              "output_mode": config.get("output_mode", "scaled"), "mode": config.get("mode") or "none",
              "seed": int(config.get("seed", part.get("seed", 0)))}
    if "calibration_tokens" in spec:
        values["calibration_tokens"] = spec["calibration_tokens"]
    renamed = {"source": "data", "train_tokens": "train_tokens", "heldout_tokens": "heldout_tokens", "seq_len": "seq_len"}
    values.update({new: data[old] for old, new in renamed.items() if old in data})
    for key in ("router_steps", "router_lr", "router_batch", "route_weight", "balance_weight", "ridge", "e2e_steps",
                "e2e_lr", "e2e_batch", "e2e_params", "minutes"):
        if key in train:
            values[key] = train[key]
    if "adaptive_rounds" in train:
        values["per_token_rounds"] = train["adaptive_rounds"]
        values["per_token_router_steps"] = train.get("adaptive_router_steps") or max(1, train.get("router_steps", 600) // 3)
    elif train:
        values["per_token_rounds"] = 0  # made before per-token K
    old = {**train, **spec, "first_token_dense": config.get("first_token_dense", False),
           "shared_choice": part.get("shared_choice", "frequency")}
    if config.get("k_offsets"):
        old["layer_k"] = {int(i): int(o) for i, o in config["k_offsets"].items()}
    for key, default in REMOVED_DEFAULTS.items():
        if key in old and old[key] != default and not (key == "shared_choice" and not values["shared_size"]):
            removed[key] = old[key]
    return Recipe(**values), removed


def run_path(name: str, root: str | Path | None = None) -> Path:
    p = Path(name)
    if p.is_dir() and (p / CONFIG).exists():
        return p
    return runs_root(root) / sanitize_name(name)


def moe_tensors(moe: nn.Module, partition: Partition, tuned: tuple[str, ...] | bool = ()) -> dict[str, torch.Tensor]:
    """What a run stores: the partition, every router, and the expert tensors that training changed.

    tuned: names among gate_up, down, shared_gate_up, shared_down (True = all of them); untuned
    expert weights are rebuilt from the dense model and the partition on load.
    """
    names = EXPERT_TENSORS if tuned is True else tuple(tuned or ())
    tensors = partition.to_tensors()
    for i, mlp in factorized_layers(moe).items():
        tensors[f"router.{i}"] = mlp.router.linear.weight
        if mlp.adaptive:  # per-token K: the thresholds per K and the mean K each gave in training
            tensors[f"thresholds.{i}"], tensors[f"expected_k.{i}"] = mlp.thresholds, mlp.expected_k
            tensors[f"min_experts.{i}"] = torch.tensor([mlp.min_experts])
        own = mlp.weights_by_k  # K -> (down, shared_down) when every K has its own refit (refit_each_k)
        for pname in names:
            value = getattr(mlp, pname)
            if own and pname in ("down", "shared_down"):  # the trained K's, whatever K the model runs now
                value = own[mlp.trained_k][0 if pname == "down" else 1]
            if value.numel():  # contiguous: gate/up weights are views of one packed matrix (moe._pack_gate_up)
                tensors[f"{pname}.{i}"] = value.contiguous()
        for k, (down, shared_down) in own.items():
            if k != mlp.trained_k and names:
                tensors[f"down.k{k}.{i}"] = down
                if shared_down.numel():
                    tensors[f"shared_down.k{k}.{i}"] = shared_down
    return tensors


def save_run(name: str, config: dict, tensors: dict[str, torch.Tensor], metrics: dict | None = None,
             root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a whole run into a temporary folder, then rename it into place (all or nothing)."""
    target = runs_root(root) / sanitize_name(name)
    if target.exists() and not overwrite:
        raise RunError(f"a run named {target.name!r} already exists in {target.parent}: "
                       "pick another name or delete it first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_temp_tag('tmp')}", dir=target.parent))
    try:
        config = {**config, "name": target.name, "created": config.get("created") or time.time(),
                  "versions": versions()}
        atomic_write_json(tmp / CONFIG, config)
        atomic_save_tensors(tmp / TENSORS, tensors)
        atomic_write_json(tmp / METRICS, metrics or {})
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")  # matches _LEFTOVER_RE
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_run(name: str, root: str | Path | None = None) -> Run:
    path = run_path(name, root)
    if not (path / CONFIG).exists():
        raise RunError(f"no run {name!r} in {path.parent} (no {CONFIG}): list runs with "
                       "`python -m factorlab runs` or create one with `factorize`.")
    try:
        config = json.loads((path / CONFIG).read_text())
        metrics = json.loads((path / METRICS).read_text()) if (path / METRICS).exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"run {path.name!r} is corrupt ({exc}); delete it and create it again.") from exc
    if not (path / TENSORS).exists():
        raise RunError(f"run {path.name!r} is corrupt: {TENSORS} is missing; delete it and create it again.")
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise RunError(f"run {path.name!r} is corrupt: {CONFIG} and {METRICS} must hold JSON objects; "
                       "delete it and create it again.")
    problem = _metrics_problem(metrics)
    if problem:
        raise RunError(f"run {path.name!r} is corrupt: {METRICS} {problem}; delete it and create it again.")
    run = Run(path.name, path, config, metrics)
    try:
        run.recipe, run.layers  # noqa: B018 - read once: a run whose settings cannot be read is corrupt
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"run {path.name!r} is corrupt: its settings cannot be read ({exc}); "
                       "delete it and create it again.") from exc
    return run


def _metrics_problem(metrics: dict) -> str | None:
    """What is malformed in the parts of metrics.json that readers walk (None: nothing)."""
    for key in ("train", "heldout", "eval", "bench", "exactness"):
        if key in metrics and not isinstance(metrics[key], dict):
            return f'holds a {type(metrics[key]).__name__} as "{key}", not an object'
    for k, value in (metrics.get("heldout") or {}).items():
        if value is not None and not isinstance(value, dict):
            return f'holds a {type(value).__name__} as "heldout" at K={k}, not an object'
    ev = metrics.get("eval") or {}
    for key in ("tasks", "summary"):
        if key in ev and not isinstance(ev[key], dict):
            return f'holds a {type(ev[key]).__name__} as "eval.{key}", not an object'
    for task, entry in (ev.get("tasks") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("k", {}), dict):
            return f'holds a malformed "eval.tasks.{task}"'
    return None


def load_moe(run: Run | str, dense: nn.Module, root: str | Path | None = None, trained: bool = True) -> nn.Module:
    """Rebuild the factorized model of a run on top of its dense model (same logits as when saved).

    trained=False: the same partition with its untrained router and untouched experts (FactorLLM's Ex0)."""
    run = load_run(run, root) if isinstance(run, str) else run
    changed = {k: v for k, v in run.removed_settings.items() if k in ("first_token_dense", "layer_k")}
    if changed:
        raise RunError(f"run {run.name!r} was made with {', '.join(f'{k}={v}' for k, v in changed.items())}, which "
                       f"factorlab no longer runs (measured worse, see docs/research.md); it loads with factorlab "
                       f"at commit {LAST_LEGACY_COMMIT} (`git checkout {LAST_LEGACY_COMMIT}`).")
    try:
        tensors = run.tensors()
    except Exception as exc:  # noqa: BLE001 - a damaged file becomes a clear message
        raise RunError(f"run {run.name!r} has unreadable tensors ({exc}); delete it and create it again.") from exc
    recipe = run.recipe
    try:
        return _rebuild(run, recipe, tensors, dense, trained)
    except Exception as exc:  # noqa: BLE001 - tensors that do not fit the recipe or the model: a clear message
        raise RunError(f"run {run.name!r} does not fit its recipe or model ({type(exc).__name__}: "
                       f"{str(exc)[:200]}); delete it and create it again.") from exc


def _rebuild(run: Run, recipe: Recipe, tensors: dict, dense: nn.Module, trained: bool) -> nn.Module:
    partition = Partition.from_tensors(tensors, recipe.num_experts, recipe.split, recipe.shared_size, recipe.seed)
    moe = build_moe(dense, partition, recipe.top_k, recipe.output_mode, router_seed=recipe.seed)
    if trained:
        with torch.no_grad():
            for i, mlp in factorized_layers(moe).items():
                if f"router.{i}" in tensors:
                    mlp.router.linear.weight.copy_(tensors[f"router.{i}"])
                if f"thresholds.{i}" in tensors:
                    mlp.set_thresholds(tensors[f"thresholds.{i}"], tensors.get(f"expected_k.{i}"),
                                       int(tensors[f"min_experts.{i}"]) if f"min_experts.{i}" in tensors else 1)
                for pname in EXPERT_TENSORS:
                    if f"{pname}.{i}" in tensors:
                        getattr(mlp, pname).copy_(tensors[f"{pname}.{i}"])
                        mlp.tuned = True  # K = N is the dense FFN (FactorizedMLP.dense_at_n)
                own = {k: (tensors[f"down.k{k}.{i}"], tensors.get(f"shared_down.k{k}.{i}", mlp.shared_down.detach()))
                       for k in range(1, mlp.num_experts) if f"down.k{k}.{i}" in tensors}
                if own:  # every K with its own refit: the trained K's are the ones just loaded
                    mlp.weights_by_k = {**own, recipe.top_k: (mlp.down.detach(), mlp.shared_down.detach())}
                    mlp.trained_k = recipe.top_k
                    mlp.set_top_k(recipe.top_k)
    moe.factorlab_run = run
    return moe


def update_metrics(name: str | Path, updates: dict, root: str | Path | None = None) -> dict:
    """Merge `updates` into a run's metrics.json (top-level keys replaced), atomically."""
    path = run_path(str(name), root)
    with _metrics_lock:
        _require_run(path)  # deleted meanwhile: never recreate a folder holding only metrics
        current = json.loads((path / METRICS).read_text()) if (path / METRICS).exists() else {}
        current.update(updates)
        atomic_write_json(path / METRICS, current, in_run=True)
    return current


def write_log(name: str | Path, records: list[dict], root: str | Path | None = None) -> None:
    """Replace a run's train_log.jsonl with these records (one JSON object a line)."""
    path = run_path(str(name), root) / LOG
    _atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)), in_run=True)


def read_log(name: str | Path, root: str | Path | None = None) -> list[dict]:
    path = run_path(str(name), root) / LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class RunSummary:
    name: str
    path: Path
    ok: bool
    config: dict
    metrics: dict
    error: str | None = None
    run: Run | None = None  # the loaded run (None when it is corrupt)


def list_runs(root: str | Path | None = None) -> list[RunSummary]:
    """Every run folder, newest first; unreadable ones are listed with ok=False and the reason."""
    base = runs_root(root)
    if not base.exists():
        return []
    out = []
    for p in sorted(base.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            run = load_run(str(p))
            out.append(RunSummary(run.name, p, True, run.config, run.metrics, run=run))
        except RunError as exc:
            out.append(RunSummary(p.name, p, False, {}, {}, str(exc)))
    out.sort(key=lambda r: _created(r.config), reverse=True)
    return out


def _created(config: dict) -> float:
    value = config.get("created")
    return float(value) if isinstance(value, (int, float)) else 0.0


def clean_leftovers(root: str | Path | None = None) -> list[str]:
    """Remove what crashed writers left in the runs folder: hidden temporary run folders and files whose
    process is gone (or older than a day), and stale write checks. Returns the removed names."""
    base = runs_root(root)
    if not base.is_dir():
        return []
    removed = []
    now = time.time()
    candidates = [p for p in base.iterdir() if p.name.startswith(".")]
    candidates += [p for run in base.iterdir() if run.is_dir() and not run.name.startswith(".")
                   for p in run.iterdir() if p.name.startswith(".")]
    for path in candidates:
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        match = _LEFTOVER_RE.match(path.name)
        stale = (match and (not _alive(int(match.group(1))) or age > LEFTOVER_MAX_AGE_S)) or \
            (path.name.startswith(".write-check.") and age > 60)
        old = _OLD_RE.match(path.name) if stale and path.parent == base else None
        if old and not (base / old.group(1)).exists():  # killed between the two renames of an overwrite:
            os.replace(path, base / old.group(1))  # the old run is the only copy, so it comes back
            removed.append(f"{path.name} (restored as {old.group(1)})")
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else \
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(base)))
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (this process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_run(name: str, root: str | Path | None = None) -> None:
    path = runs_root(root) / sanitize_name(name)
    if not path.is_dir():
        raise RunError(f"no run named {name!r} in {path.parent}")
    trash = path.with_name(f".{path.name}.deleted{os.getpid()}")
    with _metrics_lock:  # not between a metrics update's check and its write (in this process)
        os.replace(path, trash)  # atomic: the run disappears from listings at once
    shutil.rmtree(trash, ignore_errors=True)
