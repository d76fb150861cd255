"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Single-layer probes of the K=2 error (issue 7, fourth round), on the dense model's FFN inputs.

Usage: PYTHONPATH=. python experiments/tools/layer_probe.py LAYERS OUT.json   (e.g. 4,15,24 out.json)
Environment: THREADS (default 2), TOKENS (training tokens, default 32768; 4,096 held-out tokens).

Per layer (everyday text, each row's first token left out; errors relative, ||t - o||^2 / ||t||^2,
on the training tokens and on held-out tokens of other documents):
  * recipe: the default recipe's per-layer steps (256 shared neurons, cluster split, 4 experts,
    PAR router, least-squares refit of the down projections, 2 refine rounds) at K=2 and K=3, and at
    K=2 with the refit's ridge 1e-3 (default) / 1e-1 / 3e-1 and with the gated output rule;
  * gate/up: after the K=2 recipe, 60 Adam steps on gate/up (and down) at lr 1e-4 / 1e-3 / 3e-3,
    then one more down refit;
  * coverage: the energy each token's best 2 of 4 experts miss (oracle by energy, no refit), with the
    cluster split and with the coverage split (cluster, then factorize.coverage_refine);
  * sets: C = 6 / 16 freely chosen (overlapping) sets of 640 routed neurons + the 256 shared, one per
    token cluster (alternating: token -> the set holding most of its energy; set -> its cluster's
    640 strongest neurons), one set per token (the same active count as K=2 of 4); per-set
    least-squares refit (ridge 1e-1 / 1) and a linear router trained on the assignment.
"""
import copy
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from factorlab.factorize import (_complement, _shared_neurons, balanced_kmeans, calibration_inputs, coverage_refine,
                                 lost_energy)
from factorlab.models import load_model
from factorlab.moe import FactorizedMLP
from factorlab.par import TrainConfig, joint_labels, layer_labels, refit_down, train_router, tune_gate_up
from factorlab.workflows import DataSpec, load_data

from experiments.split.overlap_sets import make_sets

CHUNK = 4096


def rel(t: torch.Tensor, o: torch.Tensor) -> float:
    return round(((t - o).pow(2).sum() / t.pow(2).sum()).item(), 4)


def no_check() -> None:
    return None


def load_inputs(layers: list[int], train_tokens: int = 32768) -> tuple:
    """The embedded model and its FFN inputs at `layers` on `everyday` text (each row's first token
    left out): (loaded, {layer: training inputs}, {layer: 4,096 held-out inputs of other documents})."""
    loaded = load_model("default")
    train, held = load_data(loaded, DataSpec(source="everyday", train_tokens=train_tokens, heldout_tokens=4096))
    return (loaded, calibration_inputs(loaded.model, train, layers, skip_first=True),
            calibration_inputs(loaded.model, held, layers, skip_first=True))


def split_layer(m, x: torch.Tensor, hx: torch.Tensor) -> SimpleNamespace:
    """One dense FFN on training inputs x and held-out inputs hx: activations h / hh, down rows w,
    outputs t / ht, the recipe's 256 shared neurons, the other neurons (rest), their cluster split
    into 4 (assign) and the permutation shared + experts (perm)."""
    with torch.no_grad():
        h, hh = (m.act_fn(m.gate_proj(v)) * m.up_proj(v) for v in (x, hx))
        w = m.down_proj.weight.t()
        shared = _shared_neurons(h.abs(), 256)
        rest = _complement(shared, h.shape[1])
        assign = balanced_kmeans(h.abs()[:, rest].t(), 4, 0)
        perm = torch.cat([shared] + [rest[assign == c] for c in range(4)])
    return SimpleNamespace(h=h, hh=hh, w=w, t=h @ w, ht=hh @ w, shared=shared, rest=rest, assign=assign, perm=perm)


def recipe(m, perm, x, t, k: int, ridge: float = 1e-3, output_mode: str = "scaled") -> FactorizedMLP:
    """The default recipe's steps for one layer, on fixed inputs x and teacher outputs t."""
    cfg = TrainConfig(ridge=ridge, top_k=k, refine_rounds=2)  # the top-K recipe of rounds 1-4
    mlp = FactorizedMLP(m, perm, 4, k, shared_size=256, output_mode=output_mode)
    for p in mlp.parameters():
        p.requires_grad_(False)
    train_router(mlp, x, layer_labels(mlp, x, t, k, CHUNK), cfg, no_check, None)
    refit_down(mlp, x, t, ridge, CHUNK)
    for _ in range(cfg.refine_rounds):
        train_router(mlp, x, joint_labels(mlp, x, t, k, CHUNK), cfg, no_check, None)
        refit_down(mlp, x, t, ridge, CHUNK)
    return mlp


def errors(mlp, x, t, hx, ht) -> dict:
    with torch.no_grad():
        return {"train": rel(t, mlp(x)), "held": rel(ht, mlp(hx))}


def lstsq(a: torch.Tensor, t: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    g, c = (a.t() @ a).double(), (a.t() @ t).double()
    lam = ridge * g.diagonal().mean().clamp_min(1e-12)
    g.diagonal().add_(lam)
    return torch.linalg.solve(g, c + lam * w0.double()).float()


def free_sets(h, hh, w, t, ht, x, hx, shared, rest, num_sets: int) -> dict:
    """num_sets overlapping sets of 640 routed neurons, one per token cluster; see the module docstring."""
    members = make_sets(h, w.pow(2).sum(1), rest, num_sets)  # (C, 640) neuron ids
    sets = torch.stack([torch.isin(rest, m) for m in members]).float()  # (C, R) masks over rest
    e = h[:, rest].pow(2) * w[rest].pow(2).sum(1)
    lab = (e @ sets.t()).argmax(1)  # each token's set: the one holding most of its energy
    he = hh[:, rest].pow(2) * w[rest].pow(2).sum(1)
    hlab = (he @ sets.t()).argmax(1)
    torch.manual_seed(0)
    router = torch.nn.Linear(x.shape[1], num_sets)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(600):
        b = torch.randint(0, len(x), (1024,))
        loss = F.cross_entropy(router(x[b]), lab[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        routed = router(hx).argmax(1)
    out = {"router_agrees_with_oracle": round((routed == hlab).float().mean().item(), 3)}
    with torch.no_grad():
        for ridge in (1e-1, 1.0):
            fits = []
            for c in range(num_sets):
                cols = torch.cat([shared, rest[sets[c].bool()]])
                tok = lab == c
                fits.append((cols, lstsq(h[tok][:, cols], t[tok], w[cols], ridge) if tok.any() else w[cols]))

            def apply(hv, labels):
                o = torch.zeros(len(hv), w.shape[1])
                for c, (cols, wc) in enumerate(fits):
                    s = labels == c
                    if s.any():
                        o[s] = hv[s][:, cols] @ wc
                return o
            out[f"ridge_{ridge}"] = {"train_oracle": rel(t, apply(h, lab)), "held_oracle": rel(ht, apply(hh, hlab)),
                                     "held_router": rel(ht, apply(hh, routed))}
    return out


def main() -> None:
    layers, out_path = [int(i) for i in sys.argv[1].split(",")], sys.argv[2]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    start = time.time()
    loaded, din, dheld = load_inputs(layers, int(os.environ.get("TOKENS", "32768")))
    result = {"layers": {}}
    for i in layers:
        m = loaded.model.model.layers[i].mlp
        x, hx = din[i], dheld[i]
        s = split_layer(m, x, hx)
        h, hh, w, t, ht, shared, rest, assign, perm = s.h, s.hh, s.w, s.t, s.ht, s.shared, s.rest, s.assign, s.perm
        row = {}
        base = recipe(m, perm, x, t, 2)
        row["recipe_k2"] = errors(base, x, t, hx, ht)
        row["recipe_k3"] = errors(recipe(m, perm, x, t, 3), x, t, hx, ht)
        for ridge in (1e-1, 3e-1):
            row[f"recipe_k2_ridge_{ridge}"] = errors(recipe(m, perm, x, t, 2, ridge), x, t, hx, ht)
        row["recipe_k2_gated"] = errors(recipe(m, perm, x, t, 2, output_mode="gated"), x, t, hx, ht)
        for lr in (1e-4, 1e-3, 3e-3):
            tuned = copy.deepcopy(base)
            tune_gate_up(tuned, x, t, TrainConfig(gate_up_steps=60, gate_up_lr=lr), no_check, None)
            refit_down(tuned, x, t, 1e-3, CHUNK)
            row[f"gate_up_60_lr_{lr}"] = errors(tuned, x, t, hx, ht)
        with torch.no_grad():
            wn2 = w.pow(2).sum(1)
            e, he = h[:, rest].pow(2) * wn2[rest], hh[:, rest].pow(2) * wn2[rest]
            cover = coverage_refine(e, assign, 4, 2)
            row["energy_missed_by_best_2_of_4"] = {
                name: {"train": round(lost_energy(e, a, 4, 2).item(), 4),
                       "held": round(lost_energy(he, a, 4, 2).item(), 4)}
                for name, a in (("cluster", assign), ("coverage", cover))}
            cperm = torch.cat([shared] + [rest[cover == c] for c in range(4)])
        row["recipe_k2_coverage_split"] = errors(recipe(m, cperm, x, t, 2), x, t, hx, ht)
        for num_sets in (6, 16):
            row[f"free_sets_{num_sets}"] = free_sets(h, hh, w, t, ht, x, hx, shared, rest, num_sets)
        result["layers"][str(i)] = row
        print(i, json.dumps(row), flush=True)
    result["seconds"] = round(time.time() - start, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
