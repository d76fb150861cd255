"""Benchmark scores of a saved run at its own K, the dense scores read from the shared cache.

Usage: python experiments/tools/screen.py RUN TASKS [LIMIT] [OUT.json]   (e.g. hellaswag,arc_easy,piqa 500)
The dense scores come from experiments/dense_cache.json when present (python
experiments/tools/dense_cache.py CONFIG fills it); the seeded subset is the grid's (seed 0).
--oracle as the first argument replaces the router by oracle routing: in every factorized layer each
token gets the K experts whose joint output is closest to the dense FFN's output on that token (it
needs the dense FFN, so it is an upper bound for routing, not a usable model).
Environment: THREADS (default 1).
"""
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import factorlab.evaluate as evaluate
from factorlab.experiment import read_dense_cache
from factorlab.models import load_model
from factorlab.moe import factorized_layers
from factorlab.par import combination_labels
from factorlab.runs import load_moe, load_run


class OracleRouting(nn.Module):
    """A FactorizedMLP whose tokens take the best joint K experts given the dense FFN's output."""

    def __init__(self, mlp, dense_mlp):
        super().__init__()
        self.mlp, self.dense = mlp, dense_mlp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, m = h.reshape(-1, h.shape[-1]), self.mlp
        shared, outputs = m.shared_output(x), m.expert_outputs(x)  # (T, H), (T, N, H)
        weight = m.num_experts / m.top_k  # the scaled output mode
        mask = combination_labels(outputs, self.dense(x) - shared, weight, m.top_k)
        return (shared + weight * torch.einsum("tn,tnh->th", mask, outputs)).view(h.shape)


args = sys.argv[1:]
oracle = bool(args) and args[0] == "--oracle"
args = args[1:] if oracle else args
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
run = load_run(args[0])
loaded = load_model(run.recipe.model)
moe = load_moe(run, loaded.model)
k = run.recipe.top_k
if oracle:
    if run.recipe.output_mode != "scaled":
        sys.exit("--oracle supports the scaled output mode only")
    for i, mlp in factorized_layers(moe).items():
        moe.model.layers[i].mlp = OracleRouting(mlp, loaded.model.model.layers[i].mlp)
    evaluate.gflops = lambda *a, **kw: None  # no FactorizedMLP left to count: the oracle's FLOPs are not a claim
cache_file = Path("experiments/dense_cache.json")
cache = read_dense_cache(cache_file, run.recipe.model) if cache_file.exists() else {}
sweep = evaluate.run_sweep(loaded.model, loaded.tokenizer, moe, args[1], [k], 
                           limit=int(args[2]) if len(args) > 2 else 500, seed=0, progress=False, dense_cache=cache)
sweep["oracle_routing"] = oracle
if len(args) > 3:
    Path(args[3]).write_text(json.dumps(sweep, indent=1, default=str))
for task, v in sweep["tasks"].items():
    m = v["main_metric"]
    print(f"{task}: dense {v['dense'][m]:.3f}  K={k} {v['k'][str(k)][m]:.3f}  above-chance {v['k'][str(k)]['above_chance']}")
