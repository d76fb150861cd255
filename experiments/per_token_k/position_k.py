"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Experts per token, and the KL to the dense model, by position in the sequence for a run (issue 7).

Usage: PYTHONPATH=. python experiments/per_token_k/position_k.py RUN [ROWS] [OUT.json]   (THREADS, default 1)
Runs the first ROWS (default 16) held-out rows of the recipe's held-out text (rows of 256 `everyday`
tokens) through the run at its own K and prints the mean number of routed experts that ran per
token, averaged over the factorized layers, for position buckets 0, 1-3, 4-15, 16-31, 32-63,
64-127 and 128-255. Benchmark contexts are short (OpenBookQA ~15 tokens, HellaSwag ~80), so how
many experts early positions run sets the experts per token a benchmark measures. It also prints
the mean KL(dense || factorized) of the next-token distributions per bucket: how far from the
dense model each position is (a fixed top-K run gets the KL only).
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from factorlab.models import load_model
from factorlab.moe import factorized_layers
from factorlab.runs import load_moe, load_run
from factorlab.workflows import DataSpec, load_data

BUCKETS = [(0, 1), (1, 4), (4, 16), (16, 32), (32, 64), (64, 128), (128, 256)]


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    run = load_run(args[0])
    rows = int(args[1]) if len(args) > 1 else 16
    loaded = load_model(run.config["model"])
    moe = load_moe(run, loaded.model)
    layers = factorized_layers(moe)
    adaptive = any(m.adaptive for m in layers.values())
    _, held = load_data(loaded, DataSpec("everyday"), 0)
    held = held[:rows]
    with torch.no_grad():
        dense_logp = F.log_softmax(loaded.model(held).logits.float(), -1)
    counts = []

    def hook(m, inputs, _output):
        x = inputs[0]
        counts.append((m.routing_weights(x.reshape(-1, x.shape[-1])) > 0).float().sum(1).view(x.shape[:2]))

    handles = [m.register_forward_hook(hook) for m in layers.values()] if adaptive else []
    with torch.no_grad():
        logp = F.log_softmax(moe(held).logits.float(), -1)
    for h in handles:
        h.remove()
    kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1)  # (B, L)
    per_position = torch.stack(counts).mean(0) if adaptive else None  # (B, L): mean over the factorized layers
    out = {"run": args[0], "rows": rows, "seq_len": held.shape[1], "k": int(run.config["top_k"]),
           "overall": float(per_position.mean()) if adaptive else None, "buckets": {},
           "kl_overall": float(kl.mean()), "kl_buckets": {}}
    for a, b in BUCKETS:
        if a >= held.shape[1]:
            break
        name = f"{a}-{b - 1}"
        out["kl_buckets"][name] = float(kl[:, a:b].mean())
        line = f"positions {name}: KL {out['kl_buckets'][name]:.3f}"
        if adaptive:
            out["buckets"][name] = float(per_position[:, a:b].mean())
            line += f", {out['buckets'][name]:.3f} experts per token"
        print(line)
    print(f"all positions: KL {out['kl_overall']:.3f}" + (f", {out['overall']:.3f} experts per token" if adaptive else ""))
    if len(args) > 2:
        Path(args[2]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
