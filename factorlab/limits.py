"""What a host lets one visitor of the lab ask for: quotas read from environment variables.

The lab is meant to be shared (a Hugging Face Space, a classroom server: one process, one runs
folder, two cores), so every request the page accepts is bounded. Each quota is one environment
variable; 0 lifts it. The defaults suit a public Space on two cores and let every preset run. The
command line is not limited: whoever runs it owns the machine. The host's other choice read here:
what the app trains by itself when it starts with no run (`warm_start`, FACTORLAB_WARM_START).

Pure Python: importing this module imports neither torch nor gradio.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

# env var -> (default, what it bounds); README "Hosting" lists the same table (tests check it).
QUOTAS: dict[str, tuple[int, str]] = {
    "FACTORLAB_MAX_JOBS_PER_SESSION": (2, "queued or running jobs one browser session may have"),
    "FACTORLAB_MAX_QUEUE": (8, "queued or running jobs in the whole process"),
    "FACTORLAB_MAX_TRAIN_TOKENS": (131072, "tokens a training job reads: train + held-out + calibration"),
    "FACTORLAB_MAX_STEPS": (4000, "optimiser steps per layer of a training job: router steps + per-token "
                                  "rounds x their router steps + end-to-end steps"),
    "FACTORLAB_MAX_EVAL_ITEMS": (1000, "benchmark items per task of an evaluation job (0 items = all is "
                                       "allowed only when the task has no more)"),
    "FACTORLAB_MAX_BENCH_TOKENS": (2048, "prefill + decode tokens of a speed benchmark"),
    "FACTORLAB_MAX_BENCH_REPEATS": (10, "repeats of a speed benchmark"),
    "FACTORLAB_MAX_CHAT_CHARS": (4000, "characters of one chat message or routed text (a conversation: ten "
                                       "times as many)"),
    "FACTORLAB_MAX_NEW_TOKENS": (512, "new tokens of one chat reply"),
}

# What the app trains by itself at start when the runs folder holds no usable run (factorlab.warmstart);
# README "Hosting" lists the same choices (tests check it).
WARM_START_VAR = "FACTORLAB_WARM_START"
WARM_START_DEFAULT = "quick"
WARM_START_MODES: dict[str, str] = {
    "off": "nothing: a visitor trains or loads a run first",
    "quick": "the quick preset (a model to look at in about 1.5 minutes on 2 cores), then the default recipe",
    "default": "the default recipe only (8-14 minutes on 2 cores before the first model)",
}

# Bounds no host needs to change: beyond them a value is a typo or an attack, not a setting.
SANE = {"seq_len": 4096, "router_batch": 65536, "e2e_batch": 256, "per_token_rounds": 50}


class QuotaError(ValueError):
    """A request exceeds what the host allows; the message names the limit and its variable."""


@dataclass(frozen=True)
class Limits:
    """The quotas in force (0 = unlimited), read from the environment by `limits()`."""
    jobs_per_session: int
    queue: int
    train_tokens: int
    steps: int
    eval_items: int
    bench_tokens: int
    bench_repeats: int
    chat_chars: int
    new_tokens: int

    @staticmethod
    def variable(name: str) -> str:
        return "FACTORLAB_MAX_" + name.upper()

    def check(self, name: str, value: int, what: str) -> None:
        """Raise QuotaError when `value` exceeds the quota `name` (a field of Limits)."""
        cap = getattr(self, name)
        if cap and value > cap:
            raise QuotaError(f"{what} is {value:,}, above this server's limit of {cap:,} "
                             f"({self.variable(name)}; the host can raise it, or run the command line)")


def limits() -> Limits:
    """The quotas from the environment now (a bad value is an error naming the variable)."""
    values = {}
    for f in fields(Limits):
        var = Limits.variable(f.name)
        default = QUOTAS[var][0]
        text = os.environ.get(var, "").strip()
        try:
            values[f.name] = int(text) if text else default
        except ValueError:
            raise QuotaError(f"{var}={text!r} is not a whole number (0 = unlimited)") from None
        if values[f.name] < 0:
            raise QuotaError(f"{var}={text!r} must be 0 (unlimited) or a positive whole number")
    return Limits(**values)


def check_recipe(recipe) -> None:
    """Raise QuotaError when a Recipe asks for more than the host allows (the page's training jobs)."""
    quota = limits()
    tokens = recipe.train_tokens + recipe.heldout_tokens + recipe.calibration_tokens
    quota.check("train_tokens", tokens, "train + held-out + calibration tokens")
    steps = recipe.router_steps + recipe.per_token_rounds * recipe.per_token_router_steps + recipe.e2e_steps
    quota.check("steps", steps, "router steps + per-token rounds x their router steps + end-to-end steps per layer")
    for name, cap in SANE.items():
        if getattr(recipe, name) > cap:
            raise QuotaError(f"{name}={getattr(recipe, name):,} is above the most factorlab accepts ({cap:,})")


def warm_start() -> str:
    """FACTORLAB_WARM_START as one of WARM_START_MODES (unset or empty: `quick`); anything else is an error
    naming the variable and the choices."""
    text = os.environ.get(WARM_START_VAR, "").strip()
    mode = text.lower() or WARM_START_DEFAULT
    if mode not in WARM_START_MODES:
        choices = "; ".join(f"{name}: {what}" for name, what in WARM_START_MODES.items())
        raise ValueError(f"{WARM_START_VAR}={text!r} is not one of {', '.join(WARM_START_MODES)} ({choices})")
    return mode
