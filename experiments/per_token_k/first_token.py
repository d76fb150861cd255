"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

How large each layer's FFN output is at a sequence's first token (the attention sink) against the rest.

Usage: PYTHONPATH=. python experiments/per_token_k/first_token.py [OUT.json]
Dense embedded model, 8 held-out rows of 256 tokens of the built-in `everyday` text: per layer the mean
FFN output norm at position 0, the median and maximum over the other positions, and position 0's share
of the layer's squared output (what an unweighted least-squares refit would spend itself on).
"""
import json
import sys

import torch

from factorlab.models import load_model
from factorlab.workflows import DataSpec, load_data

torch.set_num_threads(2)
loaded = load_model("default")
_, held = load_data(loaded, DataSpec(source="everyday", train_tokens=4096, heldout_tokens=2048))
outputs = {}
layers = loaded.model.model.layers
handles = [layer.mlp.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out.detach()))
           for i, layer in enumerate(layers)]
with torch.no_grad():
    loaded.model(held)
for h in handles:
    h.remove()
rows = []
for i in range(len(layers)):
    norm = outputs[i].norm(dim=-1)  # (B, L)
    rows.append({"layer": i, "first_mean": round(norm[:, 0].mean().item(), 1),
                 "rest_median": round(norm[:, 1:].median().item(), 1), "rest_max": round(norm[:, 1:].max().item(), 1),
                 "first_share_of_squares": round((norm[:, 0].pow(2).sum() / norm.pow(2).sum()).item(), 3)})
    print(rows[-1])
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump({"rows_of_256_tokens": int(held.shape[0]), "layers": rows}, f, indent=1)
