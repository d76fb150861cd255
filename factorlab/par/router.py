"""Training one layer's router on its labels: Adam, warm-up + cosine schedule, the PAR and balance losses."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..moe import FactorizedMLP
from ..recipe import Recipe
from .labels import balance_loss, label_accuracy

GRAD_CLIP = 1.0
WARMUP_FRAC = 0.05

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_router(mlp: FactorizedMLP, inputs: torch.Tensor, label_mask: torch.Tensor, recipe: Recipe, *,
                 steps: int, loss_fn: Loss, check: Callable[[], None], deadline: float | None = None) -> dict:
    """`steps` Adam steps on one layer's router to predict the labels. inputs (T, H), label_mask (T, N).

    Loss = route_weight * loss_fn(logits, labels) + balance_weight * balance_loss; returns the last
    losses and the label accuracy of the router's top-K on every token."""
    router = mlp.router.linear
    router.weight.requires_grad_(True)
    opt = torch.optim.Adam(router.parameters(), lr=recipe.router_lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    n, k = inputs.shape[0], mlp.top_k
    warmup = max(1, int(WARMUP_FRAC * steps))
    last = {"route": float("nan"), "balance": float("nan")}
    try:
        for step in range(steps):
            check()
            if deadline is not None and time.monotonic() > deadline:
                break
            idx = torch.randint(0, n, (min(recipe.router_batch, n),), generator=gen)
            logits = router(inputs[idx])  # (b, N)
            route = loss_fn(logits, label_mask[idx])
            bal = balance_loss(logits, k)
            loss = recipe.route_weight * route + recipe.balance_weight * bal
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, recipe.router_lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(router.parameters(), GRAD_CLIP)
            opt.step()
            last = {"route": route.item(), "balance": bal.item()}
    finally:
        router.weight.requires_grad_(False)
    with torch.no_grad():
        acc = label_accuracy(router(inputs), label_mask, k)
    return {**last, "label_accuracy": acc}
