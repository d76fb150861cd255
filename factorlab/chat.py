"""Streaming generation for the side-by-side chat: a sampling loop over a KV cache, one token a step.

Both sides (dense | factorized) use the same chat template, sampling settings and seed. A model
shared between sessions is guarded by a lock held for one forward at a time: a stream sets its
own K right before each step, so two streams with different K can interleave safely.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .moe import chosen_lists, record_routing, set_top_k
from .recipe import MAX_SEED

MAX_NEW_TOKENS = 1024


@dataclass
class Sampling:
    """Sampling settings shared by both sides; temperature 0 means greedy."""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in 0..2 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max new tokens must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")


@dataclass
class ModelHandle:
    """A model to generate with; `lock` guards a model whose K other streams may change."""
    model: nn.Module
    tokenizer: object
    lock: threading.Lock | None = None

    def guard(self):
        return self.lock if self.lock is not None else contextlib.nullcontext()


@dataclass
class Step:
    """The reply so far, after one more token (or at the end)."""
    text: str = ""
    pieces: list[str] = field(default_factory=list)  # the text each token added
    experts: list[dict[int, list[int]]] = field(default_factory=list)  # per token: layer -> its top-K experts
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time of the forwards after the prompt whose logits were sampled
    decode_forwards: int = 0
    done: bool = False

    @property
    def new_tokens(self) -> int:
        return len(self.pieces)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: next-token predictions per second of their own forwards (prompt excluded)."""
        return self.decode_forwards / self.decode_s if self.decode_forwards and self.decode_s > 0 else None


def flatten_content(content) -> str:
    """A message's content as text: a string, or Gradio 6's list of {"type": "text", "text": ...} blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(flatten_content(block) for block in content)
    return "" if content is None else str(content)


# Shown instead of a reply that ended before its first token (never sent back to the model).
EMPTY_REPLY = "(empty reply: the model ended its turn at once)"


def shown_text(step) -> str:
    """What a chat bubble shows for a Step: its text, or EMPTY_REPLY once it finished with none."""
    return step.text if step.text or not step.done else EMPTY_REPLY


def to_messages(history: list | None) -> list[dict[str, str]]:
    """Chatbot history (messages, possibly normalised by Gradio) -> [{"role", "content": str}]."""
    out = []
    for message in history or []:
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if role in ("system", "user", "assistant"):
            text = flatten_content(content)
            out.append({"role": role, "content": "" if role == "assistant" and text == EMPTY_REPLY else text})
    return out


def prompt_ids(tokenizer, messages: list[dict[str, str]], max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the conversation in the model's chat template, ready for the reply: (1, T).

    Beyond max_tokens the oldest turns are left out, whole (a cut inside the template would drop its
    start); a last message too long on its own is an error naming its length and the limit."""
    messages = list(messages)
    while True:
        ids = tokenizer(_template(tokenizer, messages), add_special_tokens=False, return_tensors="pt").input_ids
        if not max_tokens or ids.shape[1] <= max_tokens:
            return ids
        older = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if not older:
            raise ValueError(f"the message is {ids.shape[1]:,} tokens with the chat template; this model reads at "
                             f"most {max_tokens:,} before its reply (fewer max new tokens leave more): shorten it")
        del messages[older[0]]


def _template(tokenizer, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # a base model without a template: a plain transcript
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a reply: the model's EOS ids and the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One token id from next-token logits (V,): greedy at temperature 0, else nucleus sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = (logits.float() / sampling.temperature).softmax(-1)  # (V,)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def _forward(handle: ModelHandle, ids: torch.Tensor, cache, top_k: int | None,
             trace: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor], float]:
    """One forward under the model's lock, with this stream's K; returns last logits, routing, seconds."""
    with handle.guard():
        start = time.perf_counter()
        if top_k is not None:
            set_top_k(handle.model, top_k)
        routing: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            if trace:
                with record_routing(handle.model) as rec:
                    out = handle.model(input_ids=ids, past_key_values=cache, use_cache=True)
                routing = rec.stacked()[0]  # layer -> (T, K)
            else:
                out = handle.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits[0, -1], routing, time.perf_counter() - start


def stream_reply(handle: ModelHandle, messages: list[dict[str, str]], sampling: Sampling,
                 top_k: int | None = None, trace: bool = False) -> Iterator[Step]:
    """Generate a reply token by token, yielding the Step after each token and a final one (done=True).

    top_k: the K to run a factorized model at (None for dense). trace: record each reply token's
    experts (the routing of the token as it is read back in, as in the routing heatmap).
    """
    from transformers import DynamicCache

    model, tok = handle.model, handle.tokenizer
    limit = getattr(model.config, "max_position_embeddings", None)
    ids = prompt_ids(tok, messages, limit - sampling.max_new_tokens - 1 if limit else None)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(sampling.seed))
    cache = DynamicCache(config=model.config)
    stops = stop_ids(model, tok)
    step, token_ids = Step(), []
    logits, _, step.prefill_s = _forward(handle, ids.to(device), cache, top_k, False)
    while True:
        token = sample_next(logits.cpu(), sampling, generator)
        if token in stops:
            break
        token_ids.append(token)
        text = tok.decode(token_ids, skip_special_tokens=True)
        step.pieces.append(text[len(step.text):])
        step.text = text
        more = step.new_tokens < sampling.max_new_tokens
        if more or trace:  # read the token back in (at the end only to record its experts)
            logits, routing, seconds = _forward(handle, torch.tensor([[token]], device=device), cache, top_k, trace)
            if trace:
                step.experts.append({i: chosen_lists(r)[0] for i, r in routing.items()})
            if more:
                step.decode_s += seconds
                step.decode_forwards += 1
        yield step
        if not more:
            break
    step.done = True
    yield step


def side_by_side(left: Iterator[Step], right: Iterator[Step]) -> Iterator[tuple[Step, Step]]:
    """Advance two streams in turn (one token each), so each one's timing covers only its own forwards."""
    current = [Step(), Step()]
    streams = [left, right]
    while any(s is not None for s in streams):
        for i, stream in enumerate(streams):
            if stream is None:
                continue
            step = next(stream, None)
            if step is None or step.done:
                streams[i] = None
                current[i] = step or current[i]
                current[i].done = True
            else:
                current[i] = step
        yield current[0], current[1]
