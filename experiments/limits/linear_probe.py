"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

A linear bypass next to the experts, single layers (issue 7, fifth round): a negative result.

Usage: PYTHONPATH=. python experiments/limits/linear_probe.py LAYERS OUT.json   (e.g. 4,15,24 out.json)
Environment: THREADS (default 2). Result: experiments/limits/results/linear_probe.json.

After the default recipe's per-layer steps at K=2 (experiments/tools/layer_probe.recipe, dense model's FFN
inputs, 32,768 `everyday` training tokens, 4,096 held-out tokens), fit what the experts miss with a
linear map of the FFN input (least squares with a bias, ridge 1e-3 / 1e-1 of the mean diagonal),
in full (576 x 576, costs as much as ~384 neurons) and truncated to rank 32 / 64 / 128 (the
fitted outputs' leading directions; rank r costs as much as ~2r/3 neurons). Held-out relative error.
"""
import json
import os
import sys

import torch

from experiments.tools.layer_probe import load_inputs, recipe, rel, split_layer


def main() -> None:
    layers, out_path = [int(i) for i in sys.argv[1].split(",")], sys.argv[2]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    loaded, din, dheld = load_inputs(layers)
    result = {}
    for i in layers:
        m = loaded.model.model.layers[i].mlp
        x, hx = din[i], dheld[i]
        s = split_layer(m, x, hx)
        t, ht = s.t, s.ht
        mlp = recipe(m, s.perm, x, t, 2)
        with torch.no_grad():
            r, hr = t - mlp(x), ht - mlp(hx)
            row = {"recipe_k2": rel(ht, ht - hr)}
            xa = torch.cat([x, torch.ones(len(x), 1)], 1).double()
            hxa = torch.cat([hx, torch.ones(len(hx), 1)], 1).double()
            gram = xa.t() @ xa
            for ridge in (1e-3, 1e-1):
                g = gram.clone()
                g.diagonal().add_(ridge * gram.diagonal().mean())
                lin = torch.linalg.solve(g, xa.t() @ r.double())
                row[f"full_ridge_{ridge}"] = rel(ht, ht - hr + (hxa @ lin).float())
                _, _, v = torch.linalg.svd(xa @ lin, full_matrices=False)
                for rank in (32, 64, 128):
                    proj = v[:rank].t() @ v[:rank]
                    row[f"rank_{rank}_ridge_{ridge}"] = rel(ht, ht - hr + (hxa @ lin @ proj).float())
        result[str(i)] = row
        print(i, json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
