"""The trainer: one pass over the layers that fits each layer's router and experts to the frozen dense FFN.

Modes (Recipe.mode): `none` (untrained router, FactorLLM's Ex0); `router` (routers only, on FFN inputs
cached from one teacher pass); `experts` (the method: layer by layer on the factorized model's own
inputs, PAR router -> closed-form refit of the down projections -> per-token K rounds), optionally
followed by end-to-end logit distillation.

Data-parallel (factorlab.parallel): each process passes its own block of the token rows; what sums over
tokens (the refits' normal equations, the router's gradients, losses and accuracies) is summed over the
processes, and the per-token K thresholds are tuned on every process's scores, so every process ends with
the same layer, the one-process layer up to float rounding. One process runs exactly the code it ran before.

T=tokens H=hidden N=experts B=rows L=row length
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import parallel
from ..moe import FactorizedMLP, factorized_layers, set_top_k
from ..recipe import Recipe
from .labels import layer_labels, router_kl_loss
from .per_token import per_token_rounds
from .refit import refit_down, refit_each_k
from .router import GRAD_CLIP, WARMUP_FRAC, lr_at, train_router

CHUNK_TOKENS = 4096  # tokens processed at once when streaming a layer (bounds memory, not results)

Progress = Callable[[dict], None]


@dataclass
class TrainResult:
    seconds: float
    tokens: int
    router_label_accuracy: dict[int, float] = field(default_factory=dict)
    layer_mse: dict[int, float] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    every_k_seconds: float = 0.0  # of `seconds`: the refits that give every other K < N its own weights

    def summary(self) -> dict:
        acc = list(self.router_label_accuracy.values())
        out = asdict(self)
        out.pop("log")
        out["mean_router_label_accuracy"] = sum(acc) / len(acc) if acc else None
        return out


class TrainingCancelled(Exception):
    """Raised when should_stop() asks the trainer to stop; the model is left unchanged or consistent."""


def train(dense: nn.Module, moe: nn.Module, train_ids: torch.Tensor, recipe: Recipe, *,
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
          started: float | None = None, cache_teacher: bool = True) -> TrainResult:
    """Train `moe` (built from `dense` by factorize.build_moe) in place on token rows train_ids (B, L): this
    process's block of them when data-parallel (factorlab.parallel).

    started: the time.monotonic() that recipe.minutes counts from (default: now), so a caller can
    include its own preparation (e.g. the cluster split) in the time budget.
    cache_teacher: the `router` mode caches every layer's teacher inputs and outputs in one pass; False
    computes them one layer at a time instead (for when that cache would not fit memory: memory.plan).
    On TrainingCancelled the weights of `moe` may be partly trained: callers keep the saved run,
    which is only written after a successful return.
    """
    torch.manual_seed(recipe.seed)
    start = time.monotonic() if started is None else started
    deadline = start + 60 * recipe.minutes if recipe.minutes else None
    result = TrainResult(seconds=0.0, tokens=int(parallel.total(train_ids.numel())))
    layers = factorized_layers(moe)
    set_top_k(moe, recipe.top_k)
    total_steps = _total_steps(recipe, len(layers))
    state = {"step": 0, "total": total_steps}

    def check() -> None:
        if should_stop is not None and should_stop():
            raise TrainingCancelled("training cancelled")

    def report(phase: str, layer: int | None, losses: dict, advance: int = 1, e2e_total: int | None = None) -> None:
        state["step"] += advance
        if e2e_total is not None:  # the e2e schedule was fitted to the minutes: fewer steps than planned
            state["total"] = total_steps - recipe.e2e_steps + e2e_total
        rec = {"step": state["step"], "total": state["total"], "phase": phase, "layer": layer,
               "tokens": result.tokens, "elapsed_s": time.monotonic() - start, "losses": losses}
        result.log.append(rec)
        if progress:
            progress(rec)

    if recipe.mode == "none" or not layers:
        report("none", None, {}, advance=state["total"])
    elif recipe.mode == "router":
        _train_routers(dense, train_ids, recipe, layers, result, check, report, deadline, cache_teacher)
    else:
        _train_layerwise(dense, moe, train_ids, recipe, layers, result, check, report, deadline)
        if recipe.e2e_steps:
            _train_end_to_end(dense, moe, train_ids, recipe, result, check, report, deadline)
    result.seconds = time.monotonic() - start
    return result


def _total_steps(recipe: Recipe, num_layers: int) -> int:
    if recipe.mode == "none":
        return 1
    per_layer = 1 if recipe.mode == "router" else 2
    return num_layers * per_layer + (recipe.e2e_steps if recipe.mode == "experts" else 0)


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
        """Residual stream after layer i's attention block: (B, L, H), on layer i's device."""
        layer = self.layers[i]
        device = layer.input_layernorm.weight.device  # a model spread by device_map: the layers' own devices
        hidden = hidden.to(device)
        mask = self.mask.to(device) if isinstance(self.mask, torch.Tensor) else self.mask
        position_embeddings = tuple(p.to(device) for p in self.position_embeddings)
        out = []
        for row in hidden.split(8):
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(row), attention_mask=mask,
                                   position_ids=self.position_ids.to(device), position_embeddings=position_embeddings)
            out.append(row + a)
        return torch.cat(out)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _apply_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([mlp(part) for part in _flat(x).split(CHUNK_TOKENS)]).view(x.shape)


def _train_routers(dense, train_ids, recipe, layers, result, check, report, deadline, cache_teacher) -> None:
    """Routers only, on the dense model's FFN inputs and outputs (the teacher): cached for every layer in one
    pass, or computed one layer at a time when cache_teacher is False."""
    teacher = _cached_teacher if cache_teacher else _streamed_teacher
    for i, x, target in teacher(dense, train_ids, layers, check):  # (T, H) each
        mlp = layers[i]
        check()
        labels = layer_labels(mlp, x, target, mlp.top_k, CHUNK_TOKENS)
        stats = train_router(mlp, x, labels, recipe, steps=recipe.router_steps, loss_fn=router_kl_loss,
                             check=check, deadline=deadline)
        _same_everywhere(mlp)
        result.router_label_accuracy[i] = stats["label_accuracy"]
        report("router", i, stats)


def _cached_teacher(dense, train_ids, layers, check):
    """(layer, FFN inputs, FFN outputs) of the dense model, all layers cached in one pass: 2 x layers x T x H."""
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def cache(i: int):
        def hook(_module, args, output):
            inputs[i].append(_flat(args[0]).detach())
            outputs[i].append(_flat(output).detach())
        return hook

    handles = [dense.model.layers[i].mlp.register_forward_hook(cache(i)) for i in layers]
    try:
        with torch.no_grad():
            for rows in train_ids.split(max(1, CHUNK_TOKENS // train_ids.shape[1])):
                check()
                dense.model(rows)
    finally:
        for h in handles:
            h.remove()
    for i in layers:
        yield i, torch.cat(inputs.pop(i)), torch.cat(outputs.pop(i))


def _streamed_teacher(dense, train_ids, layers, check):
    """The same as _cached_teacher, one layer at a time: a LayerStream walks the dense model, holding one
    layer's inputs and outputs (T x H each) instead of every layer's."""
    stream = LayerStream(dense, train_ids)
    hidden = stream.hidden  # (B, L, H)
    for i, layer in enumerate(dense.model.layers[:max(layers) + 1]):
        check()
        with torch.no_grad():
            attn = stream.attention(i, hidden)  # (B, L, H)
            x = _flat(layer.post_attention_layernorm(attn))  # (T, H)
            out = _apply_mlp(layer.mlp, x)  # (T, H)
        if i in layers:
            yield i, x, out
        hidden = attn + out.view(attn.shape)


def _same_everywhere(mlp: FactorizedMLP) -> None:
    """Data-parallel: the main process's trained layer on every process. They computed it from the same summed
    statistics, so this only rules out float drift between them; a no-op in one process."""
    if parallel.world_size() == 1:
        return
    tensors = [mlp.router.linear.weight, mlp.down, mlp.shared_down, *(t for pair in mlp.weights_by_k.values()
                                                                      for t in pair)]
    if mlp.thresholds is not None:
        tensors += [mlp.thresholds, mlp.expected_k]
    for t in tensors:
        parallel.broadcast_(t.data)
    mlp.set_top_k(mlp.top_k)  # re-reads the layer's threshold and weights for its K


def _train_layerwise(dense, moe, train_ids, recipe, layers, result, check, report, deadline) -> None:
    """Layer by layer on the factorized model's own inputs (so each layer corrects for the ones before):
    PAR router -> refit -> per-token K rounds; then the stream advances through the trained layer."""
    stream = LayerStream(moe, train_ids)
    hidden = stream.hidden  # (B, L, H) the factorized model's residual stream
    for i, layer in enumerate(moe.model.layers):
        check()
        with torch.no_grad():
            attn = stream.attention(i, hidden)  # (B, L, H)
            ffn_in = _flat(layer.post_attention_layernorm(attn))  # (T, H)
        if i not in layers:
            with torch.no_grad():
                hidden = attn + _apply_mlp(layer.mlp, ffn_in).view(attn.shape)
            continue
        mlp = layers[i]
        with torch.no_grad():
            target = _apply_mlp(dense.model.layers[i].mlp, ffn_in)  # the original FFN on the factorized inputs
        labels = layer_labels(mlp, ffn_in, target, mlp.top_k, CHUNK_TOKENS)  # PAR: the K closest experts
        stats = train_router(mlp, ffn_in, labels, recipe, steps=recipe.router_steps, loss_fn=router_kl_loss,
                             check=check, deadline=deadline)
        result.router_label_accuracy[i] = stats["label_accuracy"]
        report("router", i, stats)
        refit_down(mlp, ffn_in, target, recipe.ridge, CHUNK_TOKENS)
        if recipe.per_token_rounds:
            stats = per_token_rounds(mlp, ffn_in, target, recipe, check, deadline, CHUNK_TOKENS)
            result.router_label_accuracy[i] = stats.get("label_accuracy", result.router_label_accuracy[i])
        check()
        started = time.monotonic()
        refit_each_k(mlp, ffn_in, target, recipe.ridge, CHUNK_TOKENS)  # every other K < N its own refit
        result.every_k_seconds += time.monotonic() - started
        _same_everywhere(mlp)
        with torch.no_grad():
            out = _apply_mlp(mlp, ffn_in)  # (T, H)
            mse = parallel.token_mean(F.mse_loss(out, target).item(), out.numel())
            energy = parallel.token_mean(target.pow(2).mean().item(), target.numel())
            hidden = attn + out.view(attn.shape)
        result.layer_mse[i] = mse
        report("experts", i, {"distill": mse, "distill_rel": mse / energy})


def _train_end_to_end(dense, moe, train_ids, recipe, result, check, report, deadline) -> None:
    """KL(dense || factorized) on next-token distributions; gradients reach expert weights only.

    With a time budget the cosine schedule is fitted to the time left: the first steps are timed and
    the total becomes what fits (never more than e2e_steps), so the learning rate still decays to its end.
    Data-parallel: every process draws the same global rows and runs the ones it holds (DDP: gradients summed,
    each weighted by its share of the batch); the main process's timing fits the schedule for all.
    """
    params = []
    for mlp in factorized_layers(moe).values():
        if recipe.e2e_params == "all":
            params += [mlp.gate_up] + ([mlp.shared_gate_up] if mlp.shared_size else [])
        params += [mlp.down] + ([mlp.shared_down] if mlp.shared_size else [])
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=recipe.e2e_lr)
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    total = recipe.e2e_steps
    warmup = max(1, int(WARMUP_FRAC * total))
    e2e_start = time.monotonic()
    offset, rows_total = parallel.offset_and_total(train_ids.shape[0])
    moe.train(False)
    try:
        step = 0
        while step < total:
            check()
            if deadline is not None and parallel.any_true(time.monotonic() > deadline):
                result.stopped_early = True
                break
            picked = torch.randint(0, rows_total, (recipe.e2e_batch,), generator=gen)  # global row indices
            local = parallel.local_part(picked, offset, train_ids.shape[0])
            share = local.numel() / picked.numel()  # 1 in one process
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, recipe.e2e_lr, warmup)
            opt.zero_grad(set_to_none=True)
            kl = 0.0
            if local.numel():
                rows = train_ids[local]
                with torch.no_grad():
                    teacher_logp = F.log_softmax(dense(rows).logits.float(), dim=-1)
                student_logp = F.log_softmax(moe(rows).logits.float(), dim=-1)
                loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
                (loss * share).backward()
                kl = loss.item() * share
            parallel.all_sum_grads_(params)
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            step += 1
            if deadline is not None and step == 2:  # two steps timed: fit the schedule to the time left
                per_step = (time.monotonic() - e2e_start) / step
                total = parallel.broadcast_value(max(step, min(total, step + int((deadline - time.monotonic())
                                                                                 / per_step))))
                warmup = max(1, int(WARMUP_FRAC * total))
            report("e2e", None, {"kl": parallel.total(kl)}, e2e_total=total)
    finally:
        for p in params:
            p.requires_grad_(False)
