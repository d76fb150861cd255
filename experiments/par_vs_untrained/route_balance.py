"""How evenly saved runs' routers spread tokens over the experts (issue 7, eleventh round).

Usage: PYTHONPATH=. python experiments/par_vs_untrained/route_balance.py RUN ... [--json OUT.json]   (THREADS, default 2)
On the first 16 held-out rows of the recipe's held-out text (rows of 256 `everyday` tokens, seed 0),
with each run's routing as saved (its K, per-token thresholds where it has them), per factorized
layer each expert's share of the layer's expert runs (a token runs an expert where its routing
weight is not 0; at per-token K a token may run none or several); prints, averaged over the
layers, the largest expert's share, the smallest's and the normalized entropy of the shares
(1 = perfectly even), and the worst layer's largest share.
"""
import json
import math
import sys
from pathlib import Path

import torch

from experiments.tools.heldout import runs_and_heldout
from factorlab.moe import factorized_layers, record_routing
from factorlab.runs import load_moe

ROWS = 16


def balance(moe: torch.nn.Module, ids: torch.Tensor) -> dict:
    with record_routing(moe) as trace, torch.no_grad():
        moe(ids)
    chosen, _ = trace.stacked()  # per layer (T, K), or (T, N) padded with -1 at per-token K
    n = next(iter(factorized_layers(moe).values())).num_experts
    counts = {i: torch.bincount(c[c >= 0], minlength=n).float() for i, c in chosen.items()}
    shares = {i: c / c.sum() for i, c in counts.items()}
    entropy = {i: float(-(s.clamp_min(1e-12) * s.clamp_min(1e-12).log()).sum() / math.log(len(s)))
               for i, s in shares.items()}
    worst = max(shares, key=lambda i: float(shares[i].max()))
    return {"max_share": sum(float(s.max()) for s in shares.values()) / len(shares),
            "min_share": sum(float(s.min()) for s in shares.values()) / len(shares),
            "entropy": sum(entropy.values()) / len(entropy),
            "worst_layer": worst, "worst_max_share": float(shares[worst].max())}


def main() -> None:
    out_path, runs = runs_and_heldout(sys.argv[1:], __doc__)
    results = {}
    for name, run, loaded, heldout_ids in runs:
        results[name] = r = balance(load_moe(run, loaded.model), heldout_ids[:ROWS])
        print(f"{name}: mean over layers, largest expert's share {r['max_share']:.3f}, smallest {r['min_share']:.3f}, "
              f"entropy {r['entropy']:.3f}; worst layer {r['worst_layer']} ({r['worst_max_share']:.3f})")
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
