"""End-to-end operations shared by the CLI and the app: factorize a model into a saved run."""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .factorize import (CALIBRATED, LAYER_K_PLANS, STRATEGIES, Partition, build_moe, calibration_inputs, make_partition,
                        parse_layer_k, plan_layer_k, resolve_layers, validate_experts, validate_shared_choice,
                        validate_top_k)
from .flops import flops_table
from .models import DEFAULT_MODEL, load_model, model_info
from .moe import OUTPUT_MODES, factorized_layers, k_offsets, set_k_offsets
from .runs import moe_tensors, sanitize_name, save_run

log = logging.getLogger(__name__)

# A fixed, varied English sample for the exactness check (not benchmark text).
CHECK_TEXT = (
    "The history of science is full of surprises. In 1905 Albert Einstein published four papers that changed "
    "physics, while working as a clerk in a patent office. Water boils at 100 degrees Celsius at sea level, "
    "but at lower temperatures on a mountain. def add(a, b):\n    return a + b\n"
    "Q: What is the capital of Japan? A: Tokyo is the capital of Japan, a city of about 14 million people."
)


# The training recipe's layers (issue 7): layer 0 stays dense. Measured: putting its FFN alone back to
# dense cut held-out perplexity by 22%, the next-best layer's by 10% (README, accuracy research).
RECIPE_LAYERS = "1-"
# how the recipe picks its shared neurons (issue 7, fifteenth round: energy_share measured better in four seeds)
RECIPE_SHARED_CHOICE = "energy_share"


@dataclass
class FactorizeSpec:
    """What to factorize and how; validated before any work starts."""
    model: str = DEFAULT_MODEL
    num_experts: int = 4
    top_k: int = 2
    split: str = "cluster"
    layers: str = "all"
    output_mode: str = "scaled"
    seed: int = 0
    shared_size: int = 0
    calibration_tokens: int = 4096
    first_token_dense: bool = False
    layer_k: str = "uniform"  # per-layer K: uniform | auto (same total, by measured errors) | '3-6=3;2,11=1'
    shared_choice: str = "frequency"  # how the shared neurons are chosen (factorize.SHARED_CHOICES)

    def __post_init__(self) -> None:
        if self.split not in STRATEGIES:
            raise ValueError(f"unknown split {self.split!r}: choose one of {', '.join(STRATEGIES)}")
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output mode {self.output_mode!r}: choose one of {', '.join(OUTPUT_MODES)}")
        validate_top_k(self.top_k, self.num_experts)
        validate_shared_choice(self.shared_choice)
        if self.calibration_tokens < 256:
            raise ValueError("calibration_tokens must be at least 256")
        if self.layer_k not in LAYER_K_PLANS and "=" not in self.layer_k:
            raise ValueError(f"unknown per-layer K {self.layer_k!r}: use uniform, auto or LAYERS=K entries "
                             "such as '3-6=3;2,11=1'")


def calibration_ids(loaded, num_tokens: int, seed: int = 0, source: str | None = None) -> torch.Tensor:
    """Calibration token rows from the training side of `source` (default: the built-in text)."""
    from .data import BUILTIN_DEFAULT
    from .data import calibration_ids as data_calibration_ids

    return data_calibration_ids(loaded.tokenizer, num_tokens=num_tokens, model=loaded,
                                source=source or BUILTIN_DEFAULT)


def exactness_check(dense: nn.Module, moe: nn.Module, tokenizer, num_experts: int, fp64: bool = False) -> dict:
    """Max |logit difference| of the factorized model at K=N (scaled) against dense, on CHECK_TEXT."""
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    layers = factorized_layers(moe)
    saved = {i: (m.top_k, m.output_mode) for i, m in layers.items()}
    try:
        for m in layers.values():
            m.set_top_k(num_experts)
            m.set_output_mode("scaled")
        with torch.no_grad():
            ref = dense(ids).logits
            out = moe(ids).logits
    finally:
        for i, m in layers.items():
            m.set_top_k(saved[i][0])
            m.set_output_mode(saved[i][1])
    diff = (out - ref).abs().max().item()
    result = {"max_abs_logit_diff": diff, "max_abs_logit": ref.abs().max().item(), "tokens": ids.shape[1]}
    if fp64:
        # The same check in float64 separates the maths (exact) from fp32 summation-order noise.
        dense64, moe64 = (m.double() for m in copy.deepcopy((dense, moe)))
        result["max_abs_logit_diff_fp64"] = exactness_check(dense64, moe64, tokenizer, num_experts)["max_abs_logit_diff"]
        with torch.no_grad():  # the fp32 noise floor: the dense model itself against its fp64 copy
            result["dense_fp32_vs_fp64"] = (dense64(ids).logits - ref.double()).abs().max().item()
    return result


def prepare(spec: FactorizeSpec, loaded=None, calibration_source: str | None = None) -> tuple:
    """Load the model, validate N against its width, and build the partition + MoE model.

    calibration_source: text for the cluster split and the shared-neuron choice (training uses its
    own data source; None = the built-in text)."""
    loaded = loaded or load_model(spec.model)
    info = model_info(loaded.model)
    validate_experts(info["intermediate_size"], spec.num_experts, spec.shared_size)
    layers = resolve_layers(spec.layers, info["num_layers"])
    inputs = None  # FFN inputs on calibration text, computed once for the split and the per-layer K plan
    if spec.split in CALIBRATED or spec.shared_size or spec.layer_k == "auto":
        calib = calibration_ids(loaded, spec.calibration_tokens, spec.seed, calibration_source)
        calib = calib.to(next(loaded.model.parameters()).device)  # the text is read on the CPU
        inputs = calibration_inputs(loaded.model, calib, layers, spec.first_token_dense)
    partition = make_partition(loaded.model, spec.num_experts, spec.split, layers, spec.seed, None,
                               spec.shared_size, skip_first=spec.first_token_dense, inputs=inputs,
                               top_k=spec.top_k, shared_choice=spec.shared_choice)
    moe = build_moe(loaded.model, partition, spec.top_k, spec.output_mode, router_seed=spec.seed,
                    first_token_dense=spec.first_token_dense)
    if spec.layer_k == "auto":
        set_k_offsets(moe, plan_layer_k(loaded.model, moe, None, spec.top_k, inputs=inputs), spec.top_k)
    elif spec.layer_k != "uniform":
        set_k_offsets(moe, parse_layer_k(spec.layer_k, partition.layers, spec.top_k, spec.num_experts,
                                         info["num_layers"]), spec.top_k)
    return loaded, partition, moe


def run_config(spec: FactorizeSpec, partition: Partition, loaded, moe=None, **extra) -> dict:
    config = {"model": spec.model, "model_source": loaded.source, "num_experts": spec.num_experts,
            "top_k": spec.top_k, "split": spec.split, "seed": spec.seed, "output_mode": spec.output_mode,
            "layers": partition.layers, "shared_size": spec.shared_size, "partition": partition.to_config(),
            "first_token_dense": spec.first_token_dense, "spec": asdict(spec), **extra}
    if moe is not None:
        config["k_offsets"] = {str(i): o for i, o in k_offsets(moe).items()}
        per_token = {str(i): [round(float(v), 4) for v in m.expected_k]
                     for i, m in factorized_layers(moe).items() if m.adaptive}
        if per_token:  # per-token K: the mean experts per token training measured at each K
            config["per_token_k"] = per_token
    return config


def factorize_run(spec: FactorizeSpec, name: str | None, runs_dir=None, loaded=None,
                  overwrite: bool = False) -> dict:
    """Factorize, check exactness at K=N, compute FLOPs per K, and (if named) save the run."""
    start = time.perf_counter()
    loaded, partition, moe = prepare(spec, loaded)
    seconds = time.perf_counter() - start
    check = exactness_check(loaded.model, moe, loaded.tokenizer, spec.num_experts, fp64=True)
    info = model_info(loaded.model)
    flops = flops_table(info, 512, spec.num_experts, factorized_layers=partition.layers,
                        shared_size=spec.shared_size, first_token_dense=spec.first_token_dense,
                        k_offsets=k_offsets(moe))
    result = {"model": spec.model, "model_source": loaded.source, "num_experts": spec.num_experts,
              "top_k": spec.top_k, "split": spec.split, "layers": partition.layers,
              "expert_size": partition.expert_size, "shared_size": spec.shared_size,
              "factorize_seconds": round(seconds, 3), **check, "flops_seq_len": 512,
              "ffn_ratio_by_k": {k: v["ffn_ratio"] for k, v in flops["k"].items()},
              "run": None}
    if name:
        config = run_config(spec, partition, loaded, moe, mode="none", trained=False)
        metrics = {"exactness": check, "factorize_seconds": seconds}
        path = save_run(sanitize_name(name), config, moe_tensors(moe, partition, ()), metrics,
                        root=runs_dir, overwrite=overwrite)
        result["run"] = str(path)
    result["_moe"] = moe
    return result


@dataclass
class DataSpec:
    """Where training and held-out text come from, and how much."""
    source: str = "builtin"
    train_tokens: int = 32768  # the recipe's budget (issue 7): 16k overfits less well, 64k gains little more
    heldout_tokens: int = 8192
    seq_len: int = 256

    def __post_init__(self) -> None:
        if self.seq_len < 16:
            raise ValueError("seq_len must be at least 16")
        if self.train_tokens < self.seq_len:
            raise ValueError(f"train_tokens must be at least one row of {self.seq_len} tokens")
        if self.heldout_tokens and self.heldout_tokens < self.seq_len:
            raise ValueError(f"heldout_tokens must be 0 or at least {self.seq_len}")


def load_data(loaded, data: DataSpec, seed: int = 0, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token rows from the data source (cached where the source caches)."""
    from .data import train_heldout

    opts = {"progress": progress} if progress else {}
    return train_heldout(data.source, loaded.tokenizer, data.train_tokens, data.heldout_tokens, data.seq_len,
                         seed, model=loaded, **opts)


@dataclass
class Trained:
    """A factorized model trained in memory, with what is needed to save or evaluate it."""
    loaded: object
    partition: Partition
    moe: nn.Module
    result: object  # par.TrainResult
    seconds: float
    tokens: int
    heldout: dict  # K -> held-out metrics


def tuned_params(train_cfg) -> tuple[str, ...]:
    """The expert tensors a training config changes (the rest are recomputed from the partition)."""
    if train_cfg.mode != "experts":
        return ()
    names = ("down", "shared_down") if train_cfg.refit_down or train_cfg.e2e_steps else ()
    if train_cfg.gate_up_steps or (train_cfg.e2e_steps and train_cfg.e2e_params == "all"):
        names = ("gate_up", "down", "shared_gate_up", "shared_down")
    return names


def train_model(spec: FactorizeSpec, train_cfg, data: DataSpec, loaded=None, progress=None, should_stop=None,
                eval_ks: list[int] | None = None, device: str | torch.device | None = None) -> Trained:
    """Factorize, train with PAR and measure held-out metrics per K, all in memory.

    device: where to train (e.g. "cuda"); the model is moved there (in place: a shared copy moves
    too) after the text is prepared. None: where the model is."""
    from .evaluate import heldout_metrics
    from .moe import set_top_k
    from .par import TrainingCancelled, train

    def emit(rec: dict) -> None:
        if progress:
            progress(rec)

    def check() -> None:
        if should_stop and should_stop():
            raise TrainingCancelled("training cancelled")

    if train_cfg.top_k != spec.top_k:
        raise ValueError("the training K and the run's K differ: set both to the same value")
    loaded = loaded or load_model(spec.model)
    emit({"phase": "data", "message": f"preparing {data.train_tokens} training tokens from {data.source}"})
    def data_progress(done: int, wanted: int) -> None:
        check()  # raising here drops the batch being generated cleanly
        emit({"phase": "data", "message": f"generating training text: {done}/{wanted}"})

    train_ids, heldout_ids = load_data(loaded, data, spec.seed, data_progress)
    check()
    if device is not None:
        loaded.model.to(device)
        train_ids, heldout_ids = train_ids.to(device), heldout_ids.to(device)
    emit({"phase": "factorize", "message": f"{spec.split} split into {spec.num_experts} experts"})
    start = time.monotonic()  # the budget (train_cfg.minutes) and the reported seconds cover the split too
    from .data import reads_from_disk

    calibration_source = data.source if reads_from_disk(data.source) else None  # else: the built-in text
    loaded, partition, moe = prepare(spec, loaded, calibration_source)
    check()
    result = train(loaded.model, moe, train_ids, train_cfg, progress=progress, should_stop=should_stop,
                   started=start)
    seconds = time.monotonic() - start
    heldout = {}
    if heldout_ids.numel():
        for k in eval_ks or sorted({1, spec.top_k, min(spec.num_experts, spec.top_k + 1)}):
            check()
            emit({"phase": "heldout", "message": f"held-out metrics at K={k}"})
            set_top_k(moe, k)
            heldout[str(k)] = heldout_metrics(loaded.model, moe, heldout_ids)
        set_top_k(moe, spec.top_k)
    return Trained(loaded, partition, moe, result, seconds, int(train_ids.numel()), heldout)


def train_run(spec: FactorizeSpec, train_cfg, data: DataSpec, name: str, runs_dir=None, loaded=None,
              progress=None, should_stop=None, overwrite: bool = False, eval_ks: list[int] | None = None,
              device: str | torch.device | None = None) -> dict:
    """train_model, then save the run (all or nothing: a failed or cancelled job writes nothing)."""
    from .runs import run_path, write_log

    name = sanitize_name(name)
    if run_path(name, runs_dir).exists() and not overwrite:
        raise ValueError(f"a run named {name!r} already exists: pick another name or delete it first")
    t = train_model(spec, train_cfg, data, loaded, progress, should_stop, eval_ks, device)
    config = run_config(spec, t.partition, t.loaded, t.moe, mode=train_cfg.mode, trained=train_cfg.mode != "none",
                        train=asdict(train_cfg), data=asdict(data))
    summary = t.result.summary()
    where = str(next(t.loaded.model.parameters()).device)  # the seconds depend on it
    metrics = {"train": {**summary, "seconds": t.seconds, "tokens": t.tokens, "device": where}, "heldout": t.heldout}
    path = save_run(name, config, moe_tensors(t.moe, t.partition, tuned_params(train_cfg)), metrics,
                    root=runs_dir, overwrite=overwrite)
    write_log(path, t.result.log)
    return {"run": str(path), "name": path.name, "seconds": t.seconds, "tokens": t.tokens,
            "heldout": t.heldout.get(str(spec.top_k), {}), "heldout_by_k": t.heldout, "train": summary,
            "_moe": t.moe}
