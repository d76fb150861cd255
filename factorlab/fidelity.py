"""Chat fidelity: how closely the factorized model chats like the dense one, on a shipped prompt set.

Prompts (factorlab/prompts/chat_eval.jsonl: questions, instructions, short writing, code, small talk;
none of them a training prompt or a benchmark item) go through the chat template. Per K:
  (a) teacher forcing on the dense model's own greedy replies: top-1 agreement and KL(dense || factorized);
  (b) the dense model's NLL per token of the factorized model's greedy replies minus that of its own replies
      (0 = the factorized replies are as likely to the dense model as its own);
  (c) the share of prompts whose greedy reply is identical to the dense one for its first 8 / 16 / 32 tokens.
Intervals: a bootstrap over prompts. Greedy replies are decoded in left-padded batches.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .chat import prompt_ids, stop_ids
from .evaluate import BOOTSTRAP_RESAMPLES
from .models import cache_dir
from .moe import factorized_layers, set_top_k
from .selfgen import atomic_write_text, digest, model_fingerprint

log = logging.getLogger(__name__)

CHAT_PROMPTS = Path(__file__).parent / "prompts" / "chat_eval.jsonl"
REPLY_TOKENS = 64  # greedy reply length measured (a reply may end earlier, at its stop token)
PREFIXES = (8, 16, 32)  # identical-reply lengths reported
ProgressFn = Callable[[str, float], None]  # (what is being done, fraction done)


def load_chat_prompts(path: str | Path | None = None) -> list[dict]:
    """The fidelity prompts: [{"category", "prompt"}, ...] from a .jsonl file (default: the shipped set)."""
    path = Path(path or CHAT_PROMPTS)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records or any(not str(r.get("prompt", "")).strip() for r in records):
        raise ValueError(f"{path}: every line needs a non-empty \"prompt\"")
    return records


# ---------------------------------------------------------------- replies and teacher forcing
def _encode(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [prompt_ids(tokenizer, [{"role": "user", "content": p}])[0].tolist() for p in prompts]


@torch.inference_mode()
def greedy_replies(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = REPLY_TOKENS,
                   batch_size: int = 16, tick: Callable[[], None] | None = None) -> list[list[int]]:
    """Greedy reply token ids per prompt (ids of the templated prompt); a reply keeps its stop token.
    tick() is called before each batch (a job's progress and cancel check)."""
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    for s in range(0, len(prompts), batch_size):
        if tick:
            tick()
        chunk = prompts[s:s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every reply starts at column `width`
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stops),
                             temperature=None, top_p=None, top_k=None)
        for row in out[:, width:].tolist():
            end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
            replies.append(row[:end])
    return replies


def _batches(prompts: Sequence[list[int]], replies: Sequence[list[int]], batch_size: int):
    """Right-padded (ids, mask, [(row, first reply position, reply length)]) batches of prompt + reply."""
    for s in range(0, len(prompts), batch_size):
        rows = [p + r for p, r in zip(prompts[s:s + batch_size], replies[s:s + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        spans = [(i, len(p), len(r)) for i, (p, r) in enumerate(zip(prompts[s:s + batch_size],
                                                                     replies[s:s + batch_size]))]
        yield ids, mask, spans


def reply_hidden(model: nn.Module, prompts: Sequence[list[int]], replies: Sequence[list[int]],
                 batch_size: int = 16) -> list[torch.Tensor]:
    """Per prompt, the final hidden states (n, H) at the positions that predict the reply's n tokens."""
    device = next(model.parameters()).device
    out = []
    for ids, mask, spans in _batches(prompts, replies, batch_size):
        hidden = model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             use_cache=False).last_hidden_state  # (B, T, H)
        # position t predicts token t+1: the reply's n tokens are predicted at positions start-1 .. start+n-2
        out += [hidden[i, start - 1:start + n - 1] for i, start, n in spans]
    return out


@torch.inference_mode()
def teacher_forced(dense: nn.Module, moe: nn.Module | None, prompts: Sequence[list[int]],
                   replies: Sequence[list[int]], batch_size: int = 16,
                   dense_hidden: list[torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Per prompt on the given replies: the dense model's NLL sum, token count and, with a factorized model,
    its top-1 agreements with the dense model and its KL(dense || factorized) sum. dense_hidden: the dense
    model's reply_hidden on these replies, when already computed (it is the same for every K)."""
    out: dict[str, list[float]] = {"nll": [], "count": [], "agree": [], "kl": []}
    dense_hidden = dense_hidden or reply_hidden(dense, prompts, replies, batch_size)
    moe_hidden = reply_hidden(moe, prompts, replies, batch_size) if moe is not None else [None] * len(replies)
    for reply, hd, hf in zip(replies, dense_hidden, moe_hidden):
        ld = dense.get_output_embeddings()(hd).float().log_softmax(-1)  # (n, V)
        target = torch.tensor(reply, device=ld.device).unsqueeze(1)  # (n, 1)
        out["nll"].append(-float(ld.gather(1, target).sum()))
        out["count"].append(float(len(reply)))
        if hf is not None:
            lf = moe.get_output_embeddings()(hf).float().log_softmax(-1)  # (n, V)
            out["agree"].append(float((ld.argmax(-1) == lf.argmax(-1)).sum()))
            out["kl"].append(float((ld.exp() * (ld - lf)).sum()))
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two replies share (a whole equal reply counts as infinitely long)."""
    if list(a) == list(b):
        return 1 << 30
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------- summaries with intervals
def _interval(values: torch.Tensor, level: float = 0.95) -> list[float]:
    tail = (1 - level) / 2
    return [float(v) for v in torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype))]


def summarize(per_prompt: dict, dense: dict, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """The three measures of one K with 95% bootstrap intervals over prompts (the same draws for all)."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in per_prompt.items()}
    d = {k: torch.tensor(v, dtype=torch.float64) for k, v in dense.items()}
    n = t["agree"].numel()
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))  # (R, P)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> tuple[float, list[float]]:
        return float(num.sum() / den.sum()), _interval(num[idx].sum(1) / den[idx].sum(1))

    agreement, agreement_ci = ratio(t["agree"], d["count"])
    kl, kl_ci = ratio(t["kl"], d["count"])
    gap = t["own_nll"].sum() / t["own_count"].sum() - d["nll"].sum() / d["count"].sum()
    gap_draws = t["own_nll"][idx].sum(1) / t["own_count"][idx].sum(1) - d["nll"][idx].sum(1) / d["count"][idx].sum(1)
    out = {"agreement": agreement, "agreement_ci": agreement_ci, "kl": kl, "kl_ci": kl_ci,
           "nll_gap": float(gap), "nll_gap_ci": _interval(gap_draws), "identical": {}, "identical_ci": {}}
    for p in PREFIXES:
        same = (t["prefix"] >= p).double()
        out["identical"][str(p)] = float(same.mean())
        out["identical_ci"][str(p)] = _interval(same[idx].mean(1))
    return out


# ---------------------------------------------------------------- the measure
def _dense_replies(dense: nn.Module, tokenizer, prompts: list[list[int]], texts: list[str], max_new_tokens: int,
                   batch_size: int, tick: Callable[[], None]) -> list[list[int]]:
    """The dense model's greedy replies, cached under cache_dir()/chat_fidelity (they depend on the model only)."""
    key = digest({"model": model_fingerprint(dense), "vocab": len(tokenizer), "prompts": texts,
                  "template": getattr(tokenizer, "chat_template", None) or "", "tokens": max_new_tokens,
                  "device": str(next(dense.parameters()).device), "dtype": str(next(dense.parameters()).dtype),
                  "batch": batch_size, "format": 1})
    path = cache_dir() / "chat_fidelity" / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        replies = greedy_replies(dense, tokenizer, prompts, max_new_tokens, batch_size, tick)
        atomic_write_text(path, json.dumps(replies))
        return replies


def chat_fidelity(dense: nn.Module, moe: nn.Module, tokenizer, ks: Sequence[int], *,
                  prompts: list[dict] | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                  progress: ProgressFn | None = None) -> dict:
    """Chat fidelity of the factorized model at each K (see the module docstring). The model's K is restored."""
    records = prompts or load_chat_prompts()
    max_new_tokens = max_new_tokens or REPLY_TOKENS
    texts = [r["prompt"] for r in records]
    ids = _encode(tokenizer, texts)
    say = progress or (lambda _what, _frac: None)
    steps = 1 + 2 * len(ks)
    say("dense greedy replies", 0.0)
    dense_replies = _dense_replies(dense, tokenizer, ids, texts, max_new_tokens, batch_size,
                                   lambda: say("dense greedy replies", 0.0))
    with torch.inference_mode():
        dense_hidden = reply_hidden(dense, ids, dense_replies, batch_size)  # (n, H) per prompt, reused at every K
    base = teacher_forced(dense, None, ids, dense_replies, batch_size, dense_hidden)
    dense_stats = {"nll": base["nll"], "count": base["count"]}
    before = {i: m.top_k for i, m in factorized_layers(moe).items()}
    by_k, per_k, replies_k = {}, {}, {}
    try:
        for j, k in enumerate(ks):
            set_top_k(moe, int(k))
            say(f"K={k}: teacher forcing on the dense replies", (1 + 2 * j) / steps)
            forced = teacher_forced(dense, moe, ids, dense_replies, batch_size, dense_hidden)
            say(f"K={k}: greedy replies", (2 + 2 * j) / steps)
            own = greedy_replies(moe, tokenizer, ids, max_new_tokens, batch_size,
                                 lambda j=j, k=k: say(f"K={k}: greedy replies", (2 + 2 * j) / steps))
            judged = teacher_forced(dense, None, ids, own, batch_size)  # the dense model reads them
            per_prompt = {"agree": forced["agree"], "kl": forced["kl"], "own_nll": judged["nll"],
                          "own_count": judged["count"],
                          "prefix": [min(common_prefix(a, b), 1 << 20) for a, b in zip(dense_replies, own)]}
            by_k[str(k)] = summarize(per_prompt, dense_stats, resamples, seed)
            per_k[str(k)] = per_prompt
            replies_k[str(k)] = [tokenizer.decode(r, skip_special_tokens=True) for r in own]
    finally:
        set_top_k(moe, before)
    say("done", 1.0)
    return {"by_k": by_k,
            "settings": {"prompts": len(texts), "reply_tokens": max_new_tokens, "prefixes": list(PREFIXES),
                         "resamples": resamples, "seed": seed, "decoding": "greedy, left-padded batches of "
                         f"{batch_size}", "prompt_set": "shipped" if prompts is None else "given"},
            "prompts": records,
            "dense": {"nll_per_token": sum(base["nll"]) / sum(base["count"]), "tokens": int(sum(base["count"])),
                      "per_prompt": dense_stats,
                      "replies": [tokenizer.decode(r, skip_special_tokens=True) for r in dense_replies]},
            "per_prompt": per_k, "replies": replies_k}


def paired_difference(a: dict, b: dict, k: str, measure: str = "agreement", resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> dict:
    """a minus b at K on the same prompts (two chat_fidelity results), with a paired bootstrap interval.

    measure: "agreement", "kl", or "identical_P" (P one of PREFIXES)."""
    pa, pb = a["per_prompt"][k], b["per_prompt"][k]
    count = torch.tensor(a["dense"]["per_prompt"]["count"], dtype=torch.float64)
    if a["prompts"] != b["prompts"] or count.tolist() != b["dense"]["per_prompt"]["count"]:
        raise ValueError("the two fidelity results were measured on different prompts or dense replies")
    n = count.numel()
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    if measure.startswith("identical_"):
        p = int(measure.split("_")[1])
        xa = (torch.tensor(pa["prefix"]) >= p).double()
        xb = (torch.tensor(pb["prefix"]) >= p).double()
        value, draws = float(xa.mean() - xb.mean()), xa[idx].mean(1) - xb[idx].mean(1)
    else:
        key = {"agreement": "agree", "kl": "kl"}[measure]
        xa, xb = torch.tensor(pa[key], dtype=torch.float64), torch.tensor(pb[key], dtype=torch.float64)
        value = float((xa.sum() - xb.sum()) / count.sum())
        draws = (xa[idx].sum(1) - xb[idx].sum(1)) / count[idx].sum(1)
    return {"difference": value, "ci": _interval(draws), "ahead": float((draws > 0).double().mean())}
