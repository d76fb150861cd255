"""Split strategies -> a Partition (one neuron permutation per layer); build the MoE model from it."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import check_supported, decoder_layers
from .moe import FactorizedMLP
from .recipe import SPLITS



@dataclass
class Partition:
    """Per factorized layer, a permutation of the FFN's I neurons: [shared S | expert 0 | ... | expert N-1]."""
    num_experts: int
    strategy: str
    intermediate_size: int
    permutations: dict[int, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    shared_size: int = 0

    @property
    def layers(self) -> list[int]:
        return sorted(self.permutations)

    @property
    def expert_size(self) -> int:
        return (self.intermediate_size - self.shared_size) // self.num_experts

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"permutation.{i}": p.to(torch.int64).contiguous() for i, p in self.permutations.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_experts: int, strategy: str, shared_size: int,
                     seed: int = 0) -> "Partition":
        """The partition stored in a run's tensors (permutation.<layer>) with the run's recipe settings."""
        perms = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("permutation.")}
        size = next(iter(perms.values())).numel() if perms else 0
        return cls(num_experts, strategy, size, perms, seed, shared_size)


def calibration_inputs(model: nn.Module, input_ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """FFN inputs (post-norm hidden states) of the given layers on calibration tokens: (T, H) each."""
    found: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    mods = decoder_layers(model)
    handles = [mods[i].mlp.register_forward_pre_hook(
        lambda _m, args, i=i: found[i].append(args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i in layers]
    try:
        with torch.no_grad():
            for row in input_ids:
                model(row.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in found.items()}


def _activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)  # (T, I)


def balanced_kmeans(features: torch.Tensor, num_clusters: int, seed: int, iters: int = 30) -> torch.Tensor:
    """Cluster rows of features (I, F) into equal-size groups; returns a cluster id per row.

    Spherical k-means (cosine) with a capacity constraint: each round assigns (row, cluster) pairs
    greedily by similarity, a cluster closing when it holds I/num_clusters rows.
    """
    n = features.shape[0]
    cap = n // num_clusters
    x = torch.nn.functional.normalize(features.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:num_clusters]].clone()  # (C, F)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_greedy(x @ centroids.t(), cap)  # (I, C) similarities
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(num_clusters):
            centroids[c] = torch.nn.functional.normalize(x[assign == c].mean(0), dim=0)
    return assign


def _balanced_greedy(score: torch.Tensor, cap: int) -> torch.Tensor:
    """Assign rows of score (I, C) to columns, best (row, column) pairs first, each column closing at cap rows."""
    n, num_clusters = score.shape
    order = score.flatten().argsort(descending=True)
    rows, cols = order // num_clusters, order % num_clusters
    assign = [-1] * n  # plain lists: this greedy loop is Python-bound
    fill = [0] * num_clusters
    placed = 0
    for r, c in zip(rows.tolist(), cols.tolist()):
        if assign[r] >= 0 or fill[c] >= cap:
            continue
        assign[r] = c
        fill[c] += 1
        placed += 1
        if placed == n:
            break
    return torch.tensor(assign, dtype=torch.long)


def make_partition(model: nn.Module, num_experts: int, strategy: str = "contiguous",
                   layers: list[int] | None = None, *, seed: int = 0, shared_size: int = 0,
                   calibration_ids: torch.Tensor | None = None,
                   inputs: dict[int, torch.Tensor] | None = None) -> Partition:
    """Build a Partition of the chosen layers (None: all) with one of recipe.SPLITS.

    cluster: neurons are grouped by co-activation (cosine of their |activation| profiles over the
    calibration tokens, balanced k-means); shared_size > 0 makes S neurons an always-on shared
    expert (CMoE), the ones with the largest mean share of each token's FFN output energy. Both need
    calibration tokens, or `inputs`: the layers' FFN inputs on them (calibration_inputs) when the
    caller already has them.
    """
    check_supported(model)
    mods = decoder_layers(model)
    inter = mods[0].mlp.gate_proj.weight.shape[0]
    chosen = list(range(len(mods))) if layers is None else list(layers)
    if num_experts < 1 or (inter - shared_size) % num_experts:
        raise ValueError(f"{num_experts} experts do not divide the {inter - shared_size} routed neurons")
    needs_calibration = strategy == "cluster" or shared_size > 0
    if needs_calibration and calibration_ids is None and inputs is None:
        raise ValueError("the cluster split and shared neurons need calibration tokens (calibration_ids)")
    if needs_calibration and inputs is None:
        inputs = calibration_inputs(model, calibration_ids, chosen)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[int, torch.Tensor] = {}
    for i in chosen:
        if needs_calibration:
            with torch.no_grad():
                # the split is computed on the CPU whatever the model's device (k-means' greedy
                # assignment is Python-bound; permutations are stored as CPU tensors)
                act = _activations(mods[i].mlp, inputs[i]).abs().float().cpu()  # (T, I)
            down_norm2 = mods[i].mlp.down_proj.weight.detach().float().pow(2).sum(0).cpu()  # (I,)
            shared = shared_neurons(act, shared_size, down_norm2)
        else:
            act, shared = None, torch.empty(0, dtype=torch.long)
        rest = _complement(shared, inter)
        if strategy == "contiguous":
            routed = rest
        elif strategy == "random":
            routed = rest[torch.randperm(rest.numel(), generator=gen)]
        elif strategy == "cluster":
            assign = balanced_kmeans(act[:, rest].t(), num_experts, seed + i)
            routed = rest[torch.cat([torch.nonzero(assign == c).flatten() for c in range(num_experts)])]
        else:
            raise ValueError(f"unknown split {strategy!r}: choose one of {', '.join(SPLITS)}")
        perms[i] = torch.cat([shared, routed])
    return Partition(num_experts, strategy, inter, perms, seed, shared_size)


def shared_neurons(act: torch.Tensor, shared_size: int, down_norm2: torch.Tensor) -> torch.Tensor:
    """The shared_size neurons of the always-on shared block (CMoE): the largest mean per-token share of
    the FFN's output energy, activation^2 * ||down row||^2. act (T, I) |activations|, down_norm2 (I,)."""
    if shared_size == 0:
        return torch.empty(0, dtype=torch.long)
    energy = act.float().pow(2) * down_norm2.float().to(act.device)  # (T, I)
    score = (energy / energy.sum(1, keepdim=True).clamp_min(1e-30)).mean(0)
    return score.argsort(descending=True, stable=True)[:shared_size].sort().values


def _complement(shared: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[shared] = False
    return torch.arange(size)[keep]


def build_moe(dense: nn.Module, partition: Partition, top_k: int, output_mode: str = "scaled",
              router_seed: int = 0) -> nn.Module:
    """A new model equal to `dense` with FactorizedMLPs at the partition's layers.

    Attention, embeddings, norms, lm_head and unfactorized MLPs are shared with `dense` (not
    copied); the FFN weights of factorized layers are permuted copies, so `dense` is untouched.
    """
    check_supported(dense)
    memo = {id(t): t for t in list(dense.parameters()) + list(dense.buffers())}
    moe = copy.deepcopy(dense, memo)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(router_seed)
    try:
        mods = decoder_layers(moe)
        for i in partition.layers:
            mods[i].mlp = FactorizedMLP(mods[i].mlp, partition.permutations[i], partition.num_experts,
                                        top_k, output_mode, partition.shared_size)
    finally:
        torch.random.set_rng_state(gen_state)
    moe.eval()
    moe.requires_grad_(False)
    moe.factorlab_partition = partition
    return moe
