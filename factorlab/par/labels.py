"""PAR pseudo-labels and the router's losses: which experts should a token go to, and how wrong the router is.

T=tokens H=hidden N=experts K=top_k
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..moe import FactorizedMLP


def pseudo_labels(expert_outputs: torch.Tensor, teacher: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert MSE to teacher/(N/K) and the 0/1 mask of the K lowest (FactorLLM's PAR labels).

    expert_outputs (T, N, H), teacher (T, H) -> mse (T, N), label_mask (T, N)
    """
    num_experts = expert_outputs.shape[1]
    target = teacher / (num_experts / top_k)  # each of K scaled experts should carry 1/(N/K) of it
    mse = (expert_outputs - target.unsqueeze(1)).pow(2).mean(dim=-1)  # (T, N)
    label_index = mse.topk(top_k, dim=-1, largest=False).indices  # (T, K)
    label_mask = torch.zeros_like(mse).scatter_(1, label_index, 1.0)
    return mse, label_mask


def combination_labels(expert_outputs: torch.Tensor, target: torch.Tensor, weight: float, top_k: int,
                       max_combinations: int = 256) -> torch.Tensor:
    """0/1 mask of the K experts whose weighted sum is closest to target (joint, not per expert): oracle routing.

    expert_outputs (T, N, H), target (T, H) -> (T, N). Exact over all C(N, K) combinations when there
    are at most max_combinations of them, else greedy (add the expert that lowers the error most).
    ||t - w sum_c o_c||^2 = ||t||^2 - 2w sum_c <t, o_c> + w^2 sum_{c, c'} <o_c, o_c'>.
    """
    tokens, num_experts, _ = expert_outputs.shape
    o = expert_outputs.float() * weight
    b = torch.einsum("th,tnh->tn", target.float(), o)  # (T, N)
    gram = torch.einsum("tnh,tmh->tnm", o, o)  # (T, N, N)
    if math.comb(num_experts, top_k) <= max_combinations:
        combos = torch.tensor(list(itertools.combinations(range(num_experts), top_k)), device=b.device)  # (C, K)
        err = -2 * b[:, combos].sum(-1)  # (T, C)
        for i in range(top_k):
            for j in range(top_k):
                err += gram[:, combos[:, i], combos[:, j]]
        mask = torch.zeros(tokens, num_experts, dtype=expert_outputs.dtype, device=b.device)
        return mask.scatter_(1, combos[err.argmin(dim=1)], 1.0)
    chosen = torch.zeros(tokens, num_experts, dtype=torch.float32, device=b.device)
    diag = gram.diagonal(dim1=1, dim2=2)
    for _ in range(top_k):  # marginal error of adding n: -2 b_n + G_nn + 2 sum_chosen G_cn
        gain = -2 * b + diag + 2 * torch.einsum("tc,tcn->tn", chosen, gram)
        gain = gain.masked_fill(chosen.bool(), float("inf"))
        chosen.scatter_(1, gain.argmin(dim=1, keepdim=True), 1.0)
    return chosen.to(expert_outputs.dtype)


def routed_target(mlp: FactorizedMLP, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's output (T, N, H) on x, and what the experts should add to the shared block (T, H)."""
    outputs = mlp.expert_outputs(x)
    if mlp.shared_size:
        target = target - mlp.shared_output(x)
    return outputs, target


def layer_labels(mlp: FactorizedMLP, inputs: torch.Tensor, teacher: torch.Tensor, top_k: int,
                 chunk: int) -> torch.Tensor:
    """PAR label masks for every token of a layer, computed in chunks: (T, N)."""
    masks = []
    with torch.no_grad():
        for x, t in zip(inputs.split(chunk), teacher.split(chunk)):
            masks.append(pseudo_labels(*routed_target(mlp, x, t), top_k)[1])
    return torch.cat(masks)


def router_kl_loss(router_logits: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(label_mask) || softmax(router_logits)), averaged over tokens (FactorLLM's router loss)."""
    log_probs = F.log_softmax(router_logits.float(), dim=-1)
    return F.kl_div(log_probs, F.softmax(label_mask.float(), dim=-1), reduction="batchmean")


def router_bce_loss(router_logits: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE: each expert's logit predicts whether it is among the labels (per-token K's sets)."""
    return F.binary_cross_entropy_with_logits(router_logits.float(), label_mask.float())


def balance_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """mean(topk_mask(softmax g) * softmax g): penalises confident, concentrated routing."""
    probs = router_logits.float().softmax(dim=-1)  # (T, N)
    mask = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return (mask * probs).mean()


def label_accuracy(router_logits: torch.Tensor, label_mask: torch.Tensor, top_k: int) -> float:
    """Share of the router's top-K choices that are among the K pseudo-labels."""
    chosen = router_logits.topk(top_k, dim=-1).indices
    return label_mask.gather(1, chosen).mean().item()
