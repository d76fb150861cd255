"""Split strategies -> a Partition (one neuron permutation per layer); build the MoE model from it."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import check_supported, decoder_layers
from .moe import OUTPUT_MODES, FactorizedMLP, mark_first_tokens

STRATEGIES = ("contiguous", "random", "cluster", "coverage")
CALIBRATED = ("cluster", "coverage")  # strategies that read calibration activations


@dataclass
class Partition:
    """Per factorized layer, a permutation of the FFN's I neurons: [shared S | expert 0 | ... | expert N-1]."""
    num_experts: int
    strategy: str
    intermediate_size: int
    permutations: dict[int, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    shared_size: int = 0
    shared_choice: str = "frequency"  # how the shared neurons were chosen (SHARED_CHOICES)

    def __post_init__(self) -> None:
        validate_experts(self.intermediate_size, self.num_experts, self.shared_size)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown split strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        validate_shared_choice(self.shared_choice)

    @property
    def layers(self) -> list[int]:
        return sorted(self.permutations)

    @property
    def expert_size(self) -> int:
        return (self.intermediate_size - self.shared_size) // self.num_experts

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"permutation.{i}": p.to(torch.int64).contiguous() for i, p in self.permutations.items()}

    def to_config(self) -> dict:
        return {"num_experts": self.num_experts, "strategy": self.strategy, "seed": self.seed,
                "intermediate_size": self.intermediate_size, "shared_size": self.shared_size,
                "shared_choice": self.shared_choice, "layers": self.layers}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Partition":
        perms = {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("permutation.")}
        return cls(config["num_experts"], config["strategy"], config["intermediate_size"], perms,
                   config.get("seed", 0), config.get("shared_size", 0), config.get("shared_choice", "frequency"))


def validate_experts(intermediate_size: int, num_experts: int, shared_size: int = 0) -> None:
    """N must divide the routed width; say which N would work otherwise."""
    routed = intermediate_size - shared_size
    if not 0 <= shared_size < intermediate_size:
        raise ValueError(f"shared_size must be in 0..{intermediate_size - 1}, got {shared_size}")
    if num_experts < 1 or routed % num_experts:
        options = [n for n in range(2, 65) if routed % n == 0][:10]
        raise ValueError(f"{num_experts} experts do not divide the FFN width {routed}"
                         f"{f' (after {shared_size} shared neurons)' if shared_size else ''}: "
                         f"choose N from {options}.")


def validate_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"K must be in 1..{num_experts} (the number of experts), got {top_k}.")


def resolve_layers(layers: list[int] | str | None, num_layers: int) -> list[int]:
    """None/'all' -> every layer; '0-3,7' or a list -> those layers; '1-' -> layer 1 to the last; checked."""
    if layers is None or layers == "all" or layers == "":
        return list(range(num_layers))
    if isinstance(layers, str):
        out: list[int] = []
        for part in layers.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1 if b.strip() else num_layers))
            elif part:
                out.append(int(part))
        layers = out
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: this model has layers 0..{num_layers - 1}")
    return sorted(set(int(i) for i in layers))


def calibration_inputs(model: nn.Module, input_ids: torch.Tensor, layers: list[int],
                       skip_first: bool = False) -> dict[int, torch.Tensor]:
    """FFN inputs (post-norm hidden states) of the given layers on calibration tokens: (T, H) each.

    skip_first leaves out each row's first token (it runs the whole FFN when first_token_dense)."""
    found: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    mods = decoder_layers(model)
    start = 1 if skip_first else 0
    handles = [mods[i].mlp.register_forward_pre_hook(
        lambda _m, args, i=i: found[i].append(args[0][:, start:].reshape(-1, args[0].shape[-1]).detach()))
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


def lost_energy(energy: torch.Tensor, assign: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Share of the routed output energy (energy (T, R): activation^2 * ||down row||^2) outside each token's
    best top_k experts under assign (R,): a scalar tensor."""
    member = torch.nn.functional.one_hot(assign, num_experts).to(energy.dtype)  # (R, N)
    per_expert = energy @ member  # (T, N)
    kept = per_expert.topk(top_k, dim=1).values.sum()
    return 1 - kept / energy.sum().clamp_min(1e-30)


def coverage_refine(energy: torch.Tensor, assign: torch.Tensor, num_experts: int, top_k: int,
                    iters: int = 20) -> torch.Tensor:
    """Improve a balanced partition so that each token's best top_k experts hold more of its output energy.

    Alternates: each token takes its top_k experts by energy; each neuron moves to the expert where it
    would lose the least energy over the tokens (balanced, _balanced_greedy). Returns the best partition
    seen (the alternation can cycle), never worse than assign.
    """
    if top_k >= num_experts:
        return assign  # every expert runs: nothing to cover
    cap = energy.shape[1] // num_experts
    best, best_lost = assign, lost_energy(energy, assign, num_experts, top_k)
    for _ in range(iters):
        member = torch.nn.functional.one_hot(assign, num_experts).to(energy.dtype)
        per_expert = energy @ member  # (T, N)
        chosen = torch.zeros_like(per_expert).scatter_(1, per_expert.topk(top_k, dim=1).indices, 1.0)
        new = _balanced_greedy(-(energy.t() @ (1 - chosen)), cap)  # (R, N): energy lost if in expert c
        if torch.equal(new, assign):
            break
        assign = new
        lost = lost_energy(energy, assign, num_experts, top_k)
        if lost < best_lost:
            best, best_lost = assign, lost
    return best


def make_partition(model: nn.Module, num_experts: int, strategy: str = "contiguous",
                   layers: list[int] | str | None = None, seed: int = 0,
                   calibration_ids: torch.Tensor | None = None, shared_size: int = 0,
                   skip_first: bool = False, inputs: dict[int, torch.Tensor] | None = None,
                   top_k: int = 2, shared_choice: str = "frequency") -> Partition:
    """Build a Partition of the chosen layers with one of STRATEGIES.

    cluster: neurons are grouped by co-activation (cosine of their |activation| profiles over the
    calibration tokens, balanced k-means); coverage: the cluster split, then improved so that each
    token's best top_k experts hold more of its output energy (coverage_refine); shared_size > 0
    makes S neurons an always-on shared expert, by default the most frequently active ones (CMoE;
    shared_choice: one of SHARED_CHOICES, see _shared_neurons; needs calibration tokens for every strategy). skip_first:
    each calibration row's first token is left out (for first_token_dense, where it is not routed).
    inputs: the layers' FFN inputs on the calibration tokens when the caller already has them
    (calibration_inputs), instead of computing them again.
    """
    check_supported(model)
    mods = decoder_layers(model)
    inter = mods[0].mlp.gate_proj.weight.shape[0]
    validate_experts(inter, num_experts, shared_size)
    validate_shared_choice(shared_choice)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown split strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    chosen = resolve_layers(layers, len(mods))
    if strategy == "coverage":
        validate_top_k(top_k, num_experts)
    needs_calibration = strategy in CALIBRATED or shared_size > 0
    if needs_calibration and calibration_ids is None and inputs is None:
        raise ValueError("the cluster and coverage splits and shared experts need calibration tokens "
                         "(calibration_ids)")
    if needs_calibration and inputs is None:
        inputs = calibration_inputs(model, calibration_ids, chosen, skip_first)
    gen = torch.Generator().manual_seed(seed)
    perms: dict[int, torch.Tensor] = {}
    for i in chosen:
        if needs_calibration:
            with torch.no_grad():
                # the split is computed on the CPU whatever the model's device (k-means' greedy
                # assignment is Python-bound; permutations are stored as CPU tensors)
                act = _activations(mods[i].mlp, inputs[i]).abs().float().cpu()  # (T, I)
            down_norm2 = mods[i].mlp.down_proj.weight.detach().float().pow(2).sum(0).cpu()  # (I,)
            shared = _shared_neurons(act, shared_size, shared_choice, down_norm2)
        else:
            act, shared = None, torch.empty(0, dtype=torch.long)
        rest = _complement(shared, inter)
        if strategy == "contiguous":
            routed = rest
        elif strategy == "random":
            routed = rest[torch.randperm(rest.numel(), generator=gen)]
        else:
            assign = balanced_kmeans(act[:, rest].t(), num_experts, seed + i)
            if strategy == "coverage":
                assign = coverage_refine(act[:, rest].pow(2) * down_norm2[rest], assign, num_experts, top_k)
            routed = rest[torch.cat([torch.nonzero(assign == c).flatten() for c in range(num_experts)])]
        perms[i] = torch.cat([shared, routed])
    return Partition(num_experts, strategy, inter, perms, seed, shared_size, shared_choice)


SHARED_CHOICES = ("frequency", "energy_frequency", "energy_share", "energy_mean")


def validate_shared_choice(choice: str) -> None:
    if choice not in SHARED_CHOICES:
        raise ValueError(f"unknown shared-neuron choice {choice!r}: choose one of {', '.join(SHARED_CHOICES)}")


def _shared_neurons(act: torch.Tensor, shared_size: int, choice: str = "frequency",
                    down_norm2: torch.Tensor | None = None) -> torch.Tensor:
    """The shared_size neurons of the always-on shared block (CMoE), by `choice`:
    frequency: most often among each token's strongest quarter of |activation| (this function's
    default, the recipe's before round 15; the recipe's now is workflows.RECIPE_SHARED_CHOICE);
    energy_frequency: the same by output energy, activation^2 * ||down row||^2 (down_norm2 (I,));
    energy_share: the largest mean per-token share of output energy;
    energy_mean: the largest mean output energy."""
    if shared_size == 0:
        return torch.empty(0, dtype=torch.long)
    validate_shared_choice(choice)
    if choice != "frequency":
        if down_norm2 is None:
            raise ValueError(f"shared-neuron choice {choice!r} needs the down projection's row norms")
        act = act.float().pow(2) * down_norm2.float().to(act.device)  # (T, I) output energy
    if choice in ("frequency", "energy_frequency"):
        k = max(1, act.shape[1] // 4)
        top = act.topk(k, dim=1).indices  # (T, k)
        score = torch.bincount(top.flatten(), minlength=act.shape[1]).float()
    elif choice == "energy_share":
        score = (act / act.sum(1, keepdim=True).clamp_min(1e-30)).mean(0)
    else:
        score = act.mean(0)
    return score.argsort(descending=True, stable=True)[:shared_size].sort().values


def _complement(shared: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[shared] = False
    return torch.arange(size)[keep]


LAYER_K_PLANS = ("uniform", "auto")


def parse_layer_k(plan: str, layers: list[int], top_k: int, num_experts: int, num_layers: int) -> dict[int, int]:
    """An explicit per-layer K ('3-6=3;2,11=1': LAYERS=K entries, ';'-separated) -> {layer: K - top_k}."""
    offsets: dict[int, int] = {}
    for entry in plan.split(";"):
        if not entry.strip():
            continue
        if entry.count("=") != 1:
            raise ValueError(f"per-layer K entry {entry.strip()!r} is not LAYERS=K: write e.g. '3-6=3;2,11=1', "
                             "'auto' or 'uniform'")
        where, k = entry.split("=")
        try:
            k = int(k)
        except ValueError:
            raise ValueError(f"per-layer K entry {entry.strip()!r}: K must be a whole number") from None
        validate_top_k(k, num_experts)
        for i in resolve_layers(where.strip(), num_layers):
            if i not in layers:
                raise ValueError(f"per-layer K names layer {i}, which is not factorized (factorized: {layers})")
            offsets[i] = k - top_k
    return {i: o for i, o in offsets.items() if o}


def plan_layer_k(dense: nn.Module, moe: nn.Module, calibration_ids: torch.Tensor | None, top_k: int,
                 skip_first: bool = False, inputs: dict[int, torch.Tensor] | None = None) -> dict[int, int]:
    """Per-layer K with the same total as top_k everywhere, from measured per-layer errors
    (layer_errors, then allocate_k). Returns {layer: offset} (zero offsets left out)."""
    return allocate_k(layer_errors(dense, moe, calibration_ids, skip_first, inputs), top_k)


def layer_errors(dense: nn.Module, moe: nn.Module, calibration_ids: torch.Tensor | None,
                 skip_first: bool = False, inputs: dict[int, torch.Tensor] | None = None) -> dict[int, list[float]]:
    """Per factorized layer, [inf, e(1), ..., e(N)]: the relative error ||t - o||^2 / ||t||^2 of the best
    joint k experts (their plain sum, the form that is exact at k = N) on the calibration tokens
    (or on `inputs`, the layers' FFN inputs from calibration_inputs)."""
    from .moe import factorized_layers
    from .par import combination_labels

    layers = factorized_layers(moe)
    if inputs is None:
        inputs = calibration_inputs(dense, calibration_ids, sorted(layers), skip_first)
    mods = decoder_layers(dense)
    n = next(iter(layers.values())).num_experts
    err: dict[int, list[float]] = {}
    with torch.no_grad():
        for i, mlp in layers.items():
            x = inputs[i]
            target = mods[i].mlp(x)
            rest = target - mlp.shared_output(x)
            outputs = mlp.expert_outputs(x)  # (T, N, H)
            total = target.pow(2).sum().clamp_min(1e-12)
            err[i] = [float("inf")] + [
                ((rest - torch.einsum("tn,tnh->th", combination_labels(outputs, rest, 1.0, k), outputs)).pow(2).sum()
                 / total).item() for k in range(1, n + 1)]
    return err


def allocate_k(err: dict[int, list[float]], top_k: int) -> dict[int, int]:
    """Start from top_k everywhere; while moving one unit of K from the layer that loses least to the
    layer that gains most lowers the summed error, move it (the total K stays). -> {layer: offset}."""
    n = len(next(iter(err.values()))) - 1
    ks = {i: top_k for i in err}
    while True:
        gains = {i: err[i][k] - err[i][k + 1] for i, k in ks.items() if k < n}
        if not gains:
            break
        up = max(gains, key=gains.get)
        losses = {j: err[j][k - 1] - err[j][k] for j, k in ks.items() if k > 1 and j != up}
        if not losses:
            break
        down = min(losses, key=losses.get)
        if gains[up] <= losses[down] + 1e-9:
            break
        ks[up] += 1
        ks[down] -= 1
    return {i: k - top_k for i, k in ks.items() if k != top_k}


def build_moe(dense: nn.Module, partition: Partition, top_k: int, output_mode: str = "scaled",
              router_seed: int = 0, first_token_dense: bool = False) -> nn.Module:
    """A new model equal to `dense` with FactorizedMLPs at the partition's layers.

    Attention, embeddings, norms, lm_head and unfactorized MLPs are shared with `dense` (not
    copied); the FFN weights of factorized layers are permuted copies, so `dense` is untouched.
    """
    validate_top_k(top_k, partition.num_experts)
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
    check_supported(dense)
    memo = {id(t): t for t in list(dense.parameters()) + list(dense.buffers())}
    moe = copy.deepcopy(dense, memo)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(router_seed)
    try:
        mods = decoder_layers(moe)
        for i in partition.layers:
            mods[i].mlp = FactorizedMLP(mods[i].mlp, partition.permutations[i], partition.num_experts,
                                        top_k, output_mode, partition.shared_size, first_token_dense)
    finally:
        torch.random.set_rng_state(gen_state)
    mark_first_tokens(moe)
    moe.eval()
    moe.requires_grad_(False)
    moe.factorlab_partition = partition
    return moe
