"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Do a run's errors at a sequence's first positions carry to the later ones? (issue 7)

Usage: PYTHONPATH=. python experiments/per_token_k/early_dense_probe.py RUN P1,P2,... [ROWS] [OUT.json]   (THREADS, default 1)
Runs the first ROWS (default 32) held-out rows of the recipe's held-out text (rows of 256 `everyday`
tokens) through the run as trained and, per P, with positions 0..P-1 of every factorized layer
running the dense model's FFN. The mean KL(dense || factorized) of the next-token distributions at
positions >= P, with and without, shows how much of the later positions' error comes from the first
P positions' FFN errors (through attention).
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


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    run = load_run(args[0])
    cuts = [int(p) for p in args[1].split(",")]
    rows = int(args[2]) if len(args) > 2 else 32
    loaded = load_model(run.config["model"])
    moe = load_moe(run, loaded.model)
    layers = factorized_layers(moe)
    _, held = load_data(loaded, DataSpec("everyday"), 0)
    held = held[:rows]
    with torch.no_grad():
        dense_logp = F.log_softmax(loaded.model(held).logits.float(), -1)

    def kl_with(cut: int) -> torch.Tensor:
        def hook(dense_mlp):
            def replace(_m, inputs, output):
                out = output.clone()
                out[:, :cut] = dense_mlp(inputs[0][:, :cut])
                return out
            return replace

        dense_layers = loaded.model.model.layers
        handles = [m.register_forward_hook(hook(dense_layers[i].mlp)) for i, m in layers.items()] if cut else []
        with torch.no_grad():
            logp = F.log_softmax(moe(held).logits.float(), -1)
        for h in handles:
            h.remove()
        return (dense_logp.exp() * (dense_logp - logp)).sum(-1)  # (B, L)

    base = kl_with(0)
    out = {"run": args[0], "rows": rows, "kl_all": float(base.mean()), "cuts": {}}
    print(f"as trained: KL {out['kl_all']:.4f} over all positions")
    for cut in cuts:
        kl = kl_with(cut)
        entry = {"kl_after_as_trained": float(base[:, cut:].mean()), "kl_after_with_dense_first": float(kl[:, cut:].mean()),
                 "kl_all_with_dense_first": float(kl.mean())}
        out["cuts"][str(cut)] = entry
        print(f"positions 0-{cut - 1} dense: KL at positions >= {cut}: {entry['kl_after_with_dense_first']:.4f} "
              f"(as trained {entry['kl_after_as_trained']:.4f})")
    if len(args) > 3:
        Path(args[3]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
