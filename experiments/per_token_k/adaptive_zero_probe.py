"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Per-token K with "no routed expert" allowed (the shared block only), at mean K 1 and 2, single layers.

Usage: PYTHONPATH=. python experiments/per_token_k/adaptive_zero_probe.py LAYERS [THREADS]   (e.g. 4,24 1)
Prints one JSON line per layer (held-out relative error ||t - o||^2 / ||t||^2 on 4,096 tokens of
other documents, the dense model's FFN inputs, 32,768 `everyday` training tokens):
  recipe_kK: the default recipe's per-layer steps at top-K (experiments/tools/layer_probe.recipe);
  adaptive_kK_min1 / adaptive_kK_zero: after that, 3 rounds of (each token's best set of experts at
  mean size K by a Lagrange multiplier -> router trained on the sets (BCE) -> a threshold of its
  sigmoid scores for mean K on the training tokens -> least-squares down refit), with every token
  running at least its best expert (min1) or possibly none (zero). A standalone copy of
  par.adaptive_rounds, written before the library's adaptive_min_experts option.
Result (layer 4; layer 24 was stopped to free the machine): experiments/per_token_k/results/adaptive_zero_probe.jsonl.
"""
import itertools, json, sys, torch
from factorlab.par import TrainConfig, train_router
from experiments.tools.layer_probe import load_inputs, recipe, rel, split_layer
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
CH = 4096

def masks_for(n, zero):
    sets = ([()] if zero else []) + [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]
    m = torch.zeros(len(sets), n)
    for r, c in enumerate(sets): m[r, list(c)] = 1.0
    return m

def labels(mlp, x, t, mean_k, zero, scale):
    masks = masks_for(4, zero); errs = []
    with torch.no_grad():
        for xc, tc in zip(x.split(CH), t.split(CH)):
            o = mlp.expert_outputs(xc) * scale; r = tc - mlp.shared_output(xc)
            b = torch.einsum("th,tnh->tn", r, o); g = torch.einsum("tnh,tmh->tnm", o, o)
            errs.append(r.pow(2).sum(1, keepdim=True) - 2 * b @ masks.t()
                        + torch.einsum("sn,tnm,sm->ts", masks, g, masks))
    err = torch.cat(errs); size = masks.sum(1); lo, hi = 0.0, float(err.max()) + 1
    for _ in range(60):
        lam = (lo + hi) / 2
        if size[(err + lam * size).argmin(1)].mean() > mean_k: lo = lam
        else: hi = lam
    return masks[(err + hi * size).argmin(1)]

def select(scores, tau, zero):
    sel = (scores >= tau).float()
    if not zero: sel.scatter_(1, scores.argmax(1, keepdim=True), 1.0)
    return sel

def tune(scores, k, zero):
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if select(scores, mid, zero).sum(1).mean() > k: lo = mid
        else: hi = mid
    return hi

def refit(mlp, x, t, sel, scale, ridge=1e-3):
    n, d, s = 4, mlp.expert_size, mlp.shared_size; cols = s + n * d
    G = torch.zeros(cols, cols, dtype=torch.float64); C = torch.zeros(cols, t.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for xc, tc, sc in zip(x.split(CH), t.split(CH), sel.split(CH)):
            a = mlp.expert_activations(xc) * (sc * scale).unsqueeze(-1); h = xc @ mlp.shared_gate_up.t()
            a = torch.cat([mlp.act_fn(h[:, :s]) * h[:, s:], a.reshape(len(xc), -1)], 1)
            G += (a.t() @ a).double(); C += (a.t() @ tc).double()
        w0 = torch.cat([mlp.shared_down.reshape(-1, 576), mlp.down.reshape(-1, 576)]).double()
        lam = ridge * G.diagonal().mean(); G.diagonal().add_(lam); sol = torch.linalg.solve(G, C + lam * w0)
        mlp.shared_down.copy_(sol[:s].float()); mlp.down.copy_(sol[s:].reshape(n, d, -1).float())

def out(mlp, x, sel, scale):
    with torch.no_grad():
        return torch.cat([mlp.shared_output(xc) + torch.einsum("tn,tnh->th", sc * scale, mlp.expert_outputs(xc))
                          for xc, sc in zip(x.split(CH), sel.split(CH))])

layers = [int(i) for i in sys.argv[1].split(",")]
lm, din, dh = load_inputs(layers)
for i in layers:
    m = lm.model.model.layers[i].mlp; x, hx = din[i], dh[i]
    split = split_layer(m, x, hx)
    t, ht, perm = split.t, split.ht, split.perm
    row = {}
    for k in (1, 2):
        base = recipe(m, perm, x, t, k); row[f"recipe_k{k}"] = rel(ht, base(hx))
        for zero in (False, True):
            mlp = recipe(m, perm, x, t, k); scale = 4 / k; res = []
            for _ in range(3):
                lab = labels(mlp, x, t, k, zero, scale)
                train_router(mlp, x, lab, TrainConfig(label_loss="bce", top_k=k), lambda: None)
                with torch.no_grad(): s, hs = mlp.router.linear(x).sigmoid(), mlp.router.linear(hx).sigmoid()
                tau = tune(s, k, zero); sel, hsel = select(s, tau, zero), select(hs, tau, zero)
                refit(mlp, x, t, sel, scale)
                res.append({"held": rel(ht, out(mlp, hx, hsel, scale)), "mean_k": round(hsel.sum(1).mean().item(), 3),
                            "zero_share": round((hsel.sum(1) == 0).float().mean().item(), 3)})
            row[f"adaptive_k{k}_{'zero' if zero else 'min1'}"] = res
    print(json.dumps({"layer": i, **row}), flush=True)
