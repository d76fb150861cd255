"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Per-token K at the same mean compute, single layers (issue 7, fifth round).

Usage: PYTHONPATH=. python experiments/per_token_k/adaptive_probe.py LAYERS OUT.json   (e.g. 4,15,24 out.json)
Environment: THREADS (default 2), TOKENS (training tokens, default 32768; 4,096 held-out tokens).

After the default recipe's per-layer steps at K=2 (experiments/tools/layer_probe.recipe), relative errors
||t - o||^2 / ||t||^2 on held-out tokens when each token may use 1..4 experts with a mean of 2:
  * oracle_fixed2: each token's best pair of experts (joint, as the refine rounds' labels);
  * oracle_adaptive: each token's best set of k experts for every k, then k per token from a
    Lagrange multiplier tuned so the mean k is 2 (the best any per-token K can do with these weights);
  * router_threshold: the trained router's probabilities, an expert runs when its probability is
    above a threshold chosen on the training tokens so that the mean k is 2 (the top-1 always runs);
    with the K=2 refit and after a refit under that selection;
  * trained_adaptive: what the library's `--adaptive-rounds` does (par.adaptive_rounds, written
    after this probe from it): 3 rounds of oracle sets -> router trained on them (BCE) ->
    thresholds of its sigmoid scores tuned to mean k = 2 on the training tokens -> refit.
Result: experiments/per_token_k/results/adaptive_probe.json (layers 4, 15, 24; 2 threads).
"""
import itertools
import json
import os
import sys
import time

import torch

from factorlab.par import TrainConfig, train_router

from experiments.tools.layer_probe import CHUNK, load_inputs, recipe, rel, split_layer

SCALE = 2.0  # N/K of the K=2 recipe: every selected expert counts 2, as in its refit


def subset_errors(mlp, x, t):
    """Error of every non-empty subset of experts per token: (T, 15) and the subsets' masks (15, 4)."""
    subsets = [c for k in range(1, 5) for c in itertools.combinations(range(4), k)]
    masks = torch.zeros(len(subsets), 4)
    for i, c in enumerate(subsets):
        masks[i, list(c)] = 1.0
    errs = []
    with torch.no_grad():
        for xc, tc in zip(x.split(CHUNK), t.split(CHUNK)):
            o = mlp.expert_outputs(xc) * SCALE  # (c, 4, H)
            r = tc - mlp.shared_output(xc)
            b = torch.einsum("th,tnh->tn", r, o)
            g = torch.einsum("tnh,tmh->tnm", o, o)
            e = r.pow(2).sum(1, keepdim=True) - 2 * b @ masks.t() + torch.einsum("sn,tnm,sm->ts", masks, g, masks)
            errs.append(e)
    return torch.cat(errs), masks


def output_with(mlp, x, sel):
    """Shared output + SCALE x the selected experts (sel (T, 4) 0/1)."""
    with torch.no_grad():
        return torch.cat([mlp.shared_output(xc) + torch.einsum("tn,tnh->th", sc * SCALE, mlp.expert_outputs(xc))
                          for xc, sc in zip(x.split(CHUNK), sel.split(CHUNK))])


def lagrange_pick(errs, masks, mean_k=2.0):
    """Per token the subset minimising err + lam * k, lam tuned by bisection so that mean k ~ mean_k."""
    k = masks.sum(1)
    lo, hi = 0.0, errs.max().item() + 1.0
    for _ in range(50):
        lam = (lo + hi) / 2
        pick = (errs + lam * k).argmin(1)
        if k[pick].mean() > mean_k:
            lo = lam
        else:
            hi = lam
    pick = (errs + hi * k).argmin(1)
    return masks[pick], hi


def threshold_select(probs, tau):
    sel = (probs >= tau).float()
    sel.scatter_(1, probs.argmax(1, keepdim=True), 1.0)
    return sel


def tune_tau(probs, mean_k=2.0):
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if threshold_select(probs, mid).sum(1).mean() > mean_k:
            lo = mid
        else:
            hi = mid
    return hi


def refit_with(mlp, x, t, sel, ridge=1e-3):
    """The recipe's least-squares down refit, under a given per-token selection."""
    n, d, s = mlp.num_experts, mlp.expert_size, mlp.shared_size
    cols = s + n * d
    gram = torch.zeros(cols, cols, dtype=torch.float64)
    cross = torch.zeros(cols, t.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for xc, tc, sc in zip(x.split(CHUNK), t.split(CHUNK), sel.split(CHUNK)):
            acts = mlp.expert_activations(xc) * (sc * SCALE).unsqueeze(-1)
            h = xc @ mlp.shared_gate_up.t()
            a = torch.cat([mlp.act_fn(h[:, :s]) * h[:, s:], acts.reshape(len(xc), -1)], 1)
            gram += (a.t() @ a).double()
            cross += (a.t() @ tc).double()
        w0 = torch.cat([mlp.shared_down.reshape(-1, mlp.hidden_size), mlp.down.reshape(-1, mlp.hidden_size)]).double()
        lam = ridge * gram.diagonal().mean()
        gram.diagonal().add_(lam)
        sol = torch.linalg.solve(gram, cross + lam * w0)
        mlp.shared_down.copy_(sol[:s].float())
        mlp.down.copy_(sol[s:].reshape(n, d, -1).float())


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
        t, ht = s.t, s.ht
        mlp = recipe(m, s.perm, x, t, 2)
        row = {"recipe_k2": rel(ht, mlp(hx))}
        herrs, masks = subset_errors(mlp, hx, ht)
        pair = masks.sum(1) == 2
        row["oracle_fixed2"] = rel(ht, output_with(mlp, hx, masks[pair][herrs[:, pair].argmin(1)]))
        osel, _ = lagrange_pick(herrs, masks)
        row["oracle_adaptive"] = rel(ht, output_with(mlp, hx, osel))
        row["oracle_adaptive_k_hist"] = torch.bincount(osel.sum(1).long(), minlength=5)[1:].tolist()
        with torch.no_grad():
            probs, hprobs = mlp.router(x)[1], mlp.router(hx)[1]
        tau = tune_tau(probs)
        hsel = threshold_select(hprobs, tau)
        row["router_threshold"] = {"tau": round(tau, 4), "held_mean_k": round(hsel.sum(1).mean().item(), 3),
                                   "k_hist": torch.bincount(hsel.sum(1).long(), minlength=5)[1:].tolist(),
                                   "k2_refit": rel(ht, output_with(mlp, hx, hsel))}
        refit_with(mlp, x, t, threshold_select(probs, tau))
        row["router_threshold"]["own_refit"] = rel(ht, output_with(mlp, hx, hsel))
        # oracle adaptive after the refit under the threshold selection (what a better K predictor could reach)
        herrs, masks = subset_errors(mlp, hx, ht)
        row["oracle_adaptive_after_refit"] = rel(ht, output_with(mlp, hx, lagrange_pick(herrs, masks)[0]))
        # a router trained on the oracle's variable-size label sets (BCE), thresholded at mean k = 2,
        # then refit under its selection; relabel / retrain / refit twice more (as the refine rounds)
        row["trained_adaptive"] = []
        for _ in range(3):
            errs, masks = subset_errors(mlp, x, t)
            labels, _ = lagrange_pick(errs, masks)
            train_router(mlp, x, labels, TrainConfig(label_loss="bce", top_k=2), lambda: None, None)
            with torch.no_grad():
                s, hs = mlp.router.linear(x).sigmoid(), mlp.router.linear(hx).sigmoid()
            tau = tune_tau(s)
            sel, hsel = threshold_select(s, tau), threshold_select(hs, tau)
            agree = (hsel == lagrange_pick(*subset_errors(mlp, hx, ht))[0]).all(1).float().mean().item()
            refit_with(mlp, x, t, sel)
            row["trained_adaptive"].append({"held": rel(ht, output_with(mlp, hx, hsel)),
                                            "train": rel(t, output_with(mlp, x, sel)),
                                            "held_mean_k": round(hsel.sum(1).mean().item(), 3),
                                            "k_hist": torch.bincount(hsel.sum(1).long(), minlength=5)[1:].tolist(),
                                            "set_agrees_with_oracle": round(agree, 3)})
        result["layers"][str(i)] = row
        print(i, json.dumps(row), flush=True)
    result["seconds"] = round(time.time() - start, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
