"""Per-token K at the same mean: each token runs the experts its router scores above a threshold.

Per round: every token's best set of experts (all sets scored exactly; one Lagrange multiplier on the
set size keeps the mean at K) -> the router trained on those sets (BCE) -> one sigmoid-score
threshold per nominal K, tuned so K experts run per token on average -> the down projections refitted
under the new routing.

T=tokens H=hidden N=experts S=sets of experts
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch

from .. import parallel
from ..moe import FactorizedMLP
from ..recipe import Recipe
from .labels import routed_target, router_bce_loss
from .refit import refit_down
from .router import train_router


def subset_masks(num_experts: int, empty: bool = False) -> torch.Tensor:
    """Every non-empty set of experts (and the empty one first if asked) as a 0/1 row: (S, N), smallest first."""
    sets = [c for k in range(0 if empty else 1, num_experts + 1) for c in itertools.combinations(range(num_experts), k)]
    masks = torch.zeros(len(sets), num_experts)
    for row, c in enumerate(sets):
        masks[row, list(c)] = 1.0
    return masks


def min_experts(mlp: FactorizedMLP) -> int:
    """Experts a token runs at least: 0 where shared neurons remain (measured better there), else 1
    (a token would skip the FFN)."""
    return 0 if mlp.shared_size else 1


def set_errors(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, chunk: int,
               least: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's squared output error under every set of experts (with the current weights and the scaled
    rule's N/K, K = the layer's K), computed exactly: err (T, S) in float64, and the sets' masks (S, N).
    least 0 includes the empty set (the shared block alone)."""
    masks = subset_masks(mlp.num_experts, empty=least == 0).to(inputs.device)  # (S, N)
    weight = mlp.num_experts / mlp.top_k if mlp.output_mode == "scaled" else 1.0 / mlp.top_k
    errs = []
    with torch.no_grad():
        for x, t in zip(inputs.split(chunk), target.split(chunk)):
            o, r = routed_target(mlp, x, t)
            o, r = o.float() * weight, r.float()  # (c, N, H), (c, H)
            b = torch.einsum("th,tnh->tn", r, o)
            g = torch.einsum("tnh,tmh->tnm", o, o)
            errs.append(r.pow(2).sum(1, keepdim=True) - 2 * b @ masks.t()
                        + torch.einsum("sn,tnm,sm->ts", masks, g, masks))
    return torch.cat(errs).double(), masks  # float64: so that a multiplier resolves every decision


def best_sets(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, mean_k: float, chunk: int,
              least: int = 1) -> torch.Tensor:
    """Per-token sets of experts with mean size mean_k that minimise the total error: (T, N) 0/1.
    least 0 lets a token's set be empty (the shared block alone).

    Each token's error for every set of experts is computed exactly (set_errors); a Lagrange multiplier on
    the set size, found by bisection, picks each token's set (argmin error + lam * size) so that the mean
    size is mean_k.
    """
    err, masks = set_errors(mlp, inputs, target, chunk, least)  # (T, S), (S, N)
    size = masks.sum(1).double()
    lam = size_multiplier(err, size, mean_k)
    choice = (err + lam * size).argmin(1)
    return masks[choice].to(inputs.dtype)


def size_multiplier(err: torch.Tensor, size: torch.Tensor, mean_k: float) -> float:
    """The multiplier lam on the set size at which argmin(err + lam * size) has mean size mean_k over every
    process's tokens (bisection), moved midway across the interval in which no token changes its set."""
    lo, hi = 0.0, parallel.all_max(float(err.max().clamp_min(0))) + 1.0
    for _ in range(60):  # data-parallel: the mean set size over every process's tokens
        lam = (lo + hi) / 2
        if parallel.mean(size[(err + lam * size).argmin(1)]) > mean_k:
            lo = lam
        else:
            hi = lam
    return _midway(err, size, hi)


def _midway(err: torch.Tensor, size: torch.Tensor, lam: float) -> float:
    """The multiplier midway across the interval around lam in which no token changes its set.

    Bisection leaves lam on the edge of that interval, where one token is indifferent between two sets and the
    last bit of its errors (another kernel, thread count or process count) decides; midway, every token's
    choice is the same as at lam and has a margin. err (T, S), size (S,), both float64.
    """
    choice = (err + lam * size).argmin(1)
    d_err = err - err.gather(1, choice[:, None])  # (T, S): a set beats the choice where d_err + lam * d_size < 0
    d_size = size[None, :] - size[choice][:, None]
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    above = torch.where(d_size < 0, d_err / -d_size.clamp(max=-1), inf).min()  # a smaller set would win above
    below = torch.where(d_size > 0, -d_err / d_size.clamp(min=1), -inf).max()  # a larger set would win below
    upper = max(-parallel.all_max(-float(above)), lam)  # over every process's tokens; max/min: the edge token's
    lower = min(parallel.all_max(float(below)), lam)  # own breakpoint may round to either side of lam
    if lower == float("-inf") or upper == float("inf"):
        return lam  # an open-ended interval (every token at its smallest or largest set): lam has a margin
    return (lower + upper) / 2


WINDOW = 5e-4  # how far (a share of the tokens) a per-token-K threshold may move to sit in a wide gap


def tune_thresholds(scores: torch.Tensor, least: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per nominal K = 1..N, the sigmoid-score threshold at which K experts run per token on average
    (the best always runs when least is 1), and the mean it gives on these scores: (N,), (N,)."""
    n = scores.shape[1]
    sorted_scores = scores.sort(dim=1, descending=True).values
    rest = sorted_scores[:, least:]  # the scores a threshold decides on
    thresholds, means = torch.zeros(n), torch.zeros(n)
    for k in range(1, n + 1):
        if k == n:
            tau = 0.0  # every expert
        elif k == least:
            tau = float(rest.max()) + 1e-6  # the best one only
        else:  # midway across the widest gap between neighbouring scores within WINDOW of the (k - least) * T-th
            # largest: no token sits near the threshold, where one rounding step (another kernel, thread count or
            # process count) would decide whether it runs; the mean moves by at most WINDOW of K
            count = (k - least) * scores.shape[0]
            reach = max(1, int(count * WINDOW))
            top = rest.flatten().topk(min(count + reach + 1, rest.numel())).values.double()
            gaps = top[:-1] - top[1:]  # gaps[j]: between the (j+1)-th and (j+2)-th largest
            lo = max(count - reach - 1, 0)
            j = lo + int(gaps[lo:].argmax())
            tau = float((top[j] + top[j + 1]) / 2)
        thresholds[k - 1] = tau
        means[k - 1] = least + (rest >= tau).float().sum(1).mean()
    return thresholds, means


def per_token_rounds(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, recipe: Recipe,
                     check: Callable[[], None], deadline: float | None, chunk: int) -> dict:
    """Switch a layer to per-token K at the same mean and fit it in recipe.per_token_rounds rounds."""
    stats: dict = {}
    least = min_experts(mlp)
    for _ in range(recipe.per_token_rounds):
        check()
        labels = best_sets(mlp, inputs, target, mlp.top_k, chunk, least)
        stats = train_router(mlp, inputs, labels, recipe, steps=recipe.per_token_router_steps,
                             loss_fn=router_bce_loss, check=check, deadline=deadline)
        with torch.no_grad():
            scores = torch.cat([mlp.router.linear(x).float().sigmoid() for x in inputs.split(chunk)])
        scores = parallel.gather_rows(scores)  # data-parallel: thresholds tuned on every process's tokens
        mlp.set_thresholds(*tune_thresholds(scores, least), min_experts=least)
        refit_down(mlp, inputs, target, recipe.ridge, chunk)
    return stats
