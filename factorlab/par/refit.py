"""Expert tuning in closed form: refit a layer's down projections to the teacher under the current routing.

T=tokens H=hidden N=experts D=expert width S=shared width
"""
from __future__ import annotations

import torch

from .. import parallel
from ..moe import FactorizedMLP


def refit_down(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, ridge: float, chunk: int) -> None:
    """Closed-form refit of the down projections (experts and shared) to `target` under the current routing.

    Solves min_W ||A W - target||^2 + lam ||W - W0||^2 where A (T, S + N*D) holds each token's shared
    activations and its selected experts' activations times their output weights (zeros elsewhere).
    The normal equations are accumulated block by block over the tokens that run each expert
    (normal_equations), so a token costs what its own experts cost, not the whole FFN.
    """
    n, d, s = mlp.num_experts, mlp.expert_size, mlp.shared_size
    cols = s + n * d
    gram = torch.zeros(cols, cols, dtype=torch.float64, device=inputs.device)
    cross = torch.zeros(cols, target.shape[-1], dtype=torch.float64, device=inputs.device)
    with torch.no_grad():
        for x, t in zip(inputs.split(chunk), target.split(chunk)):
            normal_equations(mlp, x, t, gram, cross)
        parallel.all_sum_(gram)  # data-parallel: sums over every process's tokens (no-op in one process)
        parallel.all_sum_(cross)
        w0 = torch.cat([mlp.shared_down.reshape(-1, mlp.hidden_size),
                        mlp.down.reshape(-1, mlp.hidden_size)]).double()  # (cols, H)
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        gram.diagonal().add_(lam)
        solution = torch.linalg.solve(gram, cross + lam * w0)
        mlp.shared_down.copy_(solution[:s].to(mlp.shared_down.dtype))
        mlp.down.copy_(solution[s:].reshape(n, d, -1).to(mlp.down.dtype))
    mlp.tuned = True


def refit_each_k(mlp: FactorizedMLP, inputs: torch.Tensor, target: torch.Tensor, ridge: float, chunk: int) -> None:
    """Give every K in 1..N-1 its own down projections, refitted under that K's routing (per-token K: its
    own threshold), starting from the trained K's; K = N is the dense FFN itself (FactorizedMLP.dense_at_n).
    Costs one refit per K and layer, and (N*D + S) * H weights per extra K."""
    trained = mlp.top_k
    base = (mlp.down.detach().clone(), mlp.shared_down.detach().clone())
    mlp.weights_by_k, mlp.trained_k = {trained: base}, trained
    for k in range(1, mlp.num_experts):
        if k == trained:
            continue
        mlp.set_top_k(k)
        mlp.down.data, mlp.shared_down.data = base[0].clone(), base[1].clone()
        refit_down(mlp, inputs, target, ridge, chunk)
        mlp.weights_by_k[k] = (mlp.down.data, mlp.shared_down.data)
    mlp.set_top_k(trained)


def normal_equations(mlp: FactorizedMLP, x: torch.Tensor, t: torch.Tensor, gram: torch.Tensor,
                     cross: torch.Tensor) -> None:
    """Add tokens x (T, H) with targets t (T, H) to the refit's normal equations: gram += A^T A,
    cross += A^T t, A the design of refit_down.

    Only the blocks the routing fills are computed: expert e's activations for the tokens that run
    it, the (e, f) block over the tokens that run both, the shared block over every token.
    """
    n, d, s = mlp.num_experts, mlp.expert_size, mlp.shared_size
    t = t.float()  # products in fp32 at least (bf16 weights), summed in fp64; no copy for an fp32 model
    routing = mlp.routing_weights(x)  # (T, N), 0 where an expert does not run
    runs = routing != 0
    rows, acts = [], []
    for e in range(n):
        r = runs[:, e].nonzero().squeeze(1)
        rows.append(r)
        acts.append((mlp.expert_activation(x[r], e) * routing[r, e].unsqueeze(1)).float())  # (|r|, D)
    col = [slice(s + e * d, s + (e + 1) * d) for e in range(n)]
    if s:
        shared = mlp.shared_activations(x).float()  # (T, S)
        gram[:s, :s] += (shared.t() @ shared).double()
        cross[:s] += (shared.t() @ t).double()
    position = [runs[:, f].long().cumsum(0) - 1 for f in range(n)]  # token -> its row among f's tokens
    for e in range(n):
        if not len(rows[e]):
            continue
        cross[col[e]] += (acts[e].t() @ t[rows[e]]).double()
        gram[col[e], col[e]] += (acts[e].t() @ acts[e]).double()
        if s:
            block = (acts[e].t() @ shared[rows[e]]).double()  # (D, S)
            gram[col[e], :s] += block
            gram[:s, col[e]] += block.t()
        for f in range(e + 1, n):
            both = runs[rows[e], f]  # which of e's tokens also run f
            if not both.any():
                continue
            block = (acts[e][both].t() @ acts[f][position[f][rows[e][both]]]).double()  # (D, D)
            gram[col[e], col[f]] += block
            gram[col[f], col[e]] += block.t()
