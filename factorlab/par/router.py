"""Training one layer's router on its labels: Adam, warm-up + cosine schedule, the PAR and balance losses.

Data-parallel: every process draws the same batch of global token indices; each computes the loss on the
ones it holds, weighted by their share of the batch, and the gradients are summed, so each step is the
one-process step (up to float rounding) whatever the shards' sizes."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .. import parallel
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
    k = mlp.top_k
    offset, n = parallel.offset_and_total(inputs.shape[0])  # this process's tokens among all processes'
    warmup = max(1, int(WARMUP_FRAC * steps))
    last = {"route": float("nan"), "balance": float("nan")}
    try:
        for step in range(steps):
            check()
            if deadline is not None and parallel.any_true(time.monotonic() > deadline):
                break
            batch = torch.randint(0, n, (min(recipe.router_batch, n),), generator=gen)  # global token indices
            idx = parallel.local_part(batch, offset, inputs.shape[0])
            share = idx.numel() / batch.numel()  # 1 in one process
            opt.zero_grad(set_to_none=True)
            if idx.numel():
                logits = router(inputs[idx])  # (b, N)
                route = loss_fn(logits, label_mask[idx])
                bal = balance_loss(logits, k)
                loss = recipe.route_weight * route + recipe.balance_weight * bal
                (loss * share).backward()  # share = 1 in one process: the plain loss
                last = {"route": route.item() * share, "balance": bal.item() * share}
            else:
                last = {"route": 0.0, "balance": 0.0}
            parallel.all_sum_grads_(list(router.parameters()))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, recipe.router_lr, warmup)
            torch.nn.utils.clip_grad_norm_(router.parameters(), GRAD_CLIP)
            opt.step()
    finally:
        router.weight.requires_grad_(False)
    last = {name: parallel.total(value) for name, value in last.items()}  # the batch's losses, all processes
    with torch.no_grad():
        acc = parallel.token_mean(label_accuracy(router(inputs), label_mask, k), inputs.shape[0])
    return {**last, "label_accuracy": acc}
