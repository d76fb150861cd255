"""How much memory a recipe needs per process, from the model's shapes alone: printed before training, and a
clear refusal when it cannot fit.

The estimate follows what the trainer holds (par/trainer.py): the dense weights, the factorized layers'
permuted FFN copies and every K's refitted down projections; then the largest of the phases: the
calibration pass (every factorized layer's FFN inputs on the calibration tokens, gathered on each process),
the layer-wise pass (this process's residual stream, FFN inputs and teacher outputs, one layer at a time;
the refit's float64 normal equations; per-token K's scores of every set of experts), the `router` mode's
teacher cache (every layer's FFN inputs and outputs at once, unless it is streamed), held-out scoring
(log-probabilities over the vocabulary in slices) and end-to-end distillation (backpropagation through
the model, Adam's moments). Activation buffers of PyTorch kernels are not counted: 10% is kept free.

Models that cannot be downloaded here are estimated from the config.json files shipped in
factorlab/model_configs/ (the published configs of the guide's Hub models).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .recipe import Recipe

GIB = 1024**3
HEADROOM = 0.9  # refuse above this share of the available memory (kernels' own buffers are not counted)
CONFIGS = Path(__file__).parent / "model_configs"
EVAL_CHUNK = 1024  # tokens per slice of held-out log-probabilities (evaluate.heldout_metrics)
EVAL_ROWS = 8  # rows per held-out batch
TRAIN_CHUNK = 4096  # par.trainer.CHUNK_TOKENS


class MemoryPlanError(ValueError):
    """The recipe does not fit the memory available; the message says what to change."""


@dataclass
class Estimate:
    """Bytes per process: what is held throughout, and the peak of each phase on top of it."""
    model: str
    processes: int
    dtype_bytes: int
    held: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    cache_teacher: bool = True  # router mode: the teacher cache fits (else it is streamed layer by layer)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def peak(self) -> float:
        return sum(self.held.values()) + sum(self.phases[self.peak_phase].values())

    def to_dict(self) -> dict:
        return {"model": self.model, "processes": self.processes, "dtype_bytes": self.dtype_bytes,
                "held": self.held, "phases": self.phases, "peak_phase": self.peak_phase, "peak_bytes": self.peak,
                "cache_teacher": self.cache_teacher}


def parameters(info: dict) -> int:
    """Parameters of a Llama-family model from its shapes (biases left out)."""
    h, i, v = info["hidden_size"], info["intermediate_size"], info["vocab_size"]
    q = info["num_attention_heads"] * info["head_dim"]
    kv = info["num_key_value_heads"] * info["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return v * h * (1 if info["tie_word_embeddings"] else 2) + info["num_layers"] * per_layer + h


def info_from_config(config: dict) -> dict:
    """The shapes memory and FLOPs need (models.model_info's keys) from a config.json's values."""
    heads = config["num_attention_heads"]
    info = {"architecture": (config.get("architectures") or [config.get("model_type")])[0],
            "num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"], "num_attention_heads": heads,
            "num_key_value_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "vocab_size": config["vocab_size"],
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}
    return {**info, "parameters": parameters(info)}


def bundled_config(model: str) -> Path | None:
    """The shipped config.json of a Hub id ('owner/name' -> model_configs/owner__name.json), if any."""
    path = CONFIGS / (model.replace("/", "__") + ".json")
    return path if "/" in model and path.is_file() else None


def model_shapes(model: str) -> tuple[dict, str]:
    """(shapes, where they came from) without loading weights: a bundled config, a local folder's config.json,
    the embedded default's config, or the Hub's config."""
    from .models import DEFAULT_HUB_ID, DEFAULT_MODEL, ModelLoadError, cache_dir, hub_reachable

    if model == DEFAULT_MODEL:
        cached = cache_dir() / "smollm2-135m-instruct" / "config.json"
        path = cached if cached.is_file() else bundled_config(DEFAULT_HUB_ID)
        return info_from_config(json.loads(path.read_text())), f"embedded default ({path})"
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        return info_from_config(json.loads((folder / "config.json").read_text())), f"local folder {folder}"
    shipped = bundled_config(model)
    if shipped:
        return info_from_config(json.loads(shipped.read_text())), f"bundled config {shipped.name}"
    if "/" not in model or not hub_reachable():
        known = ", ".join(p.stem.replace("__", "/") for p in sorted(CONFIGS.glob("*.json")))
        raise ModelLoadError(f"no config for {model!r} here: give a local model folder (with config.json), a Hub "
                             f"id while online, or one of the bundled configs ({known})")
    from transformers import AutoConfig

    return info_from_config(AutoConfig.from_pretrained(model).to_dict()), f"Hub {model}"


def estimate(info: dict, recipe: Recipe, *, processes: int = 1, dtype_bytes: int = 4,
             cache_teacher: bool = True) -> Estimate:
    """Bytes per process of training `recipe` on a model of these shapes (model_info / info_from_config) in
    `processes` data-parallel processes, weights of dtype_bytes each."""
    layers = len(recipe.validate(info))
    h, i, v, n = info["hidden_size"], info["intermediate_size"], info["vocab_size"], recipe.num_experts
    b = dtype_bytes
    tokens = math.ceil(recipe.train_tokens / processes)  # this process's training tokens
    held = {"dense weights": info["parameters"] * b,
            "factorized FFN copies": layers * 3 * h * i * b,  # permuted gate/up/down of each factorized layer
            "every K's refitted down": layers * max(0, n - 1) * i * h * b if recipe.mode == "experts" else 0}
    calib = recipe.calibration_tokens
    phases = {"calibration (split)": {"FFN inputs, every layer": layers * calib * h * b,
                                      "activations of one layer (fp32)": 3 * calib * i * 4}}
    stream = 5 * tokens * h * b  # residual stream, attention output, FFN input, teacher, student output
    if recipe.mode == "router":
        cache = 2 * layers * tokens * h * b
        phases["router training"] = ({"teacher cache, every layer": cache} if cache_teacher else
                                     {"one layer's teacher (streamed)": 3 * tokens * h * b})
    elif recipe.mode == "experts":
        sets = 2**n
        phases["layer-wise training"] = {
            "stream (one layer)": stream,
            "normal equations (fp64) + solve": 2 * i * i * 8 + 3 * i * h * 8,
            "expert outputs of a chunk (fp32)": 2 * min(tokens, TRAIN_CHUNK) * n * h * 4,
            "per-token K set errors and scores": (2 * tokens * sets + recipe.train_tokens * n) * 4
            if recipe.per_token else 0}
    if recipe.heldout_tokens:
        phases["held-out scoring"] = {"log-probabilities (fp32)": 3 * EVAL_CHUNK * v * 4,
                                      "hidden states": 2 * EVAL_ROWS * recipe.seq_len * h * b}
    if recipe.mode == "experts" and recipe.e2e_steps:
        trained = layers * (3 if recipe.e2e_params == "all" else 1) * i * h * 4
        rows = recipe.e2e_batch * recipe.seq_len
        phases["end-to-end distillation"] = {"Adam moments + gradients": 3 * trained,
                                             "activations for backward": info["num_layers"] * rows * (4 * h + 3 * i) * b,
                                             "logits (fp32)": 4 * rows * v * 4}
    return Estimate(recipe.model, processes, dtype_bytes, held, phases, cache_teacher)


def available_bytes(device: str = "cpu") -> tuple[float, str]:
    """Memory one process may use on `device`, and how it was measured."""
    import torch

    if str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        free, total_bytes = torch.cuda.mem_get_info(index)
        return float(free), f"free on cuda:{index} ({total_bytes / GIB:.1f} GiB total)"
    import psutil

    return float(psutil.virtual_memory().available), "available RAM (all processes share it)"


def plan(info: dict, recipe: Recipe, *, processes: int = 1, dtype_bytes: int = 4, device: str = "cpu",
         available: float | None = None, weights_loaded: bool = False) -> tuple[Estimate, float, str]:
    """The estimate for this machine: the router mode streams its teacher when the cache would not fit.
    Raises MemoryPlanError, with what to change, when even that does not fit. weights_loaded: the dense
    weights are in memory already (the available memory no longer counts them)."""
    if available is None:
        available, where = available_bytes(device)
    else:
        where = "given"
    # CPU processes share one machine's RAM; each GPU process has its own device
    sharing = processes if not str(device).startswith("cuda") else 1
    budget = HEADROOM * available / sharing

    def need(e: Estimate) -> float:
        return e.peak - (e.held["dense weights"] if weights_loaded else 0)

    est = estimate(info, recipe, processes=processes, dtype_bytes=dtype_bytes)
    if need(est) > budget and recipe.mode == "router":
        est = estimate(info, recipe, processes=processes, dtype_bytes=dtype_bytes, cache_teacher=False)
    if need(est) > budget:
        raise MemoryPlanError(
            f"{recipe.model}: this recipe needs about {need(est) / GIB:.1f} GiB per process (peak in "
            f"{est.peak_phase}), but {budget / GIB:.1f} GiB are usable per process ({where}, {processes} "
            f"process(es), {int(HEADROOM * 100)}%). Use fewer train_tokens, more processes (each holds 1/P of the "
            "tokens), bfloat16 weights, several GPUs (one process: the layers spread by device_map), or a larger "
            "machine; `python -m factorlab memory MODEL --dtype bfloat16` shows the parts.")
    return est, available, where


def loading(info: dict, recipe: Recipe, *, processes: int = 1, device: str = "cpu",
            available: float | None = None) -> tuple[str, str | None, Estimate]:
    """How to load the model so that training fits: ("float32" | "bfloat16", device_map or None, estimate).

    float32 where it fits; else bfloat16 weights; else, for one process on GPUs, bfloat16 spread over every
    visible GPU by accelerate's device_map ("auto"). Raises MemoryPlanError when none fits."""
    try:
        return "float32", None, plan(info, recipe, processes=processes, device=device, available=available)[0]
    except MemoryPlanError as exc:
        first = exc
    try:
        return "bfloat16", None, plan(info, recipe, processes=processes, dtype_bytes=2, device=device,
                                      available=available)[0]
    except MemoryPlanError:
        pass
    gpus = _gpu_count() if str(device).startswith("cuda") and processes == 1 else 0
    if gpus > 1:
        est = estimate(info, recipe, dtype_bytes=2)
        if available is None:
            available, _ = available_bytes(device)
        spread = sum(est.held.values()) / gpus + sum(est.phases[est.peak_phase].values())
        if spread <= HEADROOM * available:
            return "bfloat16", "auto", est
    raise first


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe(est: Estimate, available: float | None = None, where: str = "") -> list[str]:
    """The estimate as lines of text (the CLI prints them before training)."""
    lines = [f"memory estimate per process: {est.model}, {est.processes} process(es), {est.dtype_bytes}-byte "
             "weights"]
    for name, value in est.held.items():
        lines.append(f"  {name:38s}{value / GIB:9.2f} GiB   (held throughout)")
    for phase, parts in est.phases.items():
        lines.append(f"  {phase + ':':38s}{sum(parts.values()) / GIB:9.2f} GiB   "
                     + ", ".join(f"{k} {val / GIB:.2f}" for k, val in parts.items()))
    if not est.cache_teacher:
        lines.append("  router mode: the teacher cache would not fit; the teacher is computed one layer at a time")
    lines.append(f"  {'peak (held + ' + est.peak_phase + ')':38s}{est.peak / GIB:9.2f} GiB")
    if available is not None:
        lines.append(f"  {'available':38s}{available / GIB:9.2f} GiB   {where}")
    return lines
