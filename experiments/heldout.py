"""Held-out metrics of saved runs on the recipe's held-out rows (8,192 `everyday` tokens in rows of
256, seed 0), whatever text and row length each run trained on: comparable figures for runs trained
with another --seq-len or --data (issue 7).

Usage: PYTHONPATH=. python experiments/heldout.py RUN[:K] ... [--json OUT.json]   (THREADS, default 2)
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
from factorlab.workflows import DataSpec, load_data


def main() -> None:
    args = sys.argv[1:]
    out_path = None
    if "--json" in args:
        i = args.index("--json")
        out_path, args = args[i + 1], args[:i] + args[i + 2:]
    if not args:
        sys.exit(__doc__)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    loaded, heldout_ids, results = None, None, {}
    for spec in args:
        name, _, k = spec.partition(":")
        run = load_run(name)
        if loaded is None or loaded.spec != run.config["model"]:
            loaded = load_model(run.config["model"])
            _, heldout_ids = load_data(loaded, DataSpec("everyday"), 0)
        moe = load_moe(run, loaded.model)
        k = int(k or run.config["top_k"])
        set_top_k(moe, k)
        m = heldout_metrics(loaded.model, moe, heldout_ids)
        results[f"{name}:{k}"] = m
        print(f"{name} K={k}: held-out perplexity {m['perplexity']:.2f} (dense {m['dense_perplexity']:.2f}), "
              f"agreement {m['agreement']:.3f}, {m['tokens']} tokens")
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
