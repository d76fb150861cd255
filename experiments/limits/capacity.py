"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Where the error of a factorized FFN comes from: expert granularity, routing, router capacity.

Usage: PYTHONPATH=. python experiments/limits/capacity.py RUN LAYERS OUT.json   (e.g. r-ftd 4,15,24 out.json)

On FFN inputs of the dense model (everyday text: 16,384 training and 4,096 held-out tokens, each
row's first token left out), per layer, all errors relative (||t - o||^2 / ||t||^2, held-out):
  * neuron: keep each token's top-m neurons by |activation| * ||down row|| (m = 384, 640, 896, 1152 of
    1536): how sparse the FFN is per token when any neurons may be chosen;
  * granularity: the run's 256 shared neurons + the other 1280 split by the cluster split into N experts
    (N = 4 .. 64, K = N/2: always 896 active neurons), the best K experts per token (oracle, greedy by
    captured energy, plain sum) and a linear router trained to pick them (600 Adam steps);
  * router: the saved RUN's refitted experts (K=2): its own router, the oracle pair, the best single
    fixed pair, and pair classifiers (linear / one hidden layer of 64 or 256) trained on the 6 pairs'
    errors (expected error under the softmax + 0.1 cross-entropy, 1,500 Adam steps).
Environment: THREADS (default 2).
"""
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from factorlab.factorize import _complement, _shared_neurons, balanced_kmeans, calibration_inputs
from factorlab.models import load_model
from factorlab.moe import factorized_layers
from factorlab.runs import load_moe, load_run
from factorlab.workflows import DataSpec, load_data


def rel(t: torch.Tensor, o: torch.Tensor) -> float:
    return round(((t - o).pow(2).sum() / t.pow(2).sum()).item(), 4)


def pick(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(scores.shape).scatter_(1, scores.topk(k, dim=1).indices, 1.0)


def granularity(m, x, hx, shared_size: int = 256) -> list[dict]:
    with torch.no_grad():
        h, hh = (m.act_fn(m.gate_proj(v)) * m.up_proj(v) for v in (x, hx))
        w = m.down_proj.weight.t()  # (I, H)
        ht = hh @ w
        neuron = {}
        score = hh.abs() * w.norm(dim=1)
        for keep in (384, 640, 896, 1152):
            neuron[keep] = rel(ht, (hh * pick(score, keep)) @ w)
        shared = _shared_neurons(h.abs(), shared_size)
        rest = _complement(shared, h.shape[1])
    rows = [{"neuron_level_topm": neuron}]
    for n in (4, 8, 16, 32, 64):
        k = n // 2
        with torch.no_grad():
            assign = balanced_kmeans(h.abs()[:, rest].t(), n, 0)
            groups = [rest[assign == c] for c in range(n)]
            sh, hsh = h[:, shared] @ w[shared], hh[:, shared] @ w[shared]
            heo = torch.stack([hh[:, g] @ w[g] for g in groups], 1)  # (T, N, H)
            energy = torch.stack([(h[:, g].pow(2) * w[g].pow(2).sum(1)).sum(1) for g in groups], 1)
            henergy = torch.stack([(hh[:, g].pow(2) * w[g].pow(2).sum(1)).sum(1) for g in groups], 1)
            oracle = rel(ht, hsh + torch.einsum("tn,tnh->th", pick(henergy, k), heo))
        torch.manual_seed(0)
        router = torch.nn.Linear(x.shape[1], n)
        opt = torch.optim.Adam(router.parameters(), lr=1e-2)
        target = pick(energy, k) / k
        for _ in range(600):
            b = torch.randint(0, len(x), (1024,))
            loss = -(target[b] * router(x[b]).log_softmax(-1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            routed = rel(ht, hsh + torch.einsum("tn,tnh->th", pick(router(hx), k), heo))
        rows.append({"num_experts": n, "top_k": k, "oracle": oracle, "linear_router": routed})
    return rows


def router_capacity(mlp, dense_mlp, x, hx) -> dict:
    combos = list(itertools.combinations(range(mlp.num_experts), 2))

    def pair_errors(v):
        with torch.no_grad():
            t, sh, eo = dense_mlp(v), mlp.shared_output(v), mlp.expert_outputs(v) * mlp.num_experts / 2
            return torch.stack([(t - sh - eo[:, a] - eo[:, b]).pow(2).sum(-1) for a, b in combos], 1), t.pow(2).sum()

    e_tr, _ = pair_errors(x)
    e_he, total = pair_errors(hx)
    with torch.no_grad():
        chosen = mlp.router(hx)[3].sort(1).values
    own = torch.tensor([combos.index(tuple(r)) for r in chosen.tolist()])
    out = {"oracle_pair": round((e_he.min(1).values.sum() / total).item(), 4),
           "own_router": round((e_he.gather(1, own[:, None]).sum() / total).item(), 4),
           "best_fixed_pair": round((e_he.sum(0).min() / total).item(), 4)}
    for hidden in (0, 64, 256):
        torch.manual_seed(0)
        net = (torch.nn.Linear(x.shape[1], 6) if hidden == 0 else
               torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 6)))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3 if hidden else 1e-2)
        best, scale = e_tr.argmin(1), e_tr.mean()
        for _ in range(1500):
            b = torch.randint(0, len(x), (1024,))
            logits = net(x[b])
            loss = (logits.softmax(-1) * e_tr[b] / scale).sum(-1).mean() + 0.1 * F.cross_entropy(logits, best[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = net(hx).argmax(1)
        out[f"pair_classifier_hidden_{hidden}"] = round((e_he.gather(1, p[:, None]).sum() / total).item(), 4)
    return out


def main() -> None:
    run_name, layers, out_path = sys.argv[1], [int(i) for i in sys.argv[2].split(",")], sys.argv[3]
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    start = time.time()
    loaded = load_model(load_run(run_name).config["model"])
    moe = load_moe(run_name, loaded.model)
    train, held = load_data(loaded, DataSpec(source="everyday", train_tokens=16384, heldout_tokens=4096))
    dense_in = calibration_inputs(loaded.model, train, layers, skip_first=True)
    dense_held = calibration_inputs(loaded.model, held, layers, skip_first=True)
    moe_in = calibration_inputs(moe, train, layers, skip_first=True)  # the run's own inputs for its router
    moe_held = calibration_inputs(moe, held, layers, skip_first=True)
    result = {"run": run_name, "layers": {}}
    for i in layers:
        dense_mlp = loaded.model.model.layers[i].mlp
        result["layers"][str(i)] = {
            "granularity": granularity(dense_mlp, dense_in[i], dense_held[i]),
            "router": router_capacity(factorized_layers(moe)[i], dense_mlp, moe_in[i], moe_held[i])}
        print(i, json.dumps(result["layers"][str(i)]), flush=True)
    result["seconds"] = round(time.time() - start, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
