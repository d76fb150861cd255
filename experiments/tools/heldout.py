"""Held-out metrics of saved runs on the recipe's held-out rows (8,192 `everyday` tokens in rows of
256, seed 0), whatever text and row length each run trained on: comparable figures for runs trained
with another --seq-len or --data (issue 7).

Usage: PYTHONPATH=. python experiments/tools/heldout.py RUN[:K] ... [--json OUT.json]   (THREADS, default 2)
K defaults to the run's own.
"""
import json
import os
import sys
from pathlib import Path

import torch

from factorlab.evaluate import heldout_metrics
from factorlab.models import load_model
from factorlab.moe import set_top_k
from factorlab.runs import load_moe, load_run
from factorlab.recipe import Recipe
from factorlab.workflows import load_data


def runs_and_heldout(argv: list[str], doc: str):
    """Parse `RUN[:K] ... [--json OUT.json]` (exit with doc when no run is named), set the threads
    (THREADS, default 2) and load each model once: returns the output path (or None) and a generator
    of (run spec, run, loaded model, the recipe's held-out rows)."""
    args, out_path = list(argv), None
    if "--json" in args:
        i = args.index("--json")
        out_path, args = args[i + 1], args[:i] + args[i + 2:]
    if not args:
        sys.exit(doc)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))

    def runs():
        loaded, heldout_ids = None, None
        for spec in args:
            run = load_run(spec.partition(":")[0])
            if loaded is None or loaded.spec != run.recipe.model:
                loaded = load_model(run.recipe.model)
                _, heldout_ids = load_data(loaded, Recipe(data="everyday", seed=0))
            yield spec, run, loaded, heldout_ids

    return out_path, runs()


def main() -> None:
    out_path, runs = runs_and_heldout(sys.argv[1:], __doc__)
    results = {}
    for spec, run, loaded, heldout_ids in runs:
        name, _, k = spec.partition(":")
        moe = load_moe(run, loaded.model)
        k = int(k or run.recipe.top_k)
        set_top_k(moe, k)
        m = heldout_metrics(loaded.model, moe, heldout_ids)
        results[f"{name}:{k}"] = m
        print(f"{name} K={k}: held-out perplexity {m['perplexity']:.2f} (dense {m['dense_perplexity']:.2f}), "
              f"agreement {m['agreement']:.3f}, {m['tokens']} tokens")
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
