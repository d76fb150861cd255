"""FactorizedMLP: a dense gated FFN cut into N experts, a router, top-K and gathered dispatch.

Letters used in shape comments:
T=tokens H=hidden I=dense FFN width N=experts K=top_k D=expert width ((I-S)/N) S=shared width
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import OUTPUT_MODES

log = logging.getLogger(__name__)
_GROUPED_MM = getattr(torch, "_grouped_mm", None)  # grouped GEMM (torch >= 2.8); the accelerator prefill path


class TopKRouter(nn.Module):
    """Linear(hidden, N) scores -> fp32 softmax -> top-K experts per token; x is (T, H)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The router's scores (T, N)."""
        return self.scores_by_expert(x).t().contiguous()

    def scores_by_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The router's scores as computed, (N, T): one-token decode reads them without the transposes."""
        # W @ x^T rather than x @ W^T: with N tiny, the (N, T) product is ~3x faster on CPU BLAS.
        return self.linear.weight @ x.t()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = self.logits(x)  # (T, N)
        probs = router_logits.float().softmax(dim=-1)  # fp32 softmax for stable probabilities
        top_k_probs, top_k_index = probs.topk(self.top_k, dim=-1)  # (T, K)
        return router_logits, probs, top_k_probs, top_k_index


def scaled_weights(top_k_probs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """FactorLLM: each selected expert counts N/K (no gate weighting)."""
    return torch.full_like(top_k_probs, num_experts / top_k_probs.shape[-1])


def gated_weights(top_k_probs: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router probabilities of the selected experts, renormalised to sum to 1."""
    return top_k_probs / top_k_probs.sum(dim=-1, keepdim=True)


COMBINE: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "scaled": scaled_weights, "gated": gated_weights}


class _DecodeCache(dict):
    """Thread id -> _DecodeViews of one layer. Built on demand: a copy or a pickle starts empty."""

    def __deepcopy__(self, memo: dict) -> _DecodeCache:
        return _DecodeCache()

    def __reduce__(self):
        return _DecodeCache, ()


class _DecodeViews:
    """One thread's decode state for one layer, so that a token's step runs no slicing op: a (1, 2I)
    buffer laid out as the packed gate/up columns, each block's (gate, up) views of it and its down
    weights (act), and per run of adjacent blocks the packed columns and the buffer range its product
    fills (products, built on first use). Views of detached weights: no copy, no autograd."""

    def __init__(self, mlp: FactorizedMLP, key: tuple[int, ...]):
        self.key, self.products = key, {}
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and out of inference mode
            self.packed = mlp._check_packed()
            self.h = self.packed.new_empty(1, self.packed.shape[1])
            s, d = mlp.shared_size, mlp.expert_size
            self.starts = {-1: 0, **{e: 2 * s + 2 * d * e for e in range(mlp.num_experts)}}
            self.act = {e: (self.h[:, c:c + d], self.h[:, c + d:c + 2 * d], mlp.down.detach()[e])
                        for e, c in self.starts.items() if e >= 0}
            if s:
                self.act[-1] = (self.h[:, :s], self.h[:, s:2 * s], mlp.shared_down.detach())
            self.ends = {e: c + 2 * (s if e < 0 else d) for e, c in self.starts.items()}

    def product(self, run: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed columns of blocks first..last and the buffer range that x @ them fills."""
        c0, c1 = self.starts[run[0]], self.ends[run[1]]
        with torch.inference_mode(False), torch.no_grad():
            self.products[run] = (self.packed[:, c0:c1], self.h[:, c0:c1])
        return self.products[run]


class FactorizedMLP(nn.Module):
    """Drop-in replacement for a Llama-style MLP: down(act(gate(x)) * up(x)) split into experts.

    The neurons are permuted once (a permutation does not change the function); expert e owns the
    contiguous block e of the permuted neurons. Optional shared neurons (the first S of the
    permutation) are always active.
    """

    def __init__(self, mlp: nn.Module, permutation: torch.Tensor, num_experts: int, top_k: int,
                 output_mode: str = "scaled", shared_size: int = 0):
        super().__init__()
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # (I,H) (I,H) (H,I)
        inter, hidden = gate.shape
        routed = inter - shared_size
        if sorted(permutation.tolist()) != list(range(inter)):
            raise ValueError(f"permutation must be a permutation of 0..{inter - 1}")
        if num_experts < 1 or routed % num_experts:
            raise ValueError(f"{num_experts} experts do not divide the {routed} routed neurons "
                             f"(FFN width {inter}, {shared_size} shared): choose N that divides {routed}.")
        self.hidden_size, self.num_experts, self.shared_size = hidden, num_experts, shared_size
        self.expert_size = routed // num_experts
        self.act_fn = mlp.act_fn
        perm = permutation.to(gate.device)
        g, u, d_t = gate[perm], up[perm], down[:, perm].t()  # permuted copies, (I, H) each
        n, dsz = num_experts, self.expert_size
        # Experts as stacked 3-D parameters: expert e is gate_up[e] / down[e]. The gate/up weights of the
        # shared block and of every expert are views of one packed (H, 2I) matrix (_pack_gate_up), so that
        # decode reads the blocks a token runs with one matrix-vector product per run of adjacent blocks.
        self.gate_up = nn.Parameter(torch.cat(
            [g[shared_size:].reshape(n, dsz, hidden), u[shared_size:].reshape(n, dsz, hidden)], dim=1))  # (N, 2D, H)
        self.down = nn.Parameter(d_t[shared_size:].reshape(n, dsz, hidden).contiguous())  # (N, D, H)
        self.shared_gate_up = nn.Parameter(torch.cat([g[:shared_size], u[:shared_size]], dim=0))  # (2S, H)
        self.shared_down = nn.Parameter(d_t[:shared_size].contiguous())  # (S, H)
        self._pack_gate_up()
        self.register_buffer("permutation", perm.clone(), persistent=False)
        # The dense FFN's own weights (views of the dense model's tensors: no copy, not saved). Once the experts
        # are tuned for some K, K = N runs these, so K = N stays the dense model exactly (every expert, the
        # original weights), whatever tuning the smaller K got; `gated` K = N is the dense FFN as well.
        self.register_buffer("dense_gate", gate.detach(), persistent=False)
        self.register_buffer("dense_up", up.detach(), persistent=False)
        self.register_buffer("dense_down", down.detach(), persistent=False)
        self.tuned = False  # experts refitted (refit_down, a run's tuned tensors): K = N uses the dense weights
        # K -> that K's own refitted (down, shared_down); set_top_k(K) switches to them. Empty: one set for all K.
        self.weights_by_k: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.trained_k: int | None = None  # the K whose weights are `down` as trained (with weights_by_k)
        self.router = TopKRouter(hidden, num_experts, top_k).to(device=gate.device, dtype=gate.dtype)
        # Per-token K (adaptive routing): expert e runs for a token when sigmoid(router logit e) >=
        # thresholds[K-1] (the best expert runs anyway unless min_experts is 0). thresholds[K-1] was tuned
        # on training tokens so that K experts run per token on average; expected_k[K-1] is that
        # measured mean. None = top-K.
        self.thresholds: torch.Tensor | None = None  # (N,)
        self.expected_k: torch.Tensor | None = None  # (N,)
        self.min_experts = 1  # per-token K: 0 lets a token run no routed expert (the shared block only)
        self.active_count: list[int] | None = None  # [tokens, (token, expert) pairs] while counted
        # record_routing's callback, given (this layer, router logits (T, N)) at every forward; None = off
        self.on_route: Callable[[FactorizedMLP, torch.Tensor], None] | None = None
        self._act = getattr(self.act_fn, "forward", self.act_fn)  # skip nn.Module.__call__ in the hot path
        self._decode_cache = _DecodeCache()  # thread id -> _DecodeViews (decode's buffer and weight views)
        self._inplace_act = isinstance(self.act_fn, nn.SiLU) or getattr(self.act_fn, "__name__", "") == "silu"
        self.set_output_mode(output_mode)
        self.set_top_k(top_k)

    # ---- configuration (chosen once, outside the hot path) ----
    @property
    def top_k(self) -> int:
        return self.router.top_k

    def set_top_k(self, top_k: int) -> None:
        """Run K experts per token (per-token K: K on average), with K's own refitted weights if it has them."""
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts}, got {top_k}")
        self.router.top_k = top_k
        self._threshold = float(self.thresholds[top_k - 1]) if self.thresholds is not None else None
        weights = self.weights_by_k.get(top_k)
        if weights is not None:  # a pointer swap, no copy
            self.down.data, self.shared_down.data = weights

    def _pack_gate_up(self) -> None:
        """Store shared_gate_up and gate_up as views of one (H, 2I) matrix, columns [shared gate | shared up |
        expert 0 gate | expert 0 up | ...]: a token's running blocks are then at most N + 1 column ranges, each
        read by one x @ W product over long contiguous rows (measured ~1.3x the bandwidth of one product per
        block on (2D, H) weights, experiments/speed). Called again after every dtype/device conversion."""
        s2, hidden = 2 * self.shared_size, self.hidden_size
        rows = torch.cat([self.shared_gate_up.detach(), self.gate_up.detach().reshape(-1, hidden)])  # (2I, H)
        # Rows padded by 16 elements: a row stride that is a multiple of 4 KiB (2I = 3072 floats here) makes
        # the strided reads of prefill's matmuls alias in the L1 cache.
        padded = rows.new_empty(hidden, rows.shape[0] + 16)
        packed = padded[:, :rows.shape[0]]
        packed.copy_(rows.t())
        self._gate_up_t = packed  # (H, 2I); not a parameter or buffer: the parameters below are its views
        self.shared_gate_up.data = packed.t()[:s2]  # (2S, H), strides (1, 2I)
        self.gate_up.data = packed.t()[s2:].view(self.num_experts, 2 * self.expert_size, hidden)  # (N, 2D, H)

    def _check_packed(self) -> torch.Tensor:
        """The packed gate/up matrix, packed again first if the parameters are no longer its views (a
        deepcopy clones parameters one by one; `.data` may have been replaced)."""
        storage = self._gate_up_t.untyped_storage().data_ptr()
        if self.gate_up.untyped_storage().data_ptr() != storage or (
                self.shared_size and self.shared_gate_up.untyped_storage().data_ptr() != storage):
            self._pack_gate_up()
        return self._gate_up_t

    def _apply(self, fn, recurse: bool = True):
        """.to() / .half() / .cuda() convert every K's own weights too (they are not parameters), and
        pack the converted gate/up weights again."""
        super()._apply(fn, recurse)
        self._decode_cache.clear()  # views of the weights before the conversion
        self._check_packed()  # converted one by one: views of the packed matrix no more
        current = self.weights_by_k.get(self.top_k)
        self.weights_by_k = {k: (fn(d), fn(s)) for k, (d, s) in self.weights_by_k.items()}
        if current is not None:  # the parameters hold the current K's weights: keep them one tensor
            self.down.data, self.shared_down.data = self.weights_by_k[self.top_k]
        return self

    @property
    def dense_at_n(self) -> bool:
        """Whether this K is N and runs the dense FFN's own weights (see __init__)."""
        return self.top_k == self.num_experts and (self.tuned or self.output_mode == "gated")

    @property
    def adaptive(self) -> bool:
        return self.thresholds is not None

    def set_thresholds(self, thresholds: torch.Tensor | None, expected_k: torch.Tensor | None = None,
                       min_experts: int = 1) -> None:
        """Switch to per-token K (thresholds (N,), one per nominal K) or back to top-K (None).

        min_experts 1: the best expert always runs; 0: a token may run none (only the shared block)."""
        if min_experts not in (0, 1):
            raise ValueError(f"min_experts must be 0 or 1, got {min_experts}")
        self.min_experts = int(min_experts)
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, dtype=torch.float32).flatten().clone()
            if thresholds.numel() != self.num_experts:
                raise ValueError(f"adaptive routing needs one threshold per K (1..{self.num_experts}), "
                                 f"got {thresholds.numel()}")
            expected_k = (torch.arange(1, self.num_experts + 1, dtype=torch.float32) if expected_k is None
                          else torch.as_tensor(expected_k, dtype=torch.float32).flatten().clone())
        self.thresholds = thresholds
        self.expected_k = expected_k if thresholds is not None else None
        self._threshold = float(thresholds[self.top_k - 1]) if thresholds is not None else None

    def set_output_mode(self, output_mode: str) -> None:
        if output_mode not in COMBINE:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        self.output_mode = output_mode
        self._combine = COMBINE[output_mode]
        self._shared = self._shared_ffn if self.shared_size else _zero_like_input
        self._add_shared = self._add_shared_ffn if self.shared_size else _first

    # ---- forward ----
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_size)  # (T, H)
        tracing = self.on_route is not None
        if self.dense_at_n and not tracing:  # every expert with the original weights: the dense FFN
            return self._dense_ffn(x).view(hidden_states.shape)
        one = x.shape[0] == 1 and x.device.type == "cpu" and not self._needs_grad(x)  # decode: Python-side routing
        if one and not tracing:  # the router's (N, 1) scores, without logits()' transposes
            return self._decode_one(x, self.router.scores_by_expert(x)).view(hidden_states.shape)
        logits = self.router.logits(x)  # (T, N)
        if tracing:  # a routing trace: every token, also when K = N runs the dense FFN
            self.on_route(self, logits)
        if self.dense_at_n:
            return self._dense_ffn(x).view(hidden_states.shape)
        if one:
            return self._decode_one(x, logits).view(hidden_states.shape)
        top_k_index, weights = self.selection(logits)
        weights = weights.to(x.dtype)
        if self.shared_size and not self._needs_grad(x):  # the experts' rows are added into the shared output
            out = self.dispatch(x, top_k_index, weights, into=self._shared_ffn(x))
        else:
            out = self._add_shared(self.dispatch(x, top_k_index, weights), x)
        return out.view(hidden_states.shape)

    def selection(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts each token runs and their weights: top-K (T, K) each, or per-token K (T, N) each
        (every expert best first, weight 0 where it does not run)."""
        if self.thresholds is not None:
            return self.adaptive_selection(router_logits)
        top_k_probs, top_k_index = router_logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)
        return top_k_index, self._combine(top_k_probs, self.num_experts)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """Training: something here requires grad, so the ops must be ones autograd can follow."""
        return torch.is_grad_enabled() and (x.requires_grad or self.gate_up.requires_grad or self.down.requires_grad
                                            or self.router.linear.weight.requires_grad)

    def _decode_one(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """One token on the CPU: the routing decided in Python on N floats (no sort, mask or index kernels),
        then one x @ W product per run of adjacent blocks into this thread's buffer, and per block its
        activation in place and its down product, accumulated in one output. No slicing op per token: the
        buffer and every view of it and of the weights are made once (_DecodeViews)."""
        n, k = self.num_experts, self.top_k
        logits = logits.view(-1) if logits.dtype == torch.float32 else logits.float().view(-1)  # (N,)
        if self.thresholds is not None:  # per-token K, as adaptive_selection
            scores = logits.sigmoid().tolist()
            threshold = self._threshold
            chosen = [e for e in range(n) if scores[e] >= threshold]  # by index, as the packed blocks
            if not chosen and self.min_experts:  # the best expert runs anyway (the first of equal scores)
                chosen = [scores.index(max(scores))]
            if self.output_mode == "scaled":
                weights = [n / k] * len(chosen)
            else:
                total = max(sum(scores[e] for e in chosen), 1e-12)
                weights = [scores[e] / total for e in chosen]
            if self.active_count is not None:
                self.active_count[0] += 1
                self.active_count[1] += len(chosen)
        else:  # top-K, as TopKRouter + the combine rule
            probs = logits.softmax(dim=-1).tolist()
            best = sorted(range(n), key=probs.__getitem__, reverse=True)[:k]
            total = 1.0 if self.output_mode == "scaled" else sum(probs[e] for e in best)
            chosen = sorted(best)  # by index, as the packed blocks
            weights = [n / k] * k if self.output_mode == "scaled" else [probs[e] / total for e in chosen]
        # Blocks in packed column order: the shared block (-1) first, then the chosen experts by index.
        blocks = ([(-1, 1.0)] if self.shared_size else []) + list(zip(chosen, weights))
        if not blocks:  # per-token K may run nothing at all
            return x.new_zeros(x.shape)
        views = self._decode_views()
        products, act, out = views.products, views.act, None
        start = 0
        while start < len(blocks):  # one product per run of adjacent blocks, into the views' buffer
            end = start + 1
            while end < len(blocks) and blocks[end][0] == blocks[end - 1][0] + 1:
                end += 1
            run = (blocks[start][0], blocks[end - 1][0])
            product = products.get(run) or views.product(run)
            torch.mm(x, product[0], out=product[1])
            start = end
        for e, w in blocks:
            gate, up, down = act[e]
            a = (F.silu(gate, inplace=True) if self._inplace_act else self._act(gate)).mul_(up)  # (1, width)
            if out is None:
                out = torch.mm(a, down) if w == 1.0 else torch.mm(a, down).mul_(w)
            else:
                out.addmm_(a, down, alpha=w)
        return out  # (1, H)

    def _decode_views(self) -> _DecodeViews:
        """This thread's decode buffer and its views, built again when the weights moved (a K with its own
        weights, a dtype or device conversion, a copy)."""
        p = self._parameters
        key = (p["gate_up"].data_ptr(), p["shared_gate_up"].data_ptr(), p["down"].data_ptr(),
               p["shared_down"].data_ptr())
        views = self._decode_cache.get(threading.get_ident())
        if views is None or views.key != key:
            views = _DecodeViews(self, key)
            self._decode_cache[threading.get_ident()] = views
        return views

    def adaptive_selection(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token K: every expert, best first (T, N), and its weight (T, N), 0 where it does not run.

        An expert runs when sigmoid(logit) >= the threshold of the current K; the best one always
        runs unless min_experts is 0. Weights: `scaled` N/K for each running expert (K the nominal K,
        as in the refit), `gated` the running experts' sigmoid scores renormalised to sum to 1.
        """
        scores = router_logits.float().sigmoid()  # (T, N)
        sorted_scores, index = scores.sort(dim=-1, descending=True)
        run = sorted_scores >= self.thresholds[self.top_k - 1].to(scores.device)
        if self.min_experts:
            run[:, 0] = True
        if self.output_mode == "scaled":
            weights = run.to(router_logits.dtype) * (self.num_experts / self.top_k)
        else:
            kept = sorted_scores * run
            weights = (kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-12)).to(router_logits.dtype)
        return index, weights

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's weight on each expert under the current routing, 0 where it does not run: (T, N)."""
        top_k_index, weights = self.selection(self.router.logits(x))
        dense_w = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        return dense_w.scatter_(1, top_k_index, weights.to(x.dtype))

    def dispatch(self, x: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor,
                 into: torch.Tensor | None = None) -> torch.Tensor:
        """Run only the selected experts: sum_k weights[t,k] * E_{index[t,k]}(x_t), (T, H) -> (T, H),
        added into `into` (inference only) when given.

        (A single token on the CPU does not come here from forward: _decode_one routes it in Python.)"""
        if self._needs_grad(x) or weights.requires_grad:  # training: ops autograd can follow
            out = self._dispatch_sorted(x, top_k_index, weights, self._experts_autograd)
            return out if into is None else into + out
        if top_k_index.shape[0] == 1 and self.thresholds is None:  # decode on an accelerator: no host sync
            out = self._dispatch_gather_weights(x, top_k_index, weights)
            return out if into is None else into.add_(out)
        if x.device.type != "cpu" and _GROUPED_MM is not None and not self._grouped_failed:
            try:
                return self._dispatch_grouped(x, top_k_index, weights, into)
            except RuntimeError as exc:  # a dtype, layout or GPU that the grouped kernel does not take
                self._grouped_failed = True
                log.warning("grouped expert matmuls unavailable here (%s); using one matmul per expert", exc)
        return self._dispatch_sorted(x, top_k_index, weights, self._experts_inplace, into)

    _grouped_failed = False

    def _dispatch_grouped(self, x: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor,
                          into: torch.Tensor | None = None) -> torch.Tensor:
        """Accelerators: the (token, expert) pairs sorted by expert, then all experts' gate/up and down
        products as two grouped GEMMs (torch._grouped_mm) over row offsets that stay on the device: no
        per-expert launch and no host sync for top-K (per-token K syncs once, to drop the pairs that do
        not run). The same function as _dispatch_sorted."""
        top_k, d = top_k_index.shape[1], self.expert_size
        flat_expert, flat_weight = top_k_index.reshape(-1), weights.reshape(-1)
        pairs = flat_weight.nonzero().flatten() if self.thresholds is not None else None  # per-token K
        if pairs is not None:
            flat_expert = flat_expert.index_select(0, pairs)
        order = flat_expert.argsort(stable=True)  # (P,) pairs grouped by expert
        offs = torch.bincount(flat_expert, minlength=self.num_experts).cumsum(0).to(torch.int32)  # (N,) row ends
        flat = order if pairs is None else pairs.index_select(0, order)  # flat (token, rank) index of each row
        token = flat // top_k
        xs = x.index_select(0, token)  # (P, H)
        h = _GROUPED_MM(xs, self.gate_up.transpose(1, 2), offs=offs)  # (P, 2D)
        a = self.act_fn(h[:, :d]) * h[:, d:] * flat_weight.index_select(0, flat).unsqueeze(1)  # (P, D)
        ys = _GROUPED_MM(a, self.down, offs=offs)  # (P, H)
        return (torch.zeros_like(x) if into is None else into).index_add_(0, token, ys)

    def _dispatch_sorted(self, x: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor,
                         run_experts: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
                         into: torch.Tensor | None = None) -> torch.Tensor:
        """Sort (token, expert) pairs by expert, run each expert once on its rows, unsort and sum over K
        (into `into`, (T, H), in place when given: no zero buffer and no extra sum)."""
        top_k = top_k_index.shape[1]
        flat_expert = top_k_index.reshape(-1)  # (T*K,)
        if self.thresholds is not None:  # per-token K: only the pairs that run (weight > 0)
            pairs = weights.reshape(-1).nonzero().flatten()  # (P,) flat (token, rank) pairs
            if self.active_count is not None:
                self.active_count[0] += x.shape[0]
                self.active_count[1] += pairs.numel()
            flat_expert = flat_expert.index_select(0, pairs)
            order = pairs.index_select(0, flat_expert.argsort(stable=True))  # flat pairs sorted by expert
            flat_expert = top_k_index.reshape(-1).index_select(0, order)
            counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
            token = order // top_k
            xs = x.index_select(0, token)
            ys = run_experts(xs, weights.reshape(-1, 1).index_select(0, order), counts)
            return (torch.zeros_like(x) if into is None else into).index_add_(0, token, ys)
        order = flat_expert.argsort(stable=True)  # (T*K,) pairs sorted by expert
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()  # one host sync
        token = order // top_k  # (T*K,) the token of each sorted pair
        xs = x.index_select(0, token)  # (T*K, H) grouped by expert
        ws = weights.reshape(-1, 1).index_select(0, order)  # (T*K, 1)
        ys = run_experts(xs, ws, counts)  # (T*K, H) in sorted order
        if top_k > 1 or into is not None:  # sum each token's K rows (measured faster than gather + sum over K)
            return (torch.zeros_like(x) if into is None else into).index_add_(0, token, ys)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return ys.index_select(0, inverse)  # (T, H) back in token order: a gather

    def _experts_inplace(self, xs: torch.Tensor, ws: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Inference: every expert writes its rows straight into one output buffer (no cat, fewer temporaries)."""
        d = self.expert_size
        ys = torch.empty_like(xs)  # (T*K, H)
        start = 0
        for e, count in enumerate(counts):
            if count:
                end = start + count
                h = xs[start:end] @ self.gate_up[e].t()  # (c, 2D)
                a = self.act_fn(h[:, :d]).mul_(h[:, d:]).mul_(ws[start:end])  # (c, D)
                torch.mm(a, self.down[e], out=ys[start:end])  # (c, H)
                start = end
        return ys

    def _experts_autograd(self, xs: torch.Tensor, ws: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Training: the same computation with out-of-place ops."""
        parts, start = [], 0
        for e, count in enumerate(counts):
            if count:
                end = start + count
                parts.append(self._expert(xs[start:end], e) * ws[start:end])  # (c, H)
                start = end
        return torch.cat(parts)

    def _dispatch_gather_weights(self, x: torch.Tensor, top_k_index: torch.Tensor,
                                 weights: torch.Tensor) -> torch.Tensor:
        """Few tokens on an accelerator: gather the selected experts' weights, two batched matmuls, no sync."""
        d = self.expert_size
        w1 = self.gate_up[top_k_index]  # (T, K, 2D, H)
        h = torch.einsum("th,tkdh->tkd", x, w1)  # (T, K, 2D)
        a = self.act_fn(h[..., :d]) * h[..., d:] * weights.unsqueeze(-1)  # (T, K, D)
        return torch.einsum("tkd,tkdh->th", a, self.down[top_k_index])  # (T, H)

    def expert_activation(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's intermediate activation act(gate) * up for tokens x: (c, H) -> (c, D)."""
        h = x @ self.gate_up[e].t()  # (c, 2D)
        return self.act_fn(h[:, :self.expert_size]) * h[:, self.expert_size:]

    def shared_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The shared neurons' intermediate activations: (T, H) -> (T, S)."""
        h = x @ self.shared_gate_up.t()  # (T, 2S)
        return self.act_fn(h[:, :self.shared_size]) * h[:, self.shared_size:]

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.expert_activation(x, e) @ self.down[e]  # (c, H)

    def _dense_ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(F.linear(x, self.dense_gate)) * F.linear(x, self.dense_up)  # (T, I)
        return F.linear(h, self.dense_down)  # (T, H)

    def _shared_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_activations(x) @ self.shared_down  # (T, H)

    def _add_shared_ffn(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out + self._shared_ffn(x)

    # ---- analysis helpers (used by training, tests and the dense reference) ----
    def expert_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's intermediate activation act(gate) * up: (T, H) -> (T, N, D)."""
        h = torch.einsum("th,ndh->tnd", x, self.gate_up)  # (T, N, 2D)
        return self.act_fn(h[..., :self.expert_size]) * h[..., self.expert_size:]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's unscaled output: (T, H) -> (T, N, H)."""
        return torch.einsum("tnd,ndh->tnh", self.expert_activations(x), self.down)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the always-on shared neurons (zeros when there are none): (T, H)."""
        return self._shared(x)

    def forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Compute every expert and mask: the slow reference that dispatch must equal."""
        x = hidden_states.reshape(-1, self.hidden_size)
        if self.dense_at_n:
            return self._dense_ffn(x).view(hidden_states.shape)
        dense_w = self.routing_weights(x)  # (T, N), zero for unselected experts
        out = torch.einsum("tn,tnh->th", dense_w, self.expert_outputs(x)) + self._shared(x)
        return out.view(hidden_states.shape)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}{' (per-token, mean)' if self.adaptive else ''}, "
                f"expert_size={self.expert_size}, shared={self.shared_size}, output_mode={self.output_mode}")


def _zero_like_input(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


def _first(out: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
    return out


# ---- model-level helpers ----
def factorized_layers(model: nn.Module) -> dict[int, FactorizedMLP]:
    """Decoder-layer index -> FactorizedMLP, for every factorized layer of the model."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, FactorizedMLP)}


def set_top_k(model: nn.Module, top_k: int | dict[int, int]) -> None:
    """Change K at run time: one K for all factorized layers (int) or an explicit K per layer ({layer: K})."""
    for i, mlp in factorized_layers(model).items():
        mlp.set_top_k(top_k[i] if isinstance(top_k, dict) else top_k)


@contextmanager
def count_active_experts(model: nn.Module) -> Iterator[dict[int, float]]:
    """Measure the experts that run per token in each per-token-K layer while active.

    Yields a dict that is filled on exit with {layer: mean experts per routed token} (layers with no
    routed token, and top-K layers, are left out: they run their K)."""
    layers = {i: m for i, m in factorized_layers(model).items() if m.adaptive}
    for m in layers.values():
        m.active_count = [0, 0]
    result: dict[int, float] = {}
    try:
        yield result
    finally:
        for i, m in layers.items():
            tokens, pairs = m.active_count
            m.active_count = None
            if tokens:
                result[i] = pairs / tokens


def layer_mean_k(model: nn.Module, top_k: int | None = None) -> dict[int, float]:
    """{layer: experts per token} at K top_k (None: each layer's current K); for per-token K the mean
    that training measured at that K."""
    out = {}
    for i, m in factorized_layers(model).items():
        k = m.top_k if top_k is None else top_k
        out[i] = float(m.expected_k[k - 1]) if m.expected_k is not None else float(k)
    return out


def chosen_lists(top_k_index: torch.Tensor) -> list[list[int]]:
    """A trace's chosen experts as one list per token, best first (per-token K: the -1 padding dropped)."""
    return [[e for e in row if e >= 0] for row in top_k_index.tolist()]


@dataclass
class RoutingTrace:
    """Per factorized layer: chosen experts (T, K) and router probabilities (T, N), per forward.

    For per-token K layers the chosen experts are (T, N), best first, padded with -1."""
    top_k_index: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    probs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def stacked(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Concatenate the forwards of each layer along tokens."""
        cat = {i: torch.cat(v) for i, v in self.top_k_index.items()}
        return cat, {i: torch.cat(v) for i, v in self.probs.items()}


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record routing decisions while active (a callback per layer: nothing is added when off)."""
    trace = RoutingTrace()
    layers = factorized_layers(model)

    def record(mlp: FactorizedMLP, logits: torch.Tensor, i: int) -> None:
        probs = logits.float().softmax(dim=-1)
        if mlp.adaptive:  # per-token K: every expert best first, -1 where it does not run
            index, weights = mlp.adaptive_selection(logits)
            top_k_index = index.masked_fill(weights == 0, -1)
        else:
            top_k_index = probs.topk(mlp.top_k, dim=-1)[1]
        trace.top_k_index[i].append(top_k_index.detach().cpu())
        trace.probs[i].append(probs.detach().cpu())

    before = {i: mlp.on_route for i, mlp in layers.items()}  # an enclosing recording goes on as well
    for i, mlp in layers.items():
        trace.top_k_index[i], trace.probs[i] = [], []

        def on_route(m: FactorizedMLP, logits: torch.Tensor, i: int = i) -> None:
            if before[i] is not None:
                before[i](m, logits)
            record(m, logits, i)
        mlp.on_route = on_route
    try:
        yield trace
    finally:
        for i, mlp in layers.items():
            mlp.on_route = before[i]


__all__ = ["FactorizedMLP", "TopKRouter", "OUTPUT_MODES", "factorized_layers", "set_top_k", "count_active_experts",
           "layer_mean_k", "chosen_lists", "record_routing", "RoutingTrace", "scaled_weights", "gated_weights"]
