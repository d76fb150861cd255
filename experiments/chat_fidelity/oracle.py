"""Issue 30: how far can routing alone take chat fidelity? A perfect router, at the same active share.

The per-token-K router is trained to predict labels: each token's best set of experts, the one with the least
FFN output error at a price per expert that keeps the layer's mean K (factorlab.par.per_token.best_sets). This
script replaces every factorized layer's router by those labels themselves, computed exactly on the tokens being
run (the dense FFN computed alongside as the target): the router's ceiling with the run's trained weights.

Active share: per layer, the price is set so that the perfect router runs the same mean number of experts on the
chat tokens as the trained router does (its per-layer mean, measured on the same teacher-forced tokens); the same
per-layer price then decides every token of the greedy replies. Output: the chat-fidelity measures of
factorlab.fidelity (same prompts, dense replies and bootstrap), for the trained router and the perfect one.

    PYTHONPATH=. python experiments/chat_fidelity/oracle.py default-s1 --k 2 --json oracle_default-s1_k2.json

Relative names of --json go to experiments/chat_fidelity/results/.
"""
from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import torch

from factorlab.fidelity import (REPLY_TOKENS, _dense_replies, _encode, common_prefix, greedy_replies,
                                load_chat_prompts, paired_difference, reply_hidden, summarize, teacher_forced)
from factorlab.moe import FactorizedMLP, factorized_layers, set_top_k
from factorlab.par.per_token import min_experts, set_errors, size_multiplier
from factorlab.workflows import open_run

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 1024


class Routing:
    """The forward of every factorized layer, switchable: the trained router (counting its experts on the valid
    tokens) or the perfect one (calibrating its per-layer price, or using it)."""

    def __init__(self, moe: torch.nn.Module):
        self.layers = {i: m for i, m in factorized_layers(moe).items() if m.adaptive}
        self.mode = "router"
        self.valid: torch.Tensor | None = None  # (B*T,) bool: the non-padding tokens of the batch being run
        self.router_mean: dict[int, float] = {}
        self.price: dict[int, float] = {}
        self.mean: float | None = None  # the perfect router's mean K in every layer; None: the trained router's
        self.counts = {i: [0, 0] for i in self.layers}  # decode steps: [tokens, experts] under the perfect router
        for i, m in self.layers.items():
            original = m.forward
            m.forward = types.MethodType(lambda mlp, h, i=i, original=original: self.forward(mlp, i, h, original), m)

    def forward(self, mlp: FactorizedMLP, i: int, hidden: torch.Tensor, original) -> torch.Tensor:
        x = hidden.reshape(-1, mlp.hidden_size)
        if self.mode == "router":
            if self.valid is not None and self.valid.numel() == x.shape[0]:  # the teacher-forced batch
                run = (mlp.routing_weights(x) > 0).sum(1).double()
                self.router_mean[i] = float(run[self.valid].mean())
            return original(hidden)
        target = mlp._dense_ffn(x)
        err, masks = set_errors(mlp, x, target, CHUNK, min_experts(mlp))  # (T, S), (S, N)
        size = masks.sum(1).double()
        if self.mode == "calibrate":  # the price at which the valid tokens run the router's mean (or a set mean)
            self.price[i] = size_multiplier(err[self.valid], size, self.mean or self.router_mean[i])
        chosen = masks[(err + self.price[i] * size).argmin(1)]  # (T, N)
        if hidden.shape[1] == 1:  # a decode step: one new token per row
            self.counts[i][0] += x.shape[0]
            self.counts[i][1] += int(chosen.sum())
        weight = mlp.num_experts / mlp.top_k if mlp.output_mode == "scaled" else 1.0 / mlp.top_k
        out = mlp.shared_output(x) + weight * torch.einsum("tn,tnh->th", chosen.to(x.dtype), mlp.expert_outputs(x))
        return out.view(hidden.shape)


def valid_mask(prompts: list[list[int]], replies: list[list[int]]) -> torch.Tensor:
    """The non-padding positions of fidelity's right-padded prompt + reply batch of every prompt, flattened."""
    rows = [len(p) + len(r) for p, r in zip(prompts, replies)]
    width = max(rows)
    return (torch.arange(width)[None, :] < torch.tensor(rows)[:, None]).flatten()


def measure(dense, moe, tokenizer, ids, replies, dense_hidden, dense_stats) -> tuple[dict, dict, list[str]]:
    forced = teacher_forced(dense, moe, ids, replies, len(ids), dense_hidden)  # one batch: one price per layer
    own = greedy_replies(moe, tokenizer, ids, REPLY_TOKENS, 16)
    judged = teacher_forced(dense, None, ids, own, 16)
    per_prompt = {"agree": forced["agree"], "kl": forced["kl"], "own_nll": judged["nll"], "own_count": judged["count"],
                  "prefix": [min(common_prefix(a, b), 1 << 20) for a, b in zip(replies, own)]}
    return summarize(per_prompt, dense_stats), per_prompt, [tokenizer.decode(r, skip_special_tokens=True) for r in own]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--k", type=int, default=2, help="the nominal K (per-token K: the mean)")
    ap.add_argument("--means", default="", help="also the perfect router at these mean K in every layer, e.g. 2.5,3")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    start = time.monotonic()
    run, loaded, moe = open_run(args.run)
    dense, tokenizer = loaded.model, loaded.tokenizer
    set_top_k(moe, args.k)
    records = load_chat_prompts()
    texts = [r["prompt"] for r in records]
    ids = _encode(tokenizer, texts)
    replies = _dense_replies(dense, tokenizer, ids, texts, REPLY_TOKENS, 16, lambda: None)  # the cached ones
    dense_hidden = reply_hidden(dense, ids, replies, 16)
    base = teacher_forced(dense, None, ids, replies, 16, dense_hidden)
    dense_stats = {"nll": base["nll"], "count": base["count"]}

    routing = Routing(moe)
    routing.valid = valid_mask(ids, replies)
    result = {"run": args.run, "k": args.k, "by_k": {}, "per_prompt": {}, "replies": {}}
    means = [float(m) for m in args.means.split(",") if m]
    decode_k: dict = {}
    for mode in ["router", "perfect"] + [f"perfect@{m:g}" for m in means]:
        if mode != "router":
            routing.mean = None if mode == "perfect" else float(mode.split("@")[1])
            routing.mode, routing.valid = "calibrate", valid_mask(ids, replies)
            routing.counts = {i: [0, 0] for i in routing.layers}
            teacher_forced(dense, moe, ids, replies, len(ids), dense_hidden)  # sets each layer's price
            routing.mode, routing.valid = "perfect", None
        summary, per_prompt, texts_out = measure(dense, moe, tokenizer, ids, replies, dense_hidden, dense_stats)
        result["by_k"][mode], result["per_prompt"][mode], result["replies"][mode] = summary, per_prompt, texts_out
        if mode != "router":
            counts = {i: e / t for i, (t, e) in routing.counts.items() if t}
            decode_k[mode] = sum(counts.values()) / len(counts)
        print(f"{mode}: agreement {summary['agreement']:.4f} {summary['agreement_ci']} kl {summary['kl']:.3f} "
              f"identical 8/16/32 {summary['identical']}", flush=True)
    result.update({
        "router_mean_k": routing.router_mean,
        "mean_k": {"router_teacher_forced": sum(routing.router_mean.values()) / len(routing.router_mean),
                   "perfect_decode": decode_k},
        "prompts": records, "dense": {"per_prompt": dense_stats},
        "settings": {"reply_tokens": REPLY_TOKENS, "teacher_forcing": "all prompts in one right-padded batch",
                     "greedy": "left-padded batches of 16", "seconds": time.monotonic() - start,
                     "threads": torch.get_num_threads()}})
    view = {m: {"per_prompt": {str(args.k): result["per_prompt"][m]}, "prompts": records, "dense": result["dense"]}
            for m in result["by_k"]}
    result["perfect_minus_router"] = {
        name: paired_difference(view["perfect"], view["router"], str(args.k), name)
        for name in ("agreement", "kl", "identical_8", "identical_16")}
    print(json.dumps(result["perfect_minus_router"]))
    out = Path(args.json) if Path(args.json).is_absolute() or Path(args.json).parent != Path(".") else RESULTS / args.json
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["mean_k"]), f"{result['settings']['seconds']:.0f} s ->", out)


if __name__ == "__main__":
    main()
