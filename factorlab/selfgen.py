"""Self-distillation text: the dense model answers a prompt set; sampled once, cached, extended on demand.

The cache lives under cache_dir()/data/selfgen/<key>/batch-NNNNNN.jsonl, one file per generation
batch written atomically; the key covers the model's weights, the tokenizer's chat template, the
prompts, the seed and the sampling settings. The sampled text depends on the device that wrote it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import StoppingCriteria

from .models import cache_dir

log = logging.getLogger(__name__)

TEMPERATURE, TOP_P, MAX_NEW_TOKENS, GEN_BATCH = 0.8, 0.95, 256, 64
ProgressFn = Callable[[int, int], None]  # (amount so far, amount wanted), after each generated batch


class SelfGenStream:
    """One deterministic, append-only stream of (prompt, sampled reply) records, cached in batch files.

    Record k answers prompt perm_r[k % P] of round r = k // P (perm_r: a seeded shuffle); batch b
    holds records [b*B, (b+1)*B) and is sampled with its own seed, so extending the cache later
    gives exactly the records a single long run would have given.
    """

    def __init__(self, model: nn.Module, tokenizer, prompts: list[str], seed: int, settings: dict):
        self.model, self.tokenizer, self.prompts, self.seed, self.settings = model, tokenizer, prompts, seed, settings
        key = digest({"model": model_fingerprint(model), "vocab": len(tokenizer),
                      "template": getattr(tokenizer, "chat_template", None) or "", "prompts": prompts,
                      "seed": seed, **settings, "format": 1})
        self.dir = cache_dir() / "data" / "selfgen" / key
        self.records: list[dict] = self._read_cache()

    def _read_cache(self) -> list[dict]:
        records = []
        for b in itertools.count():
            path = self.dir / f"batch-{b:06d}.jsonl"
            if not path.exists():
                break
            try:
                batch = [json.loads(line) for line in path.read_text().splitlines()]
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.warning("selfgen cache %s unreadable (%s): regenerating from there", path, exc)
                break
            records.extend(batch)
        return records

    def texts(self, limit: int, unit: str, progress: ProgressFn | None = None) -> list[str]:
        """The first records whose total `unit` ("tokens", "chars" or "docs") reaches limit; generates the rest."""
        def covered() -> tuple[int, int]:  # (records needed, amount they hold)
            total = 0
            for i, r in enumerate(self.records):
                if total >= limit:
                    return i, total
                total += 1 if unit == "docs" else r[unit]
            return len(self.records), total

        needed, have = covered()
        while have < limit:
            base = have

            def tick(batch_tokens: int) -> None:  # mid-batch: progress, and a chance for a job to cancel
                progress(min(limit, base + batch_tokens) if unit == "tokens" else base, limit)

            started = time.perf_counter()
            made = self._generate_batch(tick if progress is not None else None)
            log.info("selfgen: %d tokens in %.1f s (%.1f tokens/s) -> %s", made, time.perf_counter() - started,
                     made / max(time.perf_counter() - started, 1e-9), self.dir)
            needed, have = covered()
            if progress is not None:
                progress(min(have, limit), limit)
        return [r["text"] for r in self.records[:needed]]

    def iterate(self, first_tokens: int, progress: ProgressFn | None) -> Iterator[str]:
        """Documents in order, generated lazily: first enough for first_tokens, then 25% more at a time."""
        target, given = max(1, first_tokens), 0
        while True:
            texts = self.texts(target, "tokens", progress)
            yield from texts[given:]
            given = len(texts)
            target = int(target * 1.25) + 1

    def _prompt_order(self, start: int, count: int) -> list[str]:
        n = len(self.prompts)
        out = []
        for k in range(start, start + count):
            perm = list(range(n))
            random.Random(f"{self.seed}:{k // n}").shuffle(perm)
            out.append(self.prompts[perm[k % n]])
        return out

    def _generate_batch(self, on_step: Callable[[int], None] | None) -> int:
        """Sample the next batch of records, cache it, return how many tokens it generated.

        on_step(tokens so far, prompts included) is called every few decoding steps; if it raises
        (a cancelled job), nothing of this batch is kept.
        """
        batch_size = int(self.settings["batch_size"])
        b = len(self.records) // batch_size
        prompts = self._prompt_order(b * batch_size, batch_size)
        tok = self.tokenizer
        chats = [prompt_text(tok, p) for p in prompts]
        enc = tok(chats, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        device = next(self.model.parameters()).device
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        callbacks = [] if on_step is None else [
            _EveryFewSteps(torch.tensor(sorted(eos_ids), device=device), int(enc["attention_mask"].sum()), on_step)]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(int.from_bytes(hashlib.sha256(f"{self.seed}:{b}".encode()).digest()[:7], "big"))
            out = self.model.generate(input_ids=enc["input_ids"].to(device),
                                      attention_mask=enc["attention_mask"].to(device),
                                      do_sample=True, temperature=float(self.settings["temperature"]),
                                      top_p=float(self.settings["top_p"]),
                                      max_new_tokens=int(self.settings["max_new_tokens"]), pad_token_id=pad,
                                      stopping_criteria=callbacks)
        width = enc["input_ids"].shape[1]
        batch = []
        for i, prompt in enumerate(prompts):
            prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
            reply_ids = out[i, width:].tolist()
            end = next((j + 1 for j, t in enumerate(reply_ids) if t in eos_ids), None)
            reply_ids = reply_ids[:end] if end else reply_ids
            text = tok.decode(prompt_ids + reply_ids, skip_special_tokens=False)
            batch.append({"index": b * batch_size + i, "prompt": prompt, "finished": end is not None,
                          "reply": tok.decode(reply_ids, skip_special_tokens=True), "text": text,
                          "tokens": len(prompt_ids) + len(reply_ids), "chars": len(text)})
        atomic_write_text(self.dir / f"batch-{b:06d}.jsonl", "".join(json.dumps(r) + "\n" for r in batch))
        self.records = self.records[: b * batch_size] + batch
        return int(sum(r["tokens"] for r in batch) - enc["attention_mask"].sum())


class _EveryFewSteps(StoppingCriteria):
    """Counts the tokens sampled so far and reports them every `every` steps; never stops generation."""

    def __init__(self, eos_ids: torch.Tensor, start: int, callback: Callable[[int], None], every: int = 8):
        self.eos_ids, self.count, self.callback, self.every = eos_ids, start, callback, every
        self.alive: torch.Tensor | None = None  # (B,) rows that have not produced EOS yet
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1]  # (B,)
        alive = torch.ones_like(last, dtype=torch.bool) if self.alive is None else self.alive
        self.count += int(alive.sum())
        self.alive = alive & ~torch.isin(last, self.eos_ids)
        self.steps += 1
        if self.steps % self.every == 0:
            self.callback(self.count)
        return torch.zeros_like(last, dtype=torch.bool)


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: its chat template with the generation prompt, if it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt + "\n\n"


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the weights: every parameter's name, shape and 64 sampled values."""
    h = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def digest(obj) -> str:
    """A short, stable hash of any JSON-able object (a cache key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a temporary file and rename it into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
