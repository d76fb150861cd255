"""Wall-clock speed, dense vs factorized, measured in one process on the same inputs.

Five measurements: one FFN layer alone, prefill (fill the KV cache, logits of the last position,
as generation does), a full forward (logits at every position, as scoring and training do),
batch-1 greedy decode with a KV cache, and batched prefill. Within each, the variants (dense,
then every K) alternate repetition by repetition after a warm-up, so drift and other processes
hit all of them alike. Speedup = median dense time / median factorized time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from .flops import flops_per_token
from .models import decoder_layers, model_info
from .moe import count_active_experts, factorized_layers, record_routing, set_top_k

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
MEASUREMENTS = ("ffn", "prefill", "forward", "decode", "batched_prefill")
DECODE_PROMPT_TOKENS = 32  # the prompt before timed decode steps (its prefill is not timed)
FFN_REPEATS_PER_REPEAT = 10  # one FFN call is milliseconds: take more samples of it
# libgomp reads these when torch is first imported. OMP_WAIT_POLICY=PASSIVE (which factorlab sets
# by default, for shared machines) puts threads to sleep after every parallel region: measured on
# 2 idle cores it slows dense decode 1.8x and the factorized model, which runs more and smaller
# ops, even more. GOMP_SPINCOUNT=300000 restores libgomp's own default spin.
OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model: nn.Module, ids: torch.Tensor) -> None:
    """What generation does before the first token: fill a fresh KV cache, logits of the last position."""
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


def _decode_seconds(model: nn.Module, prompt: torch.Tensor, steps: int, device: torch.device,
                    counted: dict | None = None) -> float:
    """Greedy decode of exactly `steps` tokens (no EOS stop) with a KV cache; times the steps only.
    counted: filled with {layer: experts per token} that the steps ran (per-token-K layers; not timed then)."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    _sync(device)
    start = time.perf_counter()
    with count_active_experts(model) if counted is not None else contextlib.nullcontext() as measured:
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    elapsed = time.perf_counter() - start
    if counted is not None:
        counted.update(measured)
    return elapsed


def measured_mean_k(moe: nn.Module, ids: torch.Tensor, batch_ids: torch.Tensor | None, prompt: torch.Tensor,
                    decode: int, device: torch.device) -> dict[str, dict[int, float]]:
    """Experts per token that each per-token-K layer ran on the benchmark's own tokens, per measurement
    (prefill: also the FFN layer's and the forward's tokens; an untimed pass). Empty for top-K layers."""
    out: dict[str, dict[int, float]] = {}
    with count_active_experts(moe) as out["prefill"]:
        _prefill(moe, ids)
    if batch_ids is not None:
        with count_active_experts(moe) as out["batched_prefill"]:
            _prefill(moe, batch_ids)
    if decode:
        out["decode"] = {}
        _decode_seconds(moe, prompt, decode, device, counted=out["decode"])
    return out


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _summary(times: list[float]) -> dict:
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def _alternate(variants: dict[str, Callable[[], float]], repeats: int, warmup: int,
               tick: Callable[[], None]) -> dict[str, dict]:
    """Run every variant once per repetition, order reversed every other repetition; untimed warm-up first."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(variants[name]())
        tick()
    return {name: _summary(t) for name, t in times.items()}


def ffn_inputs(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The real FFN input (post-attention-norm hidden states) of one layer on these tokens: (B, T, H)."""
    found: list[torch.Tensor] = []
    handle = decoder_layers(model)[layer].mlp.register_forward_pre_hook(lambda _m, args: found.append(args[0]))
    try:
        _prefill(model, ids)
    finally:
        handle.remove()
    return found[0]


def expert_load(moe: nn.Module, ids: torch.Tensor) -> dict:
    """Share of (token, expert) pairs each expert receives on these tokens, summed over factorized layers."""
    with record_routing(moe) as trace:
        _prefill(moe, ids)
    stacked, _ = trace.stacked()
    chosen = {i: c[c >= 0] for i, c in stacked.items()}  # per-token K pads with -1
    n = next(iter(factorized_layers(moe).values())).num_experts
    counts = sum(torch.bincount(c, minlength=n) for c in chosen.values())
    share = (counts / counts.sum()).tolist()
    per_layer_max = max(torch.bincount(c, minlength=n).max().item() / max(c.numel() / n, 1e-9)
                        for c in chosen.values())
    return {"share": share, "max_over_mean": max(share) * n, "worst_layer_max_over_mean": per_layer_max}


def speed_limits(info: dict, num_experts: int, top_k: int, layers: list[int], shared_size: int,
                 prefill: int, decode_context: int, ffn_layer: int,
                 mean_k: dict[str, dict[int, float]] | None = None) -> dict:
    """Upper bound on each speedup if only the FFN multiply-adds shrank (factorlab.flops, matmuls only).

    mean_k: the experts per token each layer actually ran, per measurement (measured_mean_k); the bound is then
    at that active share (per-token K runs its nominal K on average over training text, not on every input)."""
    mean_k = mean_k or {}

    def flops(seq: int, phase: str | None) -> dict:
        if phase is None:
            return flops_per_token(info, seq)
        return flops_per_token(info, seq, num_experts, top_k, layers, shared_size, mean_k.get(phase))

    dense, moe = flops(prefill, None), flops(prefill, "prefill")
    one = flops_per_token(info, prefill, num_experts, top_k, [ffn_layer], shared_size, mean_k.get("prefill"))
    layer_dense = dense["ffn"] / info["num_layers"]
    layer_moe = one["ffn"] - dense["ffn"] + layer_dense + one["router"]

    def last_logits_only(f: dict) -> float:  # prefill: every position through the layers, lm_head once
        return prefill * (f["total"] - f["lm_head"]) + f["lm_head"]

    dense_dec, moe_dec = flops(decode_context, None), flops(decode_context, "decode")
    batched = flops(prefill, "batched_prefill") if "batched_prefill" in mean_k else moe
    return {"ffn": layer_dense / layer_moe, "prefill": last_logits_only(dense) / last_logits_only(moe),
            "forward": dense["total"] / moe["total"], "decode": dense_dec["total"] / moe_dec["total"],
            "batched_prefill": last_logits_only(dense) / last_logits_only(batched),
            "ffn_share_dense": dense["ffn"] / dense["total"]}


def machine_info(device: torch.device) -> dict:
    """Threads, versions and processor, so a number can be traced to where it was measured."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": cpu,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": str(device),
           "openmp_env": {k: os.environ.get(k) for k in OPENMP_ENV}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def run_benchmark(dense: nn.Module, moe: nn.Module, ks: list[int] | None = None, prefill: int = 512,
                  decode: int = 64, batch: int = 8, repeats: int = 5, warmup: int = 1, seed: int = 0,
                  progress: Progress | None = None) -> dict:
    """Time dense vs factorized (every K in ks) on the same seeded token ids; see the module docstring.

    `moe` is factorlab.factorize.build_moe(dense, ...) (its K is restored afterwards). decode=0 or
    batch=0 skips that measurement (its speedup is then None). progress gets
    {"phase", "step", "total"} after each repetition.
    """
    layers = factorized_layers(moe)
    if not layers:
        raise ValueError("the factorized model has no FactorizedMLP layer: build it with factorize.build_moe")
    if prefill < 1 or repeats < 1 or decode < 0 or batch < 0:
        raise ValueError("prefill and repeats must be >= 1; decode and batch >= 0")
    first = next(iter(layers.values()))
    n = first.num_experts
    ks = sorted(set(ks or range(1, n + 1)))
    if not all(1 <= k <= n for k in ks):
        raise ValueError(f"every K must be in 1..{n} (the number of experts), got {ks}")
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    param = next(dense.parameters())
    device, vocab = param.device, dense.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prefill), generator=gen).to(device)  # (1, T)
    batch_ids = torch.randint(0, vocab, (batch, prefill), generator=gen).to(device) if batch else None
    prompt = ids[:, :DECODE_PROMPT_TOKENS]
    ffn_layer = sorted(layers)[len(layers) // 2]
    saved_k = {i: m.top_k for i, m in layers.items()}
    phases = [p for p, on in zip(MEASUREMENTS, (True, True, True, decode > 0, batch > 0)) if on]
    state = {"step": 0, "total": len(phases) * repeats}

    def tick(phase: str) -> Callable[[], None]:
        def _tick() -> None:
            state["step"] += 1
            if progress:
                progress({"phase": phase, "step": state["step"], "total": state["total"]})
        return _tick

    def with_k(k: int, fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            set_top_k(moe, k)  # a per-layer K plan applies
            return fn()
        return run

    raw: dict[str, dict] = {}
    loads: dict[str, dict] = {}
    try:
        with torch.inference_mode():
            x = ffn_inputs(dense, ids, ffn_layer)  # (1, T, H) real hidden states
            dense_mlp, moe_mlp = decoder_layers(dense)[ffn_layer].mlp, layers[ffn_layer]
            for k in ks:
                loads[str(k)] = with_k(k, lambda: expert_load(moe, ids))()

            def measure(phase: str, model: nn.Module, mlp: nn.Module) -> Callable[[], float]:
                return {"ffn": lambda: _timed(lambda: mlp(x), device),
                        "prefill": lambda: _timed(lambda: _prefill(model, ids), device),
                        "forward": lambda: _timed(lambda: model(input_ids=ids, use_cache=False), device),
                        "decode": lambda: _decode_seconds(model, prompt, decode, device),
                        "batched_prefill": lambda: _timed(lambda: _prefill(model, batch_ids), device)}[phase]

            for phase in phases:
                per_repeat = FFN_REPEATS_PER_REPEAT if phase == "ffn" else 1
                variants = {"dense": measure(phase, dense, dense_mlp)}
                variants.update({str(k): with_k(k, measure(phase, moe, moe_mlp)) for k in ks})
                log.info("bench %s: %d repeats x %d variants", phase, repeats, len(variants))
                raw[phase] = _alternate(variants, repeats * per_repeat, warmup, _tick_every(per_repeat, tick(phase)))
            mean_ks = {str(k): with_k(k, lambda: measured_mean_k(moe, ids, batch_ids, prompt, decode, device))()
                       for k in ks}
    finally:
        for i, m in layers.items():
            m.set_top_k(saved_k[i])
    if "decode" in raw:
        for entry in raw["decode"].values():
            entry["tokens_per_s"] = decode / entry["median_s"]
    info = model_info(dense)
    decode_context = DECODE_PROMPT_TOKENS + decode // 2
    result_k, limits, measured_limits, mean_k = {}, {}, {}, {}
    for k in ks:
        speed = {f"{p}_speedup": (raw[p]["dense"]["median_s"] / raw[p][str(k)]["median_s"] if p in raw else None)
                 for p in MEASUREMENTS}
        result_k[str(k)] = speed
        shape = (info, n, k, sorted(layers), first.shared_size, prefill, decode_context, ffn_layer)
        limits[str(k)] = speed_limits(*shape)
        if mean_ks[str(k)].get("prefill"):  # per-token K: the bound at the experts it actually ran here
            measured_limits[str(k)] = speed_limits(*shape, mean_k=mean_ks[str(k)])
            mean_k[str(k)] = {p: sum(v.values()) / len(v) for p, v in mean_ks[str(k)].items() if v}
    machine = {**machine_info(device), "load_average_before": load_before,
               "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    of_min = {k: {p: raw[p]["dense"]["min_s"] / raw[p][k]["min_s"] for p in raw} for k in result_k}
    extra = {"limits_measured": measured_limits, "mean_k": mean_k} if measured_limits else {}
    return {"k": result_k, "raw": raw, "limits": limits, **extra, "load": loads, "speedup_of_min": of_min,
            "settings": {"prefill": prefill, "decode": decode, "decode_prompt": DECODE_PROMPT_TOKENS,
                         "batch": batch, "repeats": repeats, "ffn_samples": repeats * FFN_REPEATS_PER_REPEAT,
                         "warmup": warmup, "seed": seed, "ks": ks, "num_experts": n,
                         "factorized_layers": sorted(layers), "ffn_layer": ffn_layer,
                         "shared_size": first.shared_size, "output_mode": first.output_mode,
                         "dtype": str(param.dtype).replace("torch.", ""), "inputs": "seeded random token ids",
                         "prefill_logits": "last position only (as generation); forward: every position"},
            "machine": machine}


def _tick_every(n: int, tick: Callable[[], None]) -> Callable[[], None]:
    """A tick that fires every n-th call (FFN samples are grouped n to a progress step)."""
    calls = {"n": 0}

    def _tick() -> None:
        calls["n"] += 1
        if calls["n"] % n == 0:
            tick()
    return _tick


def format_report(result: dict) -> str:
    """A plain-text table of speedups next to their FLOP limits, raw medians, and the per-expert load."""
    s, raw = result["settings"], result["raw"]
    phases = [p for p in MEASUREMENTS if p in raw]
    titles = {"ffn": "FFN layer", "prefill": f"prefill {s['prefill']}", "forward": f"forward {s['prefill']}",
              "decode": f"decode {s['decode']}", "batched_prefill": f"prefill {s['batch']}x{s['prefill']}"}
    lines = [f"dense vs {s['num_experts']} experts in {len(s['factorized_layers'])} layers: {s['dtype']} on "
             f"{result['machine']['device']}, {result['machine']['threads']} threads, median of "
             f"{s['repeats']} alternating repeats; speedup (limit from FFN multiply-adds)",
             "  K" + "".join(f"{titles[p]:>22s}" for p in phases)]
    measured = result.get("limits_measured") or {}
    for k, speed in result["k"].items():
        cells = [f"{speed[p + '_speedup']:.2f}x ({result['limits'][k][p]:.2f}"
                 + (f"|{measured[k][p]:.2f})" if k in measured else ")") for p in phases]
        lines.append(f"{k:>3}" + "".join(f"{c:>22s}" for c in cells))
    for k, means in (result.get("mean_k") or {}).items():
        ran = ", ".join(f"{p} {v:.2f}" for p, v in means.items())
        lines.append(f"K={k} is per-token: experts per token it ran on these tokens (mean over layers): {ran}; "
                     "the limit after | is at that active share")
    lines.append("speedup of the fastest samples (min/min), less sensitive to other processes:")
    for k, of_min in result["speedup_of_min"].items():
        lines.append(f"{k:>3}" + "".join(f"{of_min[p]:21.2f}x" for p in phases))
    for phase in phases:
        parts = [f"{name}={e['median_s'] * 1e3:.1f} [{e['min_s'] * 1e3:.1f}-{e['max_s'] * 1e3:.1f}]"
                 for name, e in raw[phase].items()]
        lines.append(f"{phase} ms: " + "  ".join(parts))
    if "decode" in raw:
        rates = [f"{name}={e['tokens_per_s']:.1f}" for name, e in raw["decode"].items()]
        lines.append("decode tokens/s: " + "  ".join(rates))
    env = result["machine"].get("openmp_env", {})
    if (env.get("OMP_WAIT_POLICY") or "").upper() == "PASSIVE" and not env.get("GOMP_SPINCOUNT"):
        lines.append("note: OMP_WAIT_POLICY=PASSIVE without GOMP_SPINCOUNT: every parallel region sleeps, which "
                     "penalises small ops; for latency numbers run with GOMP_SPINCOUNT=300000")
    for k, load in result["load"].items():
        share = " ".join(f"{100 * v:.0f}%" for v in load["share"])
        lines.append(f"load K={k}: {share} (busiest expert {load['max_over_mean']:.2f}x the mean; "
                     f"worst layer {load['worst_layer_max_over_mean']:.2f}x)")
    return "\n".join(lines)
