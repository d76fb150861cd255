"""The FFN part of batch-1 decode, dense vs factorized, with the weights streaming from memory (issue 28).

Usage: PYTHONPATH=. .venv/bin/python experiments/speed/decode_stream.py RUN [--k 2] [--threads 1] [--steps 64]

Greedy-decodes STEPS tokens of the factorized model after a seeded 32-token prompt (as `bench` does) and
records every layer's FFN input at every step; then times the FFNs alone on those inputs, token by token
and all layers in turn, so that each layer's weights come from memory as in a real decode step (one
layer's weights stay in cache if it runs alone). Dense and factorized alternate, REPEATS times (9);
medians per token. Used to measure each change of the one-token path without the attention, norms
and lm_head that both models share; the end-to-end numbers come from `python -m factorlab bench`.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from factorlab.bench import _decode_seconds
from factorlab.models import decoder_layers, load_model
from factorlab.moe import count_active_experts, set_top_k
from factorlab.runs import load_moe, load_run


def main() -> None:
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)

    def opt(name: str, default: int) -> int:
        return int(args[args.index(name) + 1]) if name in args else default

    k, steps, repeats = opt("--k", 2), opt("--steps", 64), int(os.environ.get("REPEATS", "9"))
    torch.set_num_threads(opt("--threads", 1))
    run = load_run(args[0])
    dense = load_model(run.recipe.model).model
    moe = load_moe(run, dense)
    set_top_k(moe, k)
    prompt = torch.randint(0, dense.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(moe)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def keep(i: int):
        def hook(_m, inputs):
            if inputs[0].shape[1] == 1:  # decode steps only
                seen[i].append(inputs[0].clone())
        return hook

    handles = [layer.mlp.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    with torch.inference_mode():
        _decode_seconds(moe, prompt, steps, torch.device("cpu"))
    for h in handles:
        h.remove()
    mlps = {"dense": [layer.mlp for layer in decoder_layers(dense)], f"K={k}": [layer.mlp for layer in layers]}

    def ffns(name: str) -> None:
        for t in range(steps):
            for i, mlp in enumerate(mlps[name]):
                mlp(seen[i][t])

    with torch.inference_mode():
        with count_active_experts(moe) as mean_k:
            ffns(f"K={k}")
        for name in mlps:
            ffns(name)
        times: dict[str, list[float]] = {name: [] for name in mlps}
        for r in range(repeats):
            for name in (list(mlps) if r % 2 == 0 else list(mlps)[::-1]):
                start = time.perf_counter()
                ffns(name)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) * 1e3 / steps for name, v in times.items()}
    experts = sum(mean_k.values()) / max(len(mean_k), 1)
    print(f"load {os.getloadavg()}, {torch.get_num_threads()} thread(s), {steps} steps, {repeats} repeats, "
          f"{experts:.2f} experts per token (mean over per-token-K layers)")
    dense_ms = med["dense"]
    for name, ms in med.items():
        print(f"{name:>6}: {ms:6.2f} ms of FFN per token   dense / this {dense_ms / ms:.3f}x")


if __name__ == "__main__":
    main()
