"""Issue 34 on one run: held-out perplexity and top-1 agreement with dense at every K, with every K's own
refit and K = N the dense FFN (now), against the same run's trained-K weights reused at every K and the
refitted experts run at K = N (before).

Usage: PYTHONPATH=. python experiments/every_k/before_after.py RUN [--json OUT.json]   (THREADS, default 2)
"""
import json

import torch
from shared import as_before, open_run

from factorlab.evaluate import heldout_metrics
from factorlab.moe import set_top_k
from factorlab.workflows import load_data


def main() -> None:
    run, loaded, moe, out = open_run(__doc__)
    _, heldout_ids = load_data(loaded, run.recipe)
    n = run.recipe.num_experts
    result = {"run": run.name, "tokens": int(heldout_ids.numel()), "now": {}, "before": {}}
    ids = heldout_ids[:4]  # K = N against dense, logit by logit, on 4 held-out rows
    with torch.no_grad():
        set_top_k(moe, n)
        result["k_n_max_abs_logit_diff"] = float((moe(ids).logits - loaded.model(ids).logits).abs().max())
    print("K=N max |logit diff|", result["k_n_max_abs_logit_diff"], flush=True)
    for k in range(1, n + 1):
        set_top_k(moe, k)
        result["now"][k] = heldout_metrics(loaded.model, moe, heldout_ids)
        print("now", k, result["now"][k], flush=True)
    as_before(moe, run.recipe.top_k)
    for k in range(1, n + 1):
        set_top_k(moe, k)
        result["before"][k] = heldout_metrics(loaded.model, moe, heldout_ids)
        print("before", k, result["before"][k], flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
