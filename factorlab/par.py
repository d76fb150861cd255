"""PAR (Prior-Approximate Router) pseudo-labels and losses, and the trainer.

T=tokens H=hidden N=experts K=top_k D=expert width
Modes: `none` (untrained router, FactorLLM's Ex0), `router` (routers only, on FFN inputs cached from
one teacher pass), `experts` (layer by layer on the factorized model's own inputs: router, then a
closed-form least-squares refit of the experts' down projections to the teacher, `refine_rounds` of
relabel (the K experts whose joint output is closest) + router + refit, then `adaptive_rounds` that
switch the layer to per-token K at the same mean (each token's best set of experts -> router ->
score thresholds -> refit; the default), then optional gradient steps on gate/up), with optional
end-to-end logit distillation afterwards.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .moe import FactorizedMLP, other_rows, factorized_layers, set_top_k

log = logging.getLogger(__name__)

MODES = ("none", "router", "experts")
LABEL_LOSSES = ("kl", "bce")
TARGETS = ("teacher", "residual")
TOKEN_WEIGHTS = ("none", "residual")
ERROR_METRICS = ("plain", "output")
E2E_PARAMS = ("all", "down")


# ---------------------------------------------------------------- pure maths
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
    """0/1 mask of the K experts whose weighted sum is closest to target (joint, not per expert).

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


def router_kl_loss(router_logits: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(label_mask) || softmax(router_logits)), averaged over tokens (FactorLLM)."""
    log_probs = F.log_softmax(router_logits.float(), dim=-1)
    return F.kl_div(log_probs, F.softmax(label_mask.float(), dim=-1), reduction="batchmean")


def router_bce_loss(router_logits: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Multi-label BCE: each expert's logit predicts whether it is among the K labels."""
    return F.binary_cross_entropy_with_logits(router_logits.float(), label_mask.float())


ROUTER_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": router_kl_loss, "bce": router_bce_loss}


def balance_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """mean(topk_mask(softmax g) * softmax g): penalises confident, concentrated routing."""
    probs = router_logits.float().softmax(dim=-1)  # (T, N)
    mask = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return (mask * probs).mean()


def label_accuracy(router_logits: torch.Tensor, label_mask: torch.Tensor, top_k: int) -> float:
    """Share of the router's top-K choices that are among the K pseudo-labels."""
    chosen = router_logits.topk(top_k, dim=-1).indices
    return label_mask.gather(1, chosen).mean().item()


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """How to train a factorized model; validated on construction."""
    mode: str = "experts"
    top_k: int = 2
    router_steps: int = 600  # Adam steps per layer for the router
    router_lr: float = 1e-2
    router_batch: int = 1024  # tokens per router step
    route_weight: float = 0.05  # paper weights; only their ratio matters when the router trains alone
    balance_weight: float = 0.01
    label_loss: str = "kl"
    target: str = "teacher"  # experts mode: fit the original FFN on own inputs (measured better than "residual")
    ridge: float = 1e-3  # least-squares regulariser, relative to the mean diagonal of the Gram matrix
    # how each token's FFN-output error counts in the refits and per-token sets: "none" = squared error;
    # "residual" = squared error relative to the token's residual stream after the dense FFN (1/||h||^2,
    # mean 1), so tokens with huge residuals (attention sinks) do not dominate the fit (measured worse on
    # the benchmarks, issue 7 round 7)
    token_weight: str = "none"
    # which error picks the experts (PAR labels, joint labels, per-token sets): "plain" = squared error of
    # the FFN output; "output" = the error as the dense model's next-token distribution feels it,
    # e^T M e with M = E[g g^T], g the gradient of the log-probability of a token sampled from the dense
    # model's own prediction w.r.t. the layer's FFN output (its Fisher information), estimated on the
    # first metric_tokens training tokens. The refits stay plain least squares (with one metric per layer
    # their solution is the same, up to the ridge). Measured: held-out KL lower in two paired seeds, the
    # benchmarks lower in both (issue 7, round 14)
    error_metric: str = "plain"
    metric_tokens: int = 8192
    refit_down: bool = True
    refine_rounds: int = 0  # top-K: after the refit, relabel (best joint K experts), retrain router, refit again
    # (the top-K recipe used 2; with per-token K they add nothing measurable, issue 7 round 5)
    gate_up_steps: int = 0  # optional Adam steps on gate/up per layer after the refit
    gate_up_lr: float = 1e-4
    # experts mode: per-token K at the same mean, fitted in this many rounds; 0 = top-K. 5 rounds against 3:
    # held-out KL 4-5% lower in two paired seeds for ~2 more minutes (issue 7, round 6)
    adaptive_rounds: int = 5
    # Adam steps of the router in each per-token round (it starts from the previous round's router);
    # None = a third of router_steps (200 at the default 600). 200 against 600: the same held-out
    # metrics, benchmarks no worse in three paired seeds; with the block-wise refit 8.4 instead of
    # 12.1 training minutes (issue 7, round 7)
    adaptive_router_steps: int | None = None
    # per-token K: 0 lets a token run no routed expert (the shared block only), 1 runs at least its best one;
    # None: 0 in layers with shared neurons (measured better there), 1 without (a token would skip the FFN)
    adaptive_min_experts: int | None = None
    e2e_steps: int = 0  # optional end-to-end logit distillation steps after the layer-wise pass
    e2e_lr: float = 3e-4  # measured with e2e_params="down" (issue 7); use ~1e-4 with "all"
    e2e_batch: int = 2  # sequences per e2e step
    e2e_params: str = "down"  # down: down projections only (cheaper, as good); all: gate/up too
    e2e_minutes: float | None = None  # fit the e2e schedule into this many minutes (steps measured, capped by e2e_steps)
    minutes: float | None = None  # wall-clock budget from train()'s start: gradient phases stop, e2e fits into it
    grad_clip: float = 1.0
    warmup_frac: float = 0.05
    seed: int = 0
    chunk_tokens: int = 4096  # tokens processed at once when streaming layers

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.label_loss not in LABEL_LOSSES:
            raise ValueError(f"label_loss must be one of {', '.join(LABEL_LOSSES)}, got {self.label_loss!r}")
        if self.e2e_params not in E2E_PARAMS:
            raise ValueError(f"e2e_params must be one of {', '.join(E2E_PARAMS)}, got {self.e2e_params!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.error_metric not in ERROR_METRICS:
            raise ValueError(f"error_metric must be one of {', '.join(ERROR_METRICS)}, got {self.error_metric!r}")
        if self.metric_tokens < 1:
            raise ValueError(f"metric_tokens must be >= 1, got {self.metric_tokens}")
        if self.token_weight not in TOKEN_WEIGHTS:
            raise ValueError(f"token_weight must be one of {', '.join(TOKEN_WEIGHTS)}, got {self.token_weight!r}")
        if self.adaptive_router_steps is not None and self.adaptive_router_steps < 1:
            raise ValueError(f"adaptive_router_steps must be >= 1 (or None for a third of router_steps), "
                             f"got {self.adaptive_router_steps}")
        for name in ("router_steps", "gate_up_steps", "e2e_steps", "refine_rounds", "adaptive_rounds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0 (0 = plain least squares), got {self.ridge}")
        if self.gate_up_lr <= 0:
            raise ValueError(f"gate_up_lr must be positive, got {self.gate_up_lr}")
        if self.adaptive_min_experts not in (None, 0, 1):
            raise ValueError(f"adaptive_min_experts must be 0 or 1, got {self.adaptive_min_experts}")
        for name in ("minutes", "e2e_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or None for no time limit)")

    @property
    def round_router_steps(self) -> int:
        """Router steps in each per-token round: adaptive_router_steps, or a third of router_steps."""
        return self.adaptive_router_steps or max(1, self.router_steps // 3)


@dataclass
class TrainResult:
    seconds: float
    tokens: int
    router_label_accuracy: dict[int, float] = field(default_factory=dict)
    layer_mse: dict[int, float] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    stopped_early: bool = False

    def summary(self) -> dict:
        acc = list(self.router_label_accuracy.values())
        out = asdict(self)
        out.pop("log")
        out["mean_router_label_accuracy"] = sum(acc) / len(acc) if acc else None
        return out


class TrainingCancelled(Exception):
    """Raised when should_stop() asks the trainer to stop; the model is left unchanged or consistent."""


Progress = Callable[[dict], None]


# ---------------------------------------------------------------- layer streaming
class LayerStream:
    """Runs a decoder stack one layer at a time over fixed token rows (no padding, causal)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor):
        from transformers.masking_utils import create_causal_mask

        inner = model.model
        self.layers = inner.layers
        with torch.no_grad():
            self.hidden = inner.embed_tokens(input_ids)  # (B, L, H)
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            self.position_embeddings = inner.rotary_emb(self.hidden, position_ids=position_ids)
            self.mask = create_causal_mask(config=model.config, inputs_embeds=self.hidden[:1],
                                           attention_mask=None, past_key_values=None, position_ids=position_ids)
        self.position_ids = position_ids

    def attention(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Residual stream after layer i's attention block: (B, L, H)."""
        layer = self.layers[i]
        out = []
        for row in hidden.split(8):
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(row), attention_mask=self.mask,
                                   position_ids=self.position_ids, position_embeddings=self.position_embeddings)
            out.append(row + a)
        return torch.cat(out)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _apply_mlp(mlp: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    flat = _flat(x)
    return torch.cat([mlp(part) for part in flat.split(chunk)]).view(x.shape)


# ---------------------------------------------------------------- router training
def train_router(mlp: FactorizedMLP, inputs: torch.Tensor, label_mask: torch.Tensor, cfg: TrainConfig,
                 check: Callable[[], None], deadline: float | None = None) -> dict:
    """Adam on one layer's router to predict the pseudo-labels. inputs (T, H), label_mask (T, N)."""
    router = mlp.router.linear
    router.weight.requires_grad_(True)
    opt = torch.optim.Adam(router.parameters(), lr=cfg.router_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, k = inputs.shape[0], mlp.top_k
    loss_fn = ROUTER_LOSSES[cfg.label_loss]
    total = cfg.router_steps
    warmup = max(1, int(cfg.warmup_frac * total))
    last = {"route": float("nan"), "balance": float("nan")}
    try:
        for step in range(total):
            check()
            if deadline is not None and time.monotonic() > deadline:
                break
            idx = torch.randint(0, n, (min(cfg.router_batch, n),), generator=gen)
            logits = router(inputs[idx])  # (b, N)
            route = loss_fn(logits, label_mask[idx])
            bal = balance_loss(logits, k)
            loss = cfg.route_weight * route + cfg.balance_weight * bal
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.router_lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(router.parameters(), cfg.grad_clip)
            opt.step()
            last = {"route": route.item(), "balance": bal.item()}
    finally:
        router.weight.requires_grad_(False)
    with torch.no_grad():
        acc = label_accuracy(router(inputs), label_mask, k)
    return {**last, "label_accuracy": acc}


# ---------------------------------------------------------------- the error that picks experts
def output_sensitivity(dense: nn.Module, train_ids: torch.Tensor, layers: list[int], tokens: int, seed: int,
                       check: Callable[[], None] = lambda: None, rows_per_pass: int = 4) -> dict[int, torch.Tensor]:
    """Per layer, a factor L (H, H) of the dense model's output metric of its FFN output: M = L L^T.

    M = mean over tokens of g g^T, g = d log p(y) / d (layer's FFN output) with y sampled from the
    dense model's own next-token distribution at every position (so M is its Fisher information: the
    KL to the dense model grows like e^T M e / 2 for a small error e there). Estimated on the first
    `tokens` tokens of train_ids, scaled to a mean diagonal of 1, with 1e-4 of it added for a stable
    factor. ||e @ L||^2 = e^T M e.
    """
    rows = train_ids[:max(1, -(-tokens // train_ids.shape[1]))]
    sums = {i: torch.zeros(dense.config.hidden_size, dense.config.hidden_size, dtype=torch.float64,
                           device=train_ids.device) for i in layers}
    outputs: dict[int, torch.Tensor] = {}

    def track(_module, _args, output):  # the weights are frozen: the embeddings become the graph's leaf
        return output.detach().requires_grad_(True)

    def keep(i: int):
        def hook(_module, _args, output):
            output.retain_grad()  # d loss / d this output, through every later layer (nothing detached)
            outputs[i] = output
        return hook

    gen = torch.Generator(device=train_ids.device).manual_seed(seed + 3)
    handles = [dense.model.embed_tokens.register_forward_hook(track)]
    handles += [dense.model.layers[i].mlp.register_forward_hook(keep(i)) for i in layers]
    try:
        for part in rows.split(rows_per_pass):
            check()
            with torch.enable_grad():
                logp = F.log_softmax(dense(part).logits.float(), dim=-1)  # (B, L, V)
                with torch.no_grad():
                    y = torch.multinomial(logp.exp().flatten(0, 1), 1, generator=gen)  # (B*L, 1)
                logp.flatten(0, 1).gather(1, y).sum().backward()
            for i in layers:
                g = _flat(outputs[i].grad).double()
                sums[i] += g.t() @ g
            outputs.clear()
    finally:
        for h in handles:
            h.remove()
    factors = {}
    for i, m in sums.items():
        m = m / m.diagonal().mean().clamp_min(1e-30)
        m.diagonal().add_(1e-4)
        factors[i] = torch.linalg.cholesky(m).to(torch.float32)
    return factors


def _measured_downs(mlp: FactorizedMLP, factor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' and shared block's down projections in the error metric's coordinates (y -> y @ factor)."""
    if factor is None:
        return mlp.down, mlp.shared_down
    return mlp.down @ factor.to(mlp.down.dtype), mlp.shared_down @ factor.to(mlp.down.dtype)


def _measured_outputs(mlp: FactorizedMLP, x: torch.Tensor, t: torch.Tensor,
                      downs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's output (T, N, H) and what the experts should add to the shared block (T, H), with
    the down projections `downs` (_measured_downs; t in the same coordinates)."""
    down, shared_down = downs
    o = torch.einsum("tnd,ndh->tnh", mlp.expert_activations(x), down)
    if mlp.shared_size:
        t = t - mlp.shared_activations(x) @ shared_down
    return o, t


def measured(target: torch.Tensor, factor: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """target (T, H) in the error metric's coordinates: target @ factor (itself when factor is None)."""
    if factor is None:
        return target
    with torch.no_grad():
        return torch.cat([t @ factor.to(t.dtype) for t in target.split(chunk)])


def layer_labels(mlp: FactorizedMLP, inputs: torch.Tensor, teacher: torch.Tensor, top_k: int,
                 chunk: int, factor: torch.Tensor | None = None) -> torch.Tensor:
    """PAR label masks for every token, computed in chunks: (T, N). With an error-metric factor
    (output_sensitivity), teacher is given in its coordinates (measured) and the errors are measured there."""
    masks = []
    with torch.no_grad():
        downs = _measured_downs(mlp, factor)
        for x, t in zip(inputs.split(chunk), teacher.split(chunk)):
            masks.append(pseudo_labels(*_measured_outputs(mlp, x, t, downs), top_k)[1])
    return torch.cat(masks)


def joint_labels(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, top_k: int,
                 chunk: int, factor: torch.Tensor | None = None) -> torch.Tensor:
    """Best-joint-combination label masks under the experts' current weights: (T, N) (factor: as layer_labels)."""
    uniform = torch.full((1, top_k), 1.0 / mlp.num_experts)
    weight = mlp._combine(uniform, mlp.num_experts)[0, 0].item()  # scaled: N/K, gated (uniform): 1/K
    masks = []
    with torch.no_grad():
        downs = _measured_downs(mlp, factor)
        for x, t in zip(inputs.split(chunk), target.split(chunk)):
            masks.append(combination_labels(*_measured_outputs(mlp, x, t, downs), weight, top_k))
    return torch.cat(masks)


# ---------------------------------------------------------------- per-token K (adaptive routing)
def subset_masks(num_experts: int, empty: bool = False) -> torch.Tensor:
    """Every non-empty set of experts (and the empty one first if asked) as a 0/1 row: (S, N), smallest first."""
    sets = [c for k in range(0 if empty else 1, num_experts + 1) for c in itertools.combinations(range(num_experts), k)]
    masks = torch.zeros(len(sets), num_experts)
    for row, c in enumerate(sets):
        masks[row, list(c)] = 1.0
    return masks


def adaptive_labels(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, mean_k: float,
                    chunk: int, min_experts: int = 1, weights: torch.Tensor | None = None,
                    factor: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token sets of experts with mean size mean_k that minimise the total error: (T, N) 0/1.
    min_experts 0 lets a token's set be empty (the shared block alone); weights (T,) scale each
    token's error (None: all 1); factor: an error metric as in layer_labels (target in its coordinates).

    Each token's error for every set of experts (with the current weights and the scaled rule's
    N/K, K = the layer's K) is computed exactly; a Lagrange multiplier on the set size, found by
    bisection, picks each token's set (argmin error + lam * size) so that the mean size is mean_k.
    """
    if mlp.num_experts > 8:
        raise ValueError(f"per-token K enumerates every set of experts: at most 8 experts, got {mlp.num_experts}")
    masks = subset_masks(mlp.num_experts, empty=min_experts == 0).to(inputs.device)  # (S, N)
    weight = mlp.num_experts / mlp.top_k if mlp.output_mode == "scaled" else 1.0 / mlp.top_k
    errs = []
    with torch.no_grad():
        downs = _measured_downs(mlp, factor)
        for x, t in zip(inputs.split(chunk), target.split(chunk)):
            o, r = _measured_outputs(mlp, x, t, downs)
            o, r = o.float() * weight, r.float()  # (c, N, H), (c, H)
            b = torch.einsum("th,tnh->tn", r, o)
            g = torch.einsum("tnh,tmh->tnm", o, o)
            errs.append(r.pow(2).sum(1, keepdim=True) - 2 * b @ masks.t()
                        + torch.einsum("sn,tnm,sm->ts", masks, g, masks))
    err = torch.cat(errs)  # (T, S)
    if weights is not None:
        err = err * weights.float().unsqueeze(1)
    size = masks.sum(1)
    lo, hi = 0.0, float(err.max().clamp_min(0)) + 1.0
    for _ in range(60):
        lam = (lo + hi) / 2
        if size[(err + lam * size).argmin(1)].mean() > mean_k:
            lo = lam
        else:
            hi = lam
    return masks[(err + hi * size).argmin(1)].to(inputs.dtype)


def tune_thresholds(scores: torch.Tensor, min_experts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per nominal K = 1..N, the sigmoid-score threshold at which K experts run per token on average
    (the best always runs when min_experts is 1), and the mean it gives on these scores: (N,), (N,)."""
    n = scores.shape[1]
    sorted_scores = scores.sort(dim=1, descending=True).values
    always = min_experts  # experts every token runs whatever its scores
    rest = sorted_scores[:, always:]
    thresholds, means = torch.zeros(n), torch.zeros(n)
    for k in range(1, n + 1):
        if k == n:
            tau = 0.0  # every expert
        elif k == always:
            tau = float(rest.max()) + 1e-6  # the best one only
        else:  # the (k - always) * T largest of the other scores
            tau = float(rest.flatten().topk((k - always) * scores.shape[0]).values[-1])
        thresholds[k - 1] = tau
        means[k - 1] = always + (rest >= tau).float().sum(1).mean()
    return thresholds, means


def adaptive_rounds(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, cfg: TrainConfig,
                    check: Callable[[], None], deadline: float | None,
                    weights: torch.Tensor | None = None, factor: torch.Tensor | None = None,
                    measured_target: torch.Tensor | None = None) -> dict:
    """Switch a layer to per-token K at the same mean and fit it: per round, the best sets of
    experts (adaptive_labels, mean = the layer's K) -> router trained on them (BCE) -> thresholds
    tuned on these tokens -> least-squares refit of the down projections under the new routing.
    factor / measured_target: the error metric that picks the sets and target in its coordinates."""
    stats: dict = {}
    bce = replace(cfg, label_loss="bce", router_steps=cfg.round_router_steps)
    least = cfg.adaptive_min_experts if cfg.adaptive_min_experts is not None else (0 if mlp.shared_size else 1)
    for _ in range(cfg.adaptive_rounds):
        check()
        picked = target if measured_target is None else measured_target
        labels = adaptive_labels(mlp, inputs, picked, mlp.top_k, cfg.chunk_tokens, least, weights, factor)
        stats = train_router(mlp, inputs, labels, bce, check, deadline)
        with torch.no_grad():
            scores = torch.cat([mlp.router.linear(x).float().sigmoid() for x in inputs.split(cfg.chunk_tokens)])
        mlp.set_thresholds(*tune_thresholds(scores, least), min_experts=least)
        if cfg.refit_down:
            refit_down(mlp, inputs, target, cfg.ridge, cfg.chunk_tokens, weights)
    return stats


# ---------------------------------------------------------------- least-squares refit
def refit_down(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, ridge: float,
               chunk: int, weights: torch.Tensor | None = None) -> None:
    """Closed-form refit of the down projections (experts and shared) to `target` under the current routing.

    Solves min_W ||A W - target||^2 + lam ||W - W0||^2 where A (T, S + N*D) holds each token's shared
    activations and its selected experts' activations times their output weights (zeros elsewhere);
    with weights (T,), each token's squared error is scaled by its weight. The normal equations are
    accumulated block by block over the tokens that run each expert (normal_equations), so a token
    costs what its own experts cost, not the whole FFN.
    """
    n, d, s = mlp.num_experts, mlp.expert_size, mlp.shared_size
    cols = s + n * d
    gram = torch.zeros(cols, cols, dtype=torch.float64, device=inputs.device)
    cross = torch.zeros(cols, target.shape[-1], dtype=torch.float64, device=inputs.device)
    with torch.no_grad():
        parts = zip(inputs.split(chunk), target.split(chunk),
                    weights.split(chunk) if weights is not None else itertools.repeat(None))
        for x, t, w in parts:
            normal_equations(mlp, x, t, w, gram, cross)
        w0 = torch.cat([mlp.shared_down.reshape(-1, mlp.hidden_size),
                        mlp.down.reshape(-1, mlp.hidden_size)]).double()  # (cols, H)
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        gram.diagonal().add_(lam)
        solution = torch.linalg.solve(gram, cross + lam * w0)
        mlp.shared_down.copy_(solution[:s].to(mlp.shared_down.dtype))
        mlp.down.copy_(solution[s:].reshape(n, d, -1).to(mlp.down.dtype))


def normal_equations(mlp: FactorizedMLP, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None,
                     gram: torch.Tensor, cross: torch.Tensor) -> None:
    """Add tokens x (T, H) with targets t (T, H) and optional weights w (T,) to the refit's normal
    equations: gram += A^T diag(w) A, cross += A^T diag(w) t, A the design of refit_down.

    Only the blocks the routing fills are computed: expert e's activations for the tokens that run
    it, the (e, f) block over the tokens that run both, the shared block over every token.
    """
    n, d, s = mlp.num_experts, mlp.expert_size, mlp.shared_size
    routing = mlp.routing_weights(x)  # (T, N), 0 where an expert does not run
    runs = routing != 0
    tw = None if w is None else w.to(x.dtype)
    rows, acts, weighted = [], [], []
    for e in range(n):
        r = runs[:, e].nonzero().squeeze(1)
        a = mlp.expert_activation(x[r], e) * routing[r, e].unsqueeze(1)  # (|r|, D)
        rows.append(r)
        acts.append(a)
        weighted.append(a if tw is None else a * tw[r].unsqueeze(1))
    col = [slice(s + e * d, s + (e + 1) * d) for e in range(n)]
    if s:
        shared = mlp.shared_activations(x)  # (T, S)
        shared_w = shared if tw is None else shared * tw.unsqueeze(1)
        gram[:s, :s] += (shared_w.t() @ shared).double()
        cross[:s] += (shared_w.t() @ t).double()
    position = [runs[:, f].long().cumsum(0) - 1 for f in range(n)]  # token -> its row among f's tokens
    for e in range(n):
        if not len(rows[e]):
            continue
        cross[col[e]] += (weighted[e].t() @ t[rows[e]]).double()
        gram[col[e], col[e]] += (weighted[e].t() @ acts[e]).double()
        if s:
            block = (weighted[e].t() @ shared[rows[e]]).double()  # (D, S)
            gram[col[e], :s] += block
            gram[:s, col[e]] += block.t()
        for f in range(e + 1, n):
            both = runs[rows[e], f]  # which of e's tokens also run f
            if not both.any():
                continue
            block = (weighted[e][both].t() @ acts[f][position[f][rows[e][both]]]).double()  # (D, D)
            gram[col[e], col[f]] += block
            gram[col[f], col[e]] += block.t()


def tune_gate_up(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, cfg: TrainConfig,
                 check: Callable[[], None], deadline: float | None) -> float:
    """Adam steps on the experts' gate/up (and down) to reproduce target under the current routing."""
    params = [mlp.gate_up, mlp.down] + ([mlp.shared_gate_up, mlp.shared_down] if mlp.shared_size else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.gate_up_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    warmup = max(1, int(cfg.warmup_frac * cfg.gate_up_steps))
    loss_value = float("nan")
    try:
        for step in range(cfg.gate_up_steps):
            check()
            if deadline is not None and time.monotonic() > deadline:
                break
            idx = torch.randint(0, inputs.shape[0], (min(cfg.router_batch, inputs.shape[0]),), generator=gen)
            loss = F.mse_loss(mlp(inputs[idx]), target[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg.gate_up_steps, cfg.gate_up_lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            loss_value = loss.item()
    finally:
        for p in params:
            p.requires_grad_(False)
    return loss_value


# ---------------------------------------------------------------- the trainer
def train(dense: nn.Module, moe: nn.Module, train_ids: torch.Tensor, cfg: TrainConfig,
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
          started: float | None = None) -> TrainResult:
    """Train `moe` (built from `dense` by factorize.build_moe) in place on token rows train_ids (B, L).

    started: the time.monotonic() that cfg.minutes counts from (default: now), so a caller can
    include its own preparation (e.g. the cluster split) in the time budget.

    On TrainingCancelled the weights of `moe` may be partly trained: callers keep the saved run,
    which is only written after a successful return.
    """
    torch.manual_seed(cfg.seed)
    start = time.monotonic() if started is None else started
    deadline = start + 60 * cfg.minutes if cfg.minutes else None
    result = TrainResult(seconds=0.0, tokens=int(train_ids.numel()))
    layers = factorized_layers(moe)
    set_top_k(moe, cfg.top_k)
    total_steps = _total_steps(cfg, len(layers))
    state = {"step": 0, "total": total_steps}

    def check() -> None:
        if should_stop is not None and should_stop():
            raise TrainingCancelled("training cancelled")

    def report(phase: str, layer: int | None, losses: dict, advance: int = 1, e2e_total: int | None = None) -> None:
        state["step"] += advance
        if e2e_total is not None:  # the e2e schedule was fitted to its minutes: fewer steps than planned
            state["total"] = total_steps - cfg.e2e_steps + e2e_total
        rec = {"step": state["step"], "total": state["total"], "phase": phase, "layer": layer,
               "tokens": result.tokens, "elapsed_s": time.monotonic() - start, "losses": losses}
        result.log.append(rec)
        if progress:
            progress(rec)

    if cfg.mode == "none" or not layers:
        report("none", None, {}, advance=state["total"])
    elif cfg.mode == "router":
        _train_router_mode(dense, moe, train_ids, cfg, layers, result, check, report, deadline)
    else:
        _train_layerwise(dense, moe, train_ids, cfg, layers, result, check, report, deadline)
        if cfg.e2e_steps:
            _train_end_to_end(dense, moe, train_ids, cfg, result, check, report, deadline)
    result.seconds = time.monotonic() - start
    return result


def _total_steps(cfg: TrainConfig, num_layers: int) -> int:
    if cfg.mode == "none":
        return 1
    per_layer = 1 if cfg.mode == "router" else 2
    return num_layers * per_layer + (cfg.e2e_steps if cfg.mode == "experts" else 0)


def _train_router_mode(dense, moe, train_ids, cfg, layers, result, check, report, deadline) -> None:
    """Routers only, from FFN inputs and teacher outputs cached in one pass of the dense model."""
    dense_layers = dense.model.layers
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def cache(i: int):
        def hook(_module, args, output):
            inputs[i].append(_flat(args[0]).detach())
            outputs[i].append(_flat(output).detach())
        return hook

    handles = [dense_layers[i].mlp.register_forward_hook(cache(i)) for i in layers]
    try:
        with torch.no_grad():
            for rows in train_ids.split(max(1, cfg.chunk_tokens // train_ids.shape[1])):
                check()
                dense.model(rows)
    finally:
        for h in handles:
            h.remove()
    for i, mlp in layers.items():
        check()
        x, teacher = torch.cat(inputs.pop(i)), torch.cat(outputs.pop(i))  # (T, H) each
        labels = layer_labels(mlp, x, teacher, mlp.top_k, cfg.chunk_tokens)
        stats = train_router(mlp, x, labels, cfg, check, deadline)
        result.router_label_accuracy[i] = stats["label_accuracy"]
        report("router", i, stats)


def _train_layerwise(dense, moe, train_ids, cfg, layers, result, check, report, deadline) -> None:
    """Layer by layer on the factorized model's own inputs: router, refit, optional gate/up steps.

    Two residual streams advance together: the factorized model's (its FFN inputs) and the dense
    model's (for the `residual` target: the FFN output that would put the stream back on dense).
    """
    factors: dict[int, torch.Tensor] = {}
    if cfg.error_metric == "output":
        report("sensitivity", None, {}, advance=0)  # before: it takes ~1-2 min per 8k tokens on the CPU
        factors = output_sensitivity(dense, train_ids, list(layers), cfg.metric_tokens, cfg.seed, check)
    stream = LayerStream(moe, train_ids)
    hidden = stream.hidden  # (B, L, H) factorized stream
    dense_hidden = hidden.clone() if cfg.target == "residual" else None
    for i, layer in enumerate(moe.model.layers):
        check()
        dense_mlp = dense.model.layers[i].mlp
        with torch.no_grad():
            attn = stream.attention(i, hidden)  # (B, L, H)
            ffn_in = _flat(layer.post_attention_layernorm(attn))  # (T, H)
            if dense_hidden is not None:
                dense_attn = stream.attention(i, dense_hidden)
                dense_out = _apply_mlp(dense_mlp, layer.post_attention_layernorm(dense_attn), cfg.chunk_tokens)
                dense_hidden = dense_attn + dense_out
        if i not in layers:
            with torch.no_grad():
                hidden = attn + _apply_mlp(layer.mlp, ffn_in, cfg.chunk_tokens).view(attn.shape)
            continue
        mlp = layers[i]
        with torch.no_grad():
            if cfg.target == "teacher":
                target = _apply_mlp(dense_mlp, ffn_in, cfg.chunk_tokens)  # original FFN on own inputs
            else:
                target = _flat(dense_hidden - attn)  # what puts the stream back on the dense one
        first = None
        if mlp.first_token_dense:  # the first tokens run the whole FFN: routing and refits skip them
            first = torch.arange(attn.shape[0], device=attn.device) * attn.shape[1]
            first_in = ffn_in[first]
            rest = other_rows(first, ffn_in.shape[0])
            ffn_in, target = ffn_in[rest], target[rest]
        weights = None
        if cfg.token_weight == "residual":  # error relative to the residual stream the output lands in
            with torch.no_grad():
                h = _flat(attn)
                h = (h if first is None else h[rest]) + target
                weights = 1.0 / h.float().pow(2).sum(1).clamp_min(1e-6)
                weights = weights / weights.mean()
        factor = factors.get(i)  # None: plain squared error picks the experts
        picked = measured(target, factor, cfg.chunk_tokens)  # the target in the metric's coordinates
        labels = layer_labels(mlp, ffn_in, picked, mlp.top_k, cfg.chunk_tokens, factor=factor)  # the layer's K
        stats = train_router(mlp, ffn_in, labels, cfg, check, deadline)
        result.router_label_accuracy[i] = stats["label_accuracy"]
        report("router", i, stats)
        if cfg.refit_down:
            refit_down(mlp, ffn_in, target, cfg.ridge, cfg.chunk_tokens, weights)
            for _ in range(cfg.refine_rounds):  # routing and experts fitted to each other
                check()
                labels = joint_labels(mlp, ffn_in, picked, mlp.top_k, cfg.chunk_tokens, factor=factor)
                stats = train_router(mlp, ffn_in, labels, cfg, check, deadline)
                refit_down(mlp, ffn_in, target, cfg.ridge, cfg.chunk_tokens, weights)
        if cfg.adaptive_rounds:
            stats = adaptive_rounds(mlp, ffn_in, target, cfg, check, deadline, weights, factor, picked)
            result.router_label_accuracy[i] = stats.get("label_accuracy", result.router_label_accuracy[i])
        if cfg.gate_up_steps:
            tune_gate_up(mlp, ffn_in, target, cfg, check, deadline)
            if cfg.refit_down:  # the steps moved gate/up: the closed-form down fits them best
                refit_down(mlp, ffn_in, target, cfg.ridge, cfg.chunk_tokens, weights)
        with torch.no_grad():
            out = _apply_mlp(mlp, ffn_in, cfg.chunk_tokens)  # (T, H)
            mse = F.mse_loss(out, target).item()
            if first is not None:
                # after any gate/up steps, as inference computes it
                out = torch.empty(attn.shape[0] * attn.shape[1], attn.shape[2], device=attn.device).index_copy_(
                    0, rest, out).index_copy_(0, first, mlp.dense_output(first_in))
            hidden = attn + out.view(attn.shape)
        result.layer_mse[i] = mse
        report("experts", i, {"distill": mse, "distill_rel": mse / target.pow(2).mean().item()})


def _train_end_to_end(dense, moe, train_ids, cfg, result, check, report, deadline) -> None:
    """KL(dense || factorized) on next-token distributions; gradients reach expert weights only.

    With e2e_minutes the cosine schedule is fitted to the time: the first steps are timed and the
    total becomes what fits (never more than e2e_steps), so the learning rate still decays to its end.
    """
    params = []
    for mlp in factorized_layers(moe).values():
        if cfg.e2e_params == "all":
            params += [mlp.gate_up] + ([mlp.shared_gate_up] if mlp.shared_size else [])
        params += [mlp.down] + ([mlp.shared_down] if mlp.shared_size else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.e2e_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    total = cfg.e2e_steps
    warmup = max(1, int(cfg.warmup_frac * total))
    e2e_start = time.monotonic()
    e2e_deadline = e2e_start + 60 * cfg.e2e_minutes if cfg.e2e_minutes else None
    if deadline is not None:
        e2e_deadline = deadline if e2e_deadline is None else min(deadline, e2e_deadline)
    moe.train(False)
    try:
        step = 0
        while step < total:
            check()
            if e2e_deadline is not None and time.monotonic() > e2e_deadline:
                result.stopped_early = True
                break
            rows = train_ids[torch.randint(0, train_ids.shape[0], (cfg.e2e_batch,), generator=gen)]
            with torch.no_grad():
                teacher_logp = F.log_softmax(dense(rows).logits.float(), dim=-1)
            student_logp = F.log_softmax(moe(rows).logits.float(), dim=-1)
            loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.e2e_lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            if e2e_deadline is not None and step == 2:  # two steps timed: fit the schedule to the time left
                per_step = (time.monotonic() - e2e_start) / step
                total = max(step, min(total, step + int((e2e_deadline - time.monotonic()) / per_step)))
                warmup = max(1, int(cfg.warmup_frac * total))
            report("e2e", None, {"kl": loss.item()}, e2e_total=total)
    finally:
        for p in params:
            p.requires_grad_(False)
