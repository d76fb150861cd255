"""Score benchmark tasks like lm-evaluation-harness; dense vs factorized sweeps over K; held-out text metrics.

Per choice: the summed log-probability of the continuation tokens after the context, with each
request tokenized as lm-eval's HFLM does. Speed: the choices of a document share one forward (the
context once, then each choice in its own branch of a tree attention mask), documents of similar
length are batched, and the vocabulary projection runs only where a continuation token is predicted.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .flops import flops_per_token
from .models import model_info
from .moe import count_active_experts, factorized_layers, layer_mean_k, set_top_k
from .tasks import TaskData, load_task, parse_tasks

log = logging.getLogger(__name__)

# Above-chance retention needs the dense score this many standard errors above chance (GUIDE §7:
# undefined at chance, e.g. the default model's 50.4% on Winogrande against 50%).
ABOVE_CHANCE_MIN_SE = 2.0
# Resamples of the paired bootstrap behind the means' intervals (bootstrap_means).
BOOTSTRAP_RESAMPLES = 2000
# callback(done, total, message): called after every forward; a job may raise from it to cancel.
Callback = Callable[[int, int, str], None]


# ---- tokenization (lm-eval HFLM, causal backend) ----
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: trailing context spaces move into the continuation; the continuation's
    tokens are those of encode(context + continuation) after the first len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_enc = tokenizer.encode(context)
    return context_enc, whole[len(context_enc):]


def max_length(model: nn.Module) -> int:
    """lm-eval's HFLM max_length: n_positions / max_position_embeddings / n_ctx, else 2048."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(model.config, attr, None):
            return int(getattr(model.config, attr))
    return 2048


# ---- packed scoring: one sequence per group of requests, their common prefix once, one branch each ----
@dataclass
class Packed:
    """A shared prefix followed by branches: each request's input (context + continuation[:-1]) after it."""
    tokens: list[int]
    positions: list[int]
    branch: list[int]  # -1 for the shared prefix, else the branch number
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (request, source position, token)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def pack(groups: Sequence[Sequence[tuple[int, list[int], list[int]]]], limit: int) -> list[Packed]:
    """One packed sequence per group of (request, context, continuation) tokens, longest first. Like
    lm-eval, a request longer than limit + 1 tokens loses context tokens from the left."""
    packed = []
    for group in groups:
        inputs = []
        for r, ctx, cont in group:
            if not ctx or not cont:
                raise ValueError(f"request {r} has an empty context or continuation after tokenization")
            ctx = ctx[max(0, len(ctx) + len(cont) - limit - 1):]
            inputs.append((r, ctx + cont[:-1], len(ctx), cont))
        shared = _common_prefix([x for _, x, _, _ in inputs])
        p = Packed(inputs[0][1][:shared], list(range(shared)), [-1] * shared)
        for b, (r, x, ctx_len, cont) in enumerate(inputs):
            start = len(p.tokens) - shared  # where this branch's own tokens begin, minus the prefix
            p.tokens += x[shared:]
            p.positions += range(shared, len(x))
            p.branch += [b] * (len(x) - shared)
            # token j of the continuation is predicted at input position ctx_len - 1 + j
            sources = [q if q < shared else start + q for q in range(ctx_len - 1, ctx_len - 1 + len(cont))]
            p.targets += [(r, s, t) for s, t in zip(sources, cont)]
        packed.append(p)
    return sorted(packed, key=lambda p: -len(p.tokens))


def group_by_context(encoded: Sequence[tuple[list[int], list[int]]]) -> list[list[tuple[int, list[int], list[int]]]]:
    """Requests with identical context tokens in one group (lm-eval's multiple-choice requests)."""
    groups: dict[tuple[int, ...], list] = {}
    for r, (ctx, cont) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append((r, ctx, cont))
    return list(groups.values())


def tree_mask(branches: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, L, L) from branch ids (B, L): causal, a branch sees the shared prefix (-1)
    and itself; padding (-2) sees only padding, so its rows stay finite."""
    L = branches.shape[1]
    q, k = branches.unsqueeze(2), branches.unsqueeze(1)  # (B, L, 1), (B, 1, L)
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & ((k == -1) & (q != -2) | (k == q))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


@torch.inference_mode()
def _score_batch(model: nn.Module, batch: list[Packed], out: torch.Tensor) -> None:
    """One forward; log-softmax only at the positions that predict a continuation token."""
    param = next(model.parameters())
    L = max(len(p.tokens) for p in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    pos = torch.zeros(len(batch), L, dtype=torch.long)
    branches = torch.full((len(batch), L), -2, dtype=torch.long)
    rows, tokens, req = [], [], []
    for i, p in enumerate(batch):
        n = len(p.tokens)
        ids[i, :n], pos[i, :n], branches[i, :n] = (torch.tensor(p.tokens), torch.tensor(p.positions),
                                                    torch.tensor(p.branch))
        for r, s, t in p.targets:
            rows.append(i * L + s)
            tokens.append(t)
            req.append(r)
    hidden = model.model(input_ids=ids.to(param.device), position_ids=pos.to(param.device),
                         attention_mask=tree_mask(branches, param.dtype).to(param.device),
                         use_cache=False).last_hidden_state  # (B, L, H)
    picked = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(rows, device=param.device)]  # (M, H)
    logprobs = model.get_output_embeddings()(picked).float().log_softmax(dim=-1)  # (M, V)
    target = logprobs.gather(1, torch.tensor(tokens, device=param.device).unsqueeze(1)).squeeze(1)  # (M,)
    out.index_add_(0, torch.tensor(req), target.cpu().double())


def score_packed(model: nn.Module, packed: list[Packed], num_requests: int, batch_size: int = 16,
                 progress: bool = False, desc: str = "scoring", on_batch: Callable[[], None] | None = None) -> list[float]:
    """Summed continuation log-probability per request, batch_size packed sequences per forward."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    out = torch.zeros(num_requests, dtype=torch.float64)
    for i in tqdm(range(0, len(packed), batch_size), desc=desc, disable=not progress, leave=False):
        _score_batch(model, packed[i:i + batch_size], out)
        if on_batch:
            on_batch()
    return out.tolist()


def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   progress: bool = False) -> list[float]:
    """lm-eval's loglikelihood: the summed log-probability of each continuation given its context."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    return score_packed(model, pack(group_by_context(encoded), max_length(model)), len(encoded), batch_size, progress)


# ---- task metrics ----
def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's mean_stderr: sample standard deviation (n - 1) over sqrt(n); None below 2 items."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def chance_rate(task: TaskData) -> float:
    """1/#choices averaged over the items; BoolQ: the majority gold label's rate on these items."""
    golds = [it.gold for it in task.items]
    if task.spec.chance == "majority":
        return max(golds.count(g) for g in set(golds)) / len(golds)
    return sum(1 / len(it.choices) for it in task.items) / len(task.items)


def score_items(task: TaskData, lls: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per item 1/0: acc = argmax of the sums; acc_norm = argmax of sum / len(choice string)."""
    acc, norm = [], []
    for it, ll in zip(task.items, lls):
        normed = [x / len(c) for x, c in zip(ll, it.choices)]
        acc.append(float(list(ll).index(max(ll)) == it.gold))  # the first maximum, as np.argmax
        norm.append(float(normed.index(max(normed)) == it.gold))
    return acc, norm


@dataclass
class TaskScores:
    """One model's scores on one task's items, with the per-choice log-likelihoods behind them."""
    task: str
    n: int
    acc: float
    acc_stderr: float | None
    acc_norm: float | None  # None where lm-eval reports no acc_norm (boolq, winogrande, mmlu)
    acc_norm_stderr: float | None
    chance: float
    seconds: float
    mean_tokens: float  # mean tokens per request (context + continuation), as lm-eval feeds them
    loglikelihoods: list[list[float]]

    @property
    def main(self) -> float:
        """acc_norm where the task has it, else acc."""
        return self.acc_norm if self.acc_norm is not None else self.acc

    @property
    def main_stderr(self) -> float | None:
        return self.acc_norm_stderr if self.acc_norm is not None else self.acc_stderr

    def as_dict(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n, "seconds": round(self.seconds, 2),
                "stderr": {"acc": self.acc_stderr, "acc_norm": self.acc_norm_stderr}}


@dataclass
class PreparedTask:
    """A task tokenized and packed once, to be scored by several models (dense, each K)."""
    task: TaskData
    packed: list[Packed]
    item_sizes: list[int]  # requests per item
    mean_tokens: float

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.packed) / batch_size)


def prepare(tokenizer, task: TaskData, limit: int = 2048) -> PreparedTask:
    """Tokenize (lm-eval's _encode_pair) and pack a loaded task; limit = max_length(model)."""
    if not task.items:
        raise ValueError(f"task {task.name} has no items to score")
    encoded = [encode_pair(tokenizer, c, x) for it in task.items for c, x in it.requests]
    mean_tokens = sum(len(c) + len(x) for c, x in encoded) / len(encoded)
    groups, r = [], 0
    for it in task.items:  # one packed sequence per document (Winogrande's two contexts share their prefix)
        groups.append([(r + j, *encoded[r + j]) for j in range(len(it.requests))])
        r += len(it.requests)
    return PreparedTask(task, pack(groups, limit), [len(it.requests) for it in task.items], mean_tokens)


def score_prepared(model: nn.Module, prepared: PreparedTask, batch_size: int = 16, progress: bool = False,
                   on_batch: Callable[[], None] | None = None) -> TaskScores:
    """Score a prepared task with one model."""
    start = time.perf_counter()
    task = prepared.task
    flat = score_packed(model, prepared.packed, sum(prepared.item_sizes), batch_size, progress, task.name, on_batch)
    lls, i = [], 0
    for size in prepared.item_sizes:
        lls.append(flat[i:i + size])
        i += size
    acc, norm = score_items(task, lls)
    has_norm = task.spec.has_acc_norm
    return TaskScores(task.name, len(acc), sum(acc) / len(acc), mean_stderr(acc),
                      sum(norm) / len(norm) if has_norm else None, mean_stderr(norm) if has_norm else None,
                      chance_rate(task), time.perf_counter() - start, prepared.mean_tokens, lls)


def evaluate(model: nn.Module, tokenizer, task: TaskData, batch_size: int = 16, progress: bool = False) -> TaskScores:
    """Score every item of a loaded task (tasks.load_task) with one model."""
    return score_prepared(model, prepare(tokenizer, task, max_length(model)), batch_size, progress)


# ---- sweeps: dense once, the factorized model at each K, on the same items ----
def relative(factorized: float, dense: float) -> float | None:
    return factorized / dense if dense > 0 else None


def above_chance(factorized: float, dense: float, chance: float, dense_stderr: float | None = None) -> float | None:
    """(f - chance) / (d - chance); undefined (None) unless the dense model is above chance by more than
    ABOVE_CHANCE_MIN_SE standard errors (a dense score at chance makes the ratio noise)."""
    if dense - chance <= ABOVE_CHANCE_MIN_SE * (dense_stderr or 0.0):
        return None
    return (factorized - chance) / (dense - chance)


def gflops(info: dict, seq_len: int, moe: nn.Module | None = None, top_k: int | None = None,
           measured: dict[int, float] | None = None) -> float:
    """GFLOPs per token; for per-token-K layers with the experts per token `measured` on the scored
    tokens ({layer: mean}) or, without it, the mean training measured."""
    if moe is None:
        return flops_per_token(info, seq_len)["total"] / 1e9
    layers = factorized_layers(moe)
    first = next(iter(layers.values()))
    per_layer = ({**layer_mean_k(moe, top_k), **(measured or {})} if any(m.adaptive for m in layers.values())
                 else None)
    return flops_per_token(info, seq_len, first.num_experts, top_k, sorted(layers), first.shared_size,
                           top_k_per_layer=per_layer)["total"] / 1e9


def correct_bits(task: TaskData, lls: Sequence[Sequence[float]]) -> str:
    """Each item's main-metric outcome as one character, "1" right and "0" wrong (in item order):
    what paired comparisons and bootstrap intervals need, compact enough to keep in every sweep."""
    acc, norm = score_items(task, lls)
    return "".join("1" if x else "0" for x in (norm if task.spec.has_acc_norm else acc))


def outcomes(value: str) -> torch.Tensor:
    """Per-item outcomes stored as "1"/"0" characters (correct_bits) as a float tensor."""
    return torch.tensor([c == "1" for c in value], dtype=torch.float64)


def resampled_means(dense: torch.Tensor, models: Sequence[torch.Tensor], resamples: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One task's bootstrap: `resamples` draws of its items with replacement, the same draw for the
    dense model's outcomes and every model's; the mean score per draw: (R,), [(R,), ...]."""
    idx = torch.randint(0, dense.numel(), (resamples, dense.numel()), generator=gen)
    return dense[idx].mean(1), [m[idx].mean(1) for m in models]


def above_chance_series(model_means: torch.Tensor, dense_means: torch.Tensor, chance: float) -> torch.Tensor:
    """Above-chance retention per resample; NaN (undefined) where the resampled dense score is at chance."""
    gap = dense_means - chance
    return torch.where(gap > 0, (model_means - chance) / gap.clamp_min(1e-12), torch.full_like(gap, float("nan")))


def bootstrap_means(tasks: dict[str, dict], k: str, above_tasks: Sequence[str], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0, level: float = 0.95) -> dict | None:
    """Paired bootstrap interval of the two headline means at K: the items of each task are resampled
    (the same draw for the dense and the factorized model, tasks independently) and the capped mean
    relative maintenance and the mean above-chance retention (over `above_tasks`, the tasks where it
    is defined for the full item set) are recomputed per resample; percentiles give the interval.
    None when a task lacks per-item outcomes (sweeps written before they were stored)."""
    names = [n for n, t in tasks.items() if k in t.get("k", {})]
    if not names or any("correct" not in (tasks[n].get("dense") or {}) or "correct" not in tasks[n]["k"][k]
                        for n in names):
        return None
    gen = torch.Generator().manual_seed(seed)
    rel, above = torch.zeros(resamples, dtype=torch.float64), torch.zeros(resamples, dtype=torch.float64)
    for n in names:
        d, f = outcomes(tasks[n]["dense"]["correct"]), outcomes(tasks[n]["k"][k]["correct"])
        if d.numel() != f.numel() or d.numel() == 0:
            return None
        dm, (fm,) = resampled_means(d, [f], resamples, gen)
        rel += torch.where(dm > 0, fm / dm.clamp_min(1e-12), torch.ones_like(dm)).clamp(max=1.0)
        if n in above_tasks:  # a resample whose dense mean falls to chance makes the ratio undefined
            above += above_chance_series(fm, dm, tasks[n]["chance"])
    rel /= len(names)
    tail = (1 - level) / 2

    def interval(x: torch.Tensor) -> list[float] | None:
        x = x[~x.isnan()]
        if x.numel() < resamples // 2:
            return None
        return [float(v) for v in torch.quantile(x, torch.tensor([tail, 1 - tail], dtype=x.dtype))]

    out = {"level": level, "resamples": resamples, "relative_capped": interval(rel)}
    if above_tasks:
        above /= len(above_tasks)
        out["above_chance"] = interval(above)
        out["above_chance_resamples"] = int((~above.isnan()).sum())
    return out


def summarize(tasks: dict[str, dict]) -> dict:
    """Per K over the tasks that have it: mean relative maintenance capped at 100% per task and
    uncapped, and mean above-chance retention over the tasks where it is defined; with per-item
    outcomes stored, a paired bootstrap 95% interval of both ("ci95", bootstrap_means)."""
    ks = sorted({k for t in tasks.values() for k in t.get("k", {})}, key=int)
    out = {}
    for k in ks:
        rows = {name: t["k"][k] for name, t in tasks.items() if k in t.get("k", {})}
        rel = [r["relative"] for r in rows.values() if r["relative"] is not None]
        defined = [n for n, r in rows.items() if r["above_chance"] is not None]
        out[k] = {"tasks": sorted(rows),
                  "relative_capped": sum(min(x, 1.0) for x in rel) / len(rel) if rel else None,
                  "relative": sum(rel) / len(rel) if rel else None,
                  "above_chance": (sum(rows[n]["above_chance"] for n in defined) / len(defined)) if defined else None,
                  "above_chance_tasks": defined,
                  "above_chance_excluded": sorted(set(rows) - set(defined))}
        ci = bootstrap_means({n: tasks[n] for n in rows}, k, defined)
        if ci is not None:
            out[k]["ci95"] = ci
    return {"k": out}


def run_sweep(dense: nn.Module, tokenizer, moe: nn.Module | None = None, tasks: str | Sequence[str] = "all",
              ks: Sequence[int] = (), *, limit: int | None = None, seed: int = 0,
              data_dir: str | Path | None = None, split: str | None = None, batch_size: int = 16,
              progress: bool = True, callback: Callback | None = None, dense_cache: dict | None = None) -> dict:
    """Score the dense model once per task and the factorized model at each K, on the same items.

    Returns {"tasks": {task: {"dense": {...}, "k": {"K": {..., "relative", "above_chance"}}, ...}},
    "summary": summarize(...), "settings": {...}}. dense_cache (a dict the caller keeps per dense
    model) reuses dense scores across sweeps. Leaves the factorized model at its original K.
    """
    names = parse_tasks(tasks if isinstance(tasks, str) else list(tasks))
    ks = [int(k) for k in ks] if moe is not None else []
    if moe is not None and not ks:
        raise ValueError("give at least one K to score the factorized model at (e.g. ks=[1, 2])")
    cache = {} if dense_cache is None else dense_cache
    prepared = {n: prepare(tokenizer, load_task(n, data_dir, limit, seed, split), max_length(dense)) for n in names}
    keys = {n: (n, limit, seed, p.task.split, p.task.source) for n, p in prepared.items()}
    total = sum(p.num_batches(batch_size) * (len(ks) + (keys[n] not in cache)) for n, p in prepared.items())
    done = 0

    def step(message: str) -> Callable[[], None]:
        def tick() -> None:
            nonlocal done
            done += 1
            if callback:
                callback(done, total, message)
        return tick

    info = model_info(dense)
    original_k = {i: m.top_k for i, m in factorized_layers(moe).items()} if moe is not None else {}
    out: dict[str, dict] = {}
    try:
        for name, prep in prepared.items():
            if keys[name] not in cache:
                cache[keys[name]] = score_prepared(dense, prep, batch_size, progress, step(f"{name} dense"))
            d = cache[keys[name]]
            log.info("%s dense: acc %.4f, %s %.4f on %d items (%.1f s)", name, d.acc, prep.task.spec.main_metric,
                     d.main, d.n, d.seconds)
            seq_len = max(1, round(prep.mean_tokens))
            entry = {"n": d.n, "limit": limit, "seed": seed, "split": prep.task.split, "source": prep.task.source,
                     "chance": d.chance, "main_metric": prep.task.spec.main_metric, "flops_seq_len": seq_len,
                     "dense": {**d.as_dict(), "gflops_per_token": gflops(info, seq_len),
                               "correct": correct_bits(prep.task, d.loglikelihoods)}, "k": {}}
            for k in ks:
                set_top_k(moe, k)
                with count_active_experts(moe) as active:  # per-token K: what ran on these items
                    f = score_prepared(moe, prep, batch_size, progress, step(f"{name} K={k}"))
                log.info("%s K=%d: acc %.4f, %s %.4f (%.1f s)", name, k, f.acc, prep.task.spec.main_metric, f.main,
                         f.seconds)
                entry["k"][str(k)] = {**f.as_dict(), "relative": relative(f.main, d.main),
                                      "relative_acc": relative(f.acc, d.acc),
                                      "above_chance": above_chance(f.main, d.main, d.chance, d.main_stderr),
                                      "gflops_per_token": gflops(info, seq_len, moe, k, active),
                                      "correct": correct_bits(prep.task, f.loglikelihoods)}
                if active:
                    entry["k"][str(k)]["experts_per_token"] = sum(active.values()) / len(active)
            out[name] = entry
    finally:
        if original_k:
            set_top_k(moe, original_k)
    return {"tasks": out, "summary": summarize(out),
            "settings": {"limit": limit, "seed": seed, "split": split, "batch_size": batch_size, "tasks": names,
                         "ks": ks}}


# ---- held-out text: perplexity, agreement and KL against the dense model ----
def _token_batches(data, tokenizer, max_len: int, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches from texts, a (B, T) tensor, or an iterable of tensors/dicts."""
    if isinstance(data, torch.Tensor):
        data = [data]
    items = list(data)
    if items and all(isinstance(x, str) for x in items):
        if tokenizer is None:
            raise ValueError("heldout_metrics needs a tokenizer to score texts")
        rows = [ids[:max_len] for ids in (tokenizer.encode(t) for t in items) if len(ids) >= 2]
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
            yield ids, mask
        return
    for x in items:
        ids = x["input_ids"] if isinstance(x, dict) else x
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        yield ids, torch.ones_like(ids) if mask is None else mask


@torch.inference_mode()
def heldout_metrics(dense: nn.Module, moe: nn.Module, data, tokenizer=None, max_len: int = 512,
                    batch_size: int = 8, chunk: int = 1024) -> dict:
    """Next-token metrics of the factorized model against the dense one on held-out text.

    data: a list of texts (needs tokenizer), a (B, T) LongTensor, or an iterable of tensors or
    {"input_ids", "attention_mask"} dicts. Returns perplexity, dense_perplexity, agreement (top-1
    next token equal to dense), kl (mean KL(dense || factorized) per token, nats) and tokens.
    """
    device = next(dense.parameters()).device
    nll_d = nll_f = kl = agree = 0.0
    count = 0
    for ids, mask in _token_batches(data, tokenizer, max_len, batch_size):
        ids, mask = ids.to(device), mask.to(device)
        valid = (mask[:, 1:] * mask[:, :-1]).bool()  # (B, T-1): position t predicts token t+1
        targets = ids[:, 1:][valid]  # (M,)
        hd = dense.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][valid]
        hf = moe.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][valid]
        for s in range(0, targets.shape[0], chunk):  # the (M, V) log-probs in slices, to bound memory
            ld = dense.get_output_embeddings()(hd[s:s + chunk]).float().log_softmax(-1)  # (m, V)
            lf = moe.get_output_embeddings()(hf[s:s + chunk]).float().log_softmax(-1)  # (m, V)
            t = targets[s:s + chunk].unsqueeze(1)
            nll_d -= ld.gather(1, t).sum().item()
            nll_f -= lf.gather(1, t).sum().item()
            kl += (ld.exp() * (ld - lf)).sum().item()
            agree += (ld.argmax(-1) == lf.argmax(-1)).sum().item()
        count += targets.shape[0]
    if count == 0:
        raise ValueError("heldout_metrics got no tokens to score (texts need at least 2 tokens)")
    return {"perplexity": math.exp(nll_f / count), "dense_perplexity": math.exp(nll_d / count),
            "agreement": agree / count, "kl": kl / count, "tokens": count}
