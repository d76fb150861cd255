"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Fast recipe screening for issue 7: held-out perplexity/agreement of recipes, one model load.

Usage: python experiments/default_recipe/probe.py OUT.jsonl '[{"shared_size": 256, "train_tokens": 32768}, ...]'
Row keys: FactorizeSpec, TrainConfig and DataSpec fields (as in `factorlab experiment`), plus
"threads". Appends one JSON line per row (setting, seconds, held-out metrics per K, per-layer
relative error) to OUT.jsonl.
"""
import json
import sys
import time

import torch

from factorlab.experiment import _split
from factorlab.models import load_model
from factorlab.workflows import train_model

out, rows = sys.argv[1], json.loads(sys.argv[2])
loaded = load_model("default")
for row in rows:
    torch.set_num_threads(int(row.pop("threads", 2)))
    ks = row.pop("eval_ks", None)
    sensitivity = row.pop("sensitivity", False)
    base = {"model": "default", "num_experts": 4, "top_k": 2, "split": "cluster", "mode": "experts",
            "shared_size": 256, "adaptive_rounds": 0, "refine_rounds": 2}  # the top-K recipe these probes ran
    setting = {**base, **row}
    spec, cfg, data = _split(setting, {"data": {"heldout_tokens": 8192}})
    t = time.time()
    tr = train_model(spec, cfg, data, loaded, eval_ks=ks or [spec.top_k])
    rec = {"setting": setting, "train_s": round(tr.seconds, 1), "total_s": round(time.time() - t, 1),
           "heldout": {k: {m: round(v, 4) for m, v in h.items()} for k, h in tr.heldout.items()},
           "label_acc": tr.result.summary()["mean_router_label_accuracy"],
           "layer_rel": {i: round(r["losses"]["distill_rel"], 4) for i, r in
                         ((rr["layer"], rr) for rr in tr.result.log if rr["phase"] == "experts")}}
    if sensitivity:  # held-out ppl with one layer's FFN put back to dense, for every factorized layer
        from factorlab.workflows import load_data

        _, held = load_data(loaded, data, spec.seed)
        held = held[:4]

        def ppl(model):
            with torch.no_grad():
                logits = model(held).logits[:, :-1]
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)).exp().item()

        layers = tr.moe.model.layers
        rec["sensitivity_base"] = ppl(tr.moe)
        rec["sensitivity"] = {}
        for i in range(len(layers)):
            mlp = layers[i].mlp
            layers[i].mlp = loaded.model.model.layers[i].mlp
            rec["sensitivity"][i] = round(ppl(tr.moe), 2)
            layers[i].mlp = mlp
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
