"""THE settings of a factorlab run: one frozen, keyword-only `Recipe` and its named presets.

A Recipe holds everything a user chooses to factorize a model and train it (the split, the training
text, the training). Its defaults are the measured default recipe (docs/research.md); every default
literal of the library, the CLI and the app is written here once. The CLI's flags and the app's
controls are generated from the fields' metadata; a run stores its recipe once (runs.Run.recipe).

Checks in two steps: the Recipe checks itself on construction (types, choices, ranges), and
`validate(info)` checks it against a model's shapes (N divides the routed width, layers exist, ...).
Pure Python: importing this module imports neither torch nor gradio.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

SPLITS = ("contiguous", "random", "cluster")
OUTPUT_MODES = ("scaled", "gated")
MODES = ("experts", "router", "none")
E2E_PARAMS = ("down", "all")
MAX_PER_TOKEN_EXPERTS = 8  # per-token K scores every set of experts: 2^N of them per token
MAX_LAYER_INDEX = 10_000  # a layer spec naming more is a typo, not a model
MAX_SEED = 2**32 - 1  # what every seeded generator takes

SECTIONS = ("factorize", "text", "training")


def _field(default: Any, help: str, *, section: str, label: str, everyday: bool = False,
           flag: str | None = None, choices: tuple | None = None) -> Any:
    """A Recipe field with what the CLI and the app need to show it: one line of help, a short label,
    its section, its choices, and whether it is an everyday setting (a CLI flag, the app's main panel)."""
    return field(default=default, metadata={"help": help, "section": section, "label": label, "everyday": everyday,
                                            "flag": flag, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How to factorize a model and train its routers and experts. Defaults: the measured default recipe."""

    # ---- factorize: which model, how its FFNs are cut ----
    model: str = _field("default", "the dense model: 'default' (embedded SmolLM2-135M-Instruct), a Hub id or a "
                        "local folder", section="factorize", label="Model", everyday=True, flag="--model")
    num_experts: int = _field(4, "N: experts per FFN layer (must divide the FFN width left after the shared "
                              "neurons)", section="factorize", label="N experts", everyday=True, flag="--experts")
    top_k: int = _field(2, "K: experts per token, 1..N (with per-token K: the mean number per token)",
                        section="factorize", label="K active", everyday=True, flag="--k")
    split: str = _field("cluster", "how neurons are grouped into experts: cluster (neurons that fire together, "
                        "on calibration text), random (seeded), contiguous (FactorLLM's code)",
                        section="factorize", label="Split", everyday=True, flag="--split", choices=SPLITS)
    layers: str = _field("1-", "layers to factorize: '1-' (all but layer 0, which stays dense), 'all', or "
                         "e.g. '0-3,10'", section="factorize", label="Layers", everyday=True, flag="--layers")
    shared_size: int = _field(256, "always-on shared neurons per layer, chosen by their mean share of each "
                              "token's FFN output energy (0 = pure N experts)", section="factorize",
                              label="Shared neurons", everyday=True, flag="--shared")
    output_mode: str = _field("scaled", "how selected experts combine: scaled (N/K x their sum, FactorLLM) or "
                              "gated (weighted by the router's scores)", section="factorize", label="Output",
                              choices=OUTPUT_MODES)
    calibration_tokens: int = _field(4096, "tokens of calibration text for the cluster split and the shared "
                                     "neurons", section="factorize", label="Calibration tokens")
    # ---- training text ----
    data: str = _field("builtin", "training text: builtin (= everyday), everyday, local, selfgen, a mix such as "
                       "everyday+selfgen, a .txt/.jsonl path, or hub:ID[:config]", section="text",
                       label="Training text", everyday=True, flag="--data")
    train_tokens: int = _field(32768, "training tokens", section="text", label="Train tokens", everyday=True,
                               flag="--tokens")
    heldout_tokens: int = _field(8192, "held-out tokens (other documents) for perplexity, agreement and KL "
                                 "against the dense model; 0 = none", section="text", label="Held-out tokens")
    seq_len: int = _field(256, "tokens per training row", section="text", label="Sequence length")
    # ---- training ----
    mode: str = _field("experts", "experts: PAR router + least-squares refit of the experts (the method); router: "
                       "PAR routers only; none: untrained router (FactorLLM's Ex0)", section="training",
                       label="Training", everyday=True, flag="--mode", choices=MODES)
    router_steps: int = _field(600, "Adam steps per layer for the PAR router (0: it keeps its random init)",
                               section="training", label="Router steps / layer")
    router_lr: float = _field(1e-2, "router learning rate (linear warm-up, cosine decay)", section="training",
                              label="Router learning rate")
    router_batch: int = _field(1024, "tokens per router step", section="training", label="Router batch")
    route_weight: float = _field(0.05, "weight of the PAR router loss (the paper's)", section="training",
                                 label="Router loss weight")
    balance_weight: float = _field(0.01, "weight of the balance loss (the paper's)", section="training",
                                   label="Balance loss weight")
    ridge: float = _field(1e-3, "refit regulariser toward the original weights, relative to the Gram matrix's "
                          "mean diagonal", section="training", label="Refit ridge")
    per_token_rounds: int = _field(5, "per-token K: rounds of (best expert sets -> router -> thresholds -> refit) "
                                   "that let each token run 0..N experts, K on average; 0 = plain top-K",
                                   section="training", label="Per-token K rounds", everyday=True,
                                   flag="--per-token-rounds")
    per_token_router_steps: int = _field(200, "router Adam steps in each per-token round", section="training",
                                         label="Router steps / per-token round")
    e2e_steps: int = _field(0, "end-to-end logit distillation steps after the layer-wise pass (KL to the dense "
                            "model; the paper tunes experts end to end)", section="training",
                            label="End-to-end steps")
    e2e_lr: float = _field(3e-4, "end-to-end learning rate", section="training", label="End-to-end learning rate")
    e2e_batch: int = _field(2, "sequences per end-to-end step", section="training", label="End-to-end batch")
    e2e_params: str = _field("down", "what end-to-end distillation tunes: down (the down projections) or all "
                             "(gate/up too)", section="training", label="End-to-end tunes", choices=E2E_PARAMS)
    minutes: float | None = _field(None, "wall-clock budget from the split on: gradient phases stop there and "
                                   "end-to-end distillation fits into it (None = no limit)", section="training",
                                   label="Minutes (0 = no limit)", everyday=True, flag="--minutes")
    seed: int = _field(0, "seed of the split, the router init, the training and the text sample",
                       section="training", label="Seed", everyday=True, flag="--seed")

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f, getattr(self, f.name))
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is not a choice: use one of {', '.join(choices)}")
        if not self.model.strip():
            raise ValueError("model is empty: use 'default', a Hub id or a local folder")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"K (top_k) must be in 1..{self.num_experts} (the number of experts), got {self.top_k}")
        if self.per_token and self.num_experts > MAX_PER_TOKEN_EXPERTS:
            raise ValueError(f"per-token K scores every set of experts, so at most {MAX_PER_TOKEN_EXPERTS} experts; "
                             f"got {self.num_experts}: use fewer experts or per_token_rounds=0 (plain top-K)")
        _positive(self, "calibration_tokens", 256)
        _positive(self, "seq_len", 16)
        if self.train_tokens < self.seq_len:
            raise ValueError(f"train_tokens must be at least one row of {self.seq_len} tokens, got {self.train_tokens}")
        if self.heldout_tokens and self.heldout_tokens < self.seq_len:
            raise ValueError(f"heldout_tokens must be 0 or at least one row of {self.seq_len} tokens, "
                             f"got {self.heldout_tokens}")
        for name in ("shared_size", "router_steps", "per_token_rounds", "e2e_steps", "seed"):
            _positive(self, name, 0)
        for name in ("router_batch", "per_token_router_steps", "e2e_batch"):
            _positive(self, name, 1)
        for name in ("router_lr", "e2e_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("route_weight", "balance_weight", "ridge"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be positive, or None for no limit; got {self.minutes}")
        parse_layers(self.layers, MAX_LAYER_INDEX + 1)  # the syntax now; the range in validate()

    # ---- derived ----
    @property
    def per_token(self) -> bool:
        """Whether training switches the layers to per-token K (only the `experts` mode fits experts)."""
        return self.mode == "experts" and self.per_token_rounds > 0

    def validate(self, info: dict) -> list[int]:
        """Check the recipe against a model's shapes (models.model_info); returns the layers to factorize."""
        inter, num_layers = info["intermediate_size"], info["num_layers"]
        if not 0 <= self.shared_size < inter:
            raise ValueError(f"shared_size must be in 0..{inter - 1} (the FFN width is {inter}), got {self.shared_size}")
        routed = inter - self.shared_size
        if routed % self.num_experts:
            options = [n for n in range(2, 65) if routed % n == 0][:10]
            raise ValueError(f"{self.num_experts} experts do not divide the FFN width {routed}"
                             f"{f' (after {self.shared_size} shared neurons)' if self.shared_size else ''}: "
                             f"choose N from {options}.")
        return parse_layers(self.layers, num_layers)

    # ---- conversions ----
    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (checked like a new Recipe); unknown names are an error."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        """A Recipe from stored or typed values (missing fields take their defaults)."""
        _check_names(values)
        return cls(**values)

    def differences(self, other: "Recipe | None" = None) -> dict[str, Any]:
        """The fields whose values differ from `other` (default: Recipe())."""
        other = other or Recipe()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}

    def preset_name(self) -> str | None:
        """The preset this recipe is exactly, if any (a model change keeps the name)."""
        for name in PRESETS:
            if preset(name, model=self.model) == self:
                return name
        return None

    def describe(self) -> list[str]:
        """One line per field: name, value, what it does (`python -m factorlab recipe`)."""
        width = max(len(f.name) for f in fields(self))
        lines = []
        for section in SECTIONS:
            lines.append(f"# {section}")
            for f in fields(self):
                if f.metadata["section"] == section:
                    value = json.dumps(getattr(self, f.name))
                    lines.append(f"{f.name:<{width}} = {value:<12} {f.metadata['help']}")
        return lines


# ---------------------------------------------------------------- presets
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("the measured default recipe: 4 experts + 256 shared neurons in layers 1-29, per-token K "
                "with mean 2, 32k tokens of everyday text (8-14 min on 2 CPU cores)", {}),
    "quick": ("a model to look at in 1.5 minutes of training on 2 CPU cores (demos, teaching): the default's shape, "
              "less text and fewer steps",
              {"train_tokens": 8192, "heldout_tokens": 2048, "calibration_tokens": 2048, "router_steps": 150,
               "per_token_rounds": 1, "per_token_router_steps": 100}),
    "chat": ("the default trained to chat like the dense model: half its text the dense model's own chat replies "
             "(selfgen, sampled once and cached) and 40 end-to-end distillation steps (issue 30, docs/research.md Q)",
             {"data": "everyday+selfgen", "e2e_steps": 40}),
    "paper": ("FactorLLM's setting, 1R4E1K: contiguous split of every layer, no shared neurons, plain top-1, "
              "scaled output, PAR router + expert refit",
              {"split": "contiguous", "layers": "all", "shared_size": 0, "top_k": 1, "per_token_rounds": 0}),
    "portable": ("the default's shape with plain top-2 and gated output: its runs export exactly to a standard "
                 "transformers MoE (Qwen2-MoE) of the dense model's size (`python -m factorlab export`)",
                 {"output_mode": "gated", "per_token_rounds": 0}),
    "no-par": ("the default with an untrained router (its random init, plain top-K) and the same split, shared "
               "neurons and expert refit: the baseline PAR is measured against",
               {"router_steps": 0, "per_token_rounds": 0}),
}


def preset(name: str, **overrides: Any) -> Recipe:
    """A named preset as a Recipe, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return Recipe(**{**PRESETS[name][1], **_checked(overrides)})


# ---------------------------------------------------------------- fields as data
def recipe_fields(everyday: bool | None = None) -> list[dataclasses.Field]:
    """The Recipe's fields in order (only the everyday ones, or only the others, when asked)."""
    return [f for f in fields(Recipe) if everyday is None or f.metadata["everyday"] == everyday]


def field_type(f: dataclasses.Field) -> type:
    """int, float or str: what a typed-in value of this field is converted to."""
    text = str(f.type)
    return int if text == "int" else float if text.startswith("float") else str


def parse_value(name: str, text: str) -> Any:
    """A typed-in value (`--set name=value`, a text box) converted to the field's type."""
    f = _by_name(name)
    kind = field_type(f)
    if text.strip().lower() in ("none", "null", "") and f.default is None:
        return None
    try:
        return kind(float(text)) if kind is int and float(text) == int(float(text)) else kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected {'a whole number' if kind is int else 'a number'}") from None


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """['key=value', ...] -> {key: typed value}; names are checked against the Recipe's fields."""
    out: dict[str, Any] = {}
    for item in items:
        if item.count("=") < 1:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set router_steps=300 "
                             "(`python -m factorlab recipe` lists the keys)")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(key.strip(), value.strip())
    return out


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all' -> every layer; '1-' -> layer 1 to the last; '0-3,7' -> those layers; checked, sorted."""
    text = (spec or "").strip()
    if text in ("", "all"):
        return list(range(num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-")
                lo, hi = int(a), (int(b) if b.strip() else num_layers - 1)
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"layers {spec!r}: write 'all', '1-' or ranges such as '0-3,10'") from None
        if not 0 <= lo <= hi < num_layers:
            raise ValueError(f"layers {spec!r} out of range: this model has layers 0..{num_layers - 1}")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise ValueError(f"layers {spec!r} names no layer: write 'all', '1-' or e.g. '0-3,10'")
    return sorted(chosen)


def layers_text(layers: list[int]) -> str:
    """The inverse of parse_layers for display: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' ('' for none)."""
    if not layers:
        return ""
    parts, start = [], layers[0]
    for a, b in zip(layers, list(layers[1:]) + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def _by_name(name: str) -> dataclasses.Field:
    for f in fields(Recipe):
        if f.name == name:
            return f
    raise ValueError(f"unknown recipe setting {name!r}: `python -m factorlab recipe` lists them")


def _check_names(values: dict[str, Any]) -> None:
    for name in values:
        _by_name(name)


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    _check_names(values)
    return values


def _check_type(f: dataclasses.Field, value: Any) -> None:
    kind = field_type(f)
    if value is None and f.default is None:
        return
    ok = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else \
        (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else isinstance(value, str)
    if not ok:
        raise ValueError(f"{f.name} must be {'a whole number' if kind is int else 'a number' if kind is float else 'text'}"
                         f", got {value!r}")


def _positive(recipe: Recipe, name: str, least: int) -> None:
    if getattr(recipe, name) < least:
        raise ValueError(f"{name} must be at least {least}, got {getattr(recipe, name)}")
