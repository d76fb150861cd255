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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .factorize import Partition, build_moe
from .moe import factorized_layers, set_k_offsets

EXPERT_TENSORS = ("gate_up", "down", "shared_gate_up", "shared_down")
CONFIG, TENSORS, METRICS, LOG = "config.json", "tensors.safetensors", "metrics.json", "train_log.jsonl"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_metrics_lock = threading.Lock()


class RunError(RuntimeError):
    """A run cannot be found, read or written; the message says which and why."""


def runs_root(root: str | Path | None = None) -> Path:
    """The runs folder: explicit argument, else $FACTORLAB_RUNS, else ./runs."""
    return Path(root or os.environ.get("FACTORLAB_RUNS") or "runs").expanduser()


def sanitize_name(name: str) -> str:
    """A safe folder name: letters, digits, '.', '_' and '-' only; never empty, never '..'."""
    clean = _NAME_RE.sub("-", (name or "").strip()).strip(".-")
    if not clean:
        raise RunError(f"run name {name!r} is empty after removing unsafe characters: "
                       "use letters, digits, '.', '_' or '-'.")
    return clean[:80]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)))


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

    @property
    def partition(self) -> Partition:
        return Partition.from_saved(self.config["partition"], self.tensors())


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
        for pname in names:
            if getattr(mlp, pname).numel():
                tensors[f"{pname}.{i}"] = getattr(mlp, pname)
    return tensors


def save_run(name: str, config: dict, tensors: dict[str, torch.Tensor], metrics: dict | None = None,
             root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a whole run into a temporary folder, then rename it into place (all or nothing)."""
    target = runs_root(root) / sanitize_name(name)
    if target.exists() and not overwrite:
        raise RunError(f"a run named {target.name!r} already exists in {target.parent}: "
                       "pick another name or delete it first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config = {**config, "name": target.name, "created": config.get("created") or time.time(),
                  "versions": versions()}
        atomic_write_json(tmp / CONFIG, config)
        atomic_save_tensors(tmp / TENSORS, tensors)
        atomic_write_json(tmp / METRICS, metrics or {})
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
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
    return Run(path.name, path, config, metrics)


def load_moe(run: Run | str, dense: nn.Module, root: str | Path | None = None) -> nn.Module:
    """Rebuild the factorized model of a run on top of its dense model (same logits as when saved)."""
    run = load_run(run, root) if isinstance(run, str) else run
    try:
        tensors = run.tensors()
    except Exception as exc:  # noqa: BLE001 - a damaged file becomes a clear message
        raise RunError(f"run {run.name!r} has unreadable tensors ({exc}); delete it and create it again.") from exc
    partition = Partition.from_saved(run.config["partition"], tensors)
    moe = build_moe(dense, partition, run.config.get("top_k", 1), run.config.get("output_mode", "scaled"),
                    first_token_dense=run.config.get("first_token_dense", False))
    set_k_offsets(moe, config_k_offsets(run.config), run.config.get("top_k", 1))
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
    moe.factorlab_run = run
    return moe


def config_k_offsets(config: dict) -> dict[int, int]:
    """A run's per-layer K plan ({layer: offset}; empty for uniform K and for runs saved before plans)."""
    return {int(i): int(o) for i, o in (config.get("k_offsets") or {}).items()}


def update_metrics(name: str | Path, updates: dict, root: str | Path | None = None) -> dict:
    """Merge `updates` into a run's metrics.json (top-level keys replaced), atomically."""
    path = run_path(str(name), root)
    with _metrics_lock:
        current = json.loads((path / METRICS).read_text()) if (path / METRICS).exists() else {}
        current.update(updates)
        atomic_write_json(path / METRICS, current)
    return current


def write_log(name: str | Path, records: list[dict], root: str | Path | None = None) -> None:
    """Replace a run's train_log.jsonl with these records (one JSON object a line)."""
    path = run_path(str(name), root) / LOG
    _atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


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
            out.append(RunSummary(run.name, p, True, run.config, run.metrics))
        except RunError as exc:
            out.append(RunSummary(p.name, p, False, {}, {}, str(exc)))
    out.sort(key=lambda r: r.config.get("created", 0), reverse=True)
    return out


def delete_run(name: str, root: str | Path | None = None) -> None:
    path = runs_root(root) / sanitize_name(name)
    if not path.is_dir():
        raise RunError(f"no run named {name!r} in {path.parent}")
    trash = path.with_name(f".{path.name}.deleted{os.getpid()}")
    os.replace(path, trash)  # atomic: the run disappears from listings at once
    shutil.rmtree(trash, ignore_errors=True)
