"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

How the always-on shared neurons are chosen, single layers (issue 7, fifteenth round).

Usage: PYTHONPATH=. python experiments/shared_neurons/shared_probe.py LAYERS OUT.json   (e.g. 2,4,15,24 out.json)
Environment: THREADS (default 2), TOKENS (training tokens, default 32768; 4,096 held-out tokens).

Per layer, on the dense model's FFN inputs (everyday text, each row's first token left out), the
default recipe's per-layer steps with the library's own functions (PAR router -> least-squares
refit -> 5 per-token-K rounds at a mean of 2; 256 shared neurons, cluster split of the rest into 4),
once per way of choosing the 256 shared neurons; relative error ||t - o||^2 / ||t||^2 on the
training tokens and on held-out tokens of other documents:
  * frequency: the library's choice, the neurons most often among each token's strongest quarter by
    |activation| (factorize._shared_neurons);
  * energy_frequency: the same count by output energy (activation^2 * ||down row||^2);
  * energy_share: the largest mean per-token share of output energy (each token's energies divided by
    their sum, so no token dominates);
  * energy_mean: the largest mean output energy (tokens with huge outputs weigh more, as in the
    least-squares refit).
"""
import json
import os
import sys
import time

import torch

from factorlab.factorize import SHARED_CHOICES, _complement, _shared_neurons, balanced_kmeans
from factorlab.moe import FactorizedMLP
from factorlab.par import TrainConfig, adaptive_rounds, layer_labels, refit_down, train_router

from experiments.tools.layer_probe import CHUNK, load_inputs, rel


def recipe(m, perm, x, t) -> FactorizedMLP:
    """The default recipe's per-layer steps (as par._train_layerwise), fixed inputs x and targets t."""
    cfg = TrainConfig()
    mlp = FactorizedMLP(m, perm, 4, cfg.top_k, shared_size=256)
    for p in mlp.parameters():
        p.requires_grad_(False)
    train_router(mlp, x, layer_labels(mlp, x, t, cfg.top_k, CHUNK), cfg, lambda: None, None)
    refit_down(mlp, x, t, cfg.ridge, CHUNK)
    adaptive_rounds(mlp, x, t, cfg, lambda: None, None)
    return mlp


def main() -> None:
    layers, out_path = [int(i) for i in sys.argv[1].split(",")], sys.argv[2]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    start = time.time()
    loaded, din, dheld = load_inputs(layers, int(os.environ.get("TOKENS", "32768")))
    result = {"layers": {}, "choices": list(SHARED_CHOICES)}
    for i in layers:
        m = loaded.model.model.layers[i].mlp
        x, hx = din[i], dheld[i]
        with torch.no_grad():
            h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            t, ht = m(x), m(hx)
        down2 = m.down_proj.weight.detach().pow(2).sum(0)
        row = {}
        base = None
        for choice in SHARED_CHOICES:
            shared = _shared_neurons(h.abs(), 256, choice, down2)
            rest = _complement(shared, h.shape[1])
            assign = balanced_kmeans(h.abs()[:, rest].t(), 4, 0)
            perm = torch.cat([shared] + [rest[assign == c] for c in range(4)])
            tick = time.time()
            mlp = recipe(m, perm, x, t)
            with torch.no_grad():
                row[choice] = {"held": rel(ht, mlp(hx)), "train": rel(t, mlp(x)),
                               "shared_only_held": rel(ht, mlp.shared_output(hx)),
                               "overlap_with_frequency": None if base is None else int(torch.isin(shared, base).sum()),
                               "seconds": round(time.time() - tick, 1)}
            base = shared if base is None else base
            print(i, choice, json.dumps(row[choice]), flush=True)
        result["layers"][str(i)] = row
    result["seconds"] = round(time.time() - start, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
