"""The logic behind the Gradio lab, importable without gradio: shared models, runs, the recipe on the page,
routing views.

Models load once per process and are shared by every session: the dense model (read-only, no
lock) and the factorized model of each run in use (a lock, because a stream sets K on it before
each forward). Background jobs (training, evaluations, benchmarks: factorlab.lab_jobs) build their own
copies through factorlab.workflows, the only writer of the run store. The page's settings are one Recipe:
`control_values` is what its controls show, `recipe_from_controls` reads them back, by field name.
Per-user state (the current run) lives in the app's gr.State; jobs in factorlab.jobs.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat import ModelHandle
from .data import BUILTIN_DEFAULT
from .flops import flops_per_token, mean_k_plan
from .jobs import get_manager
from .limits import limits
from .models import DEFAULT_HUB_ID, HUB_MODELS, ModelLoadError, load_model, model_info
from .moe import chosen_lists, factorized_layers, record_routing, set_top_k
from .recipe import Recipe, field_type, layers_text, recipe_fields
from .runs import Run, RunError, list_runs, load_moe, runs_root, sanitize_name
from .runs import load_run as load_run_or_folder

MODEL_CHOICES = ("default", *HUB_MODELS)
_BUILTIN_TEXT = {"everyday": "everyday English (non-evaluated datasets)", "local": "local prose (Python docs, fast)",
                 "selfgen": "text the model writes itself (slow)",
                 "everyday+selfgen": "everyday English + the model's own chat, half each (the chat preset; slow the "
                                     "first time)"}
_BUILTINS = {"builtin": f"built-in: {_BUILTIN_TEXT[BUILTIN_DEFAULT]} — default",
             **{kind: f"built-in: {text}" for kind, text in _BUILTIN_TEXT.items() if kind != BUILTIN_DEFAULT}}
# The page's training-text choices: value (what Recipe.data becomes) -> label; the recipe's default first.
DATA_SOURCES = {**_BUILTINS, "upload": "uploaded file (.txt / .jsonl)", "hub": "Hugging Face dataset"}
DATA_CONTROLS = ("data_kind", "upload", "hub_id")  # the three widgets that show the recipe's `data`
UPLOAD_SUFFIXES = (".txt", ".md", ".jsonl")
MAX_ROUTE_TOKENS = 160
MOE_CACHE_SIZE = 3


class LabError(ValueError):
    """Something the user must fix; the message says what and how."""


_start_lock = threading.Lock()  # a name is checked free and its job queued (or a run deleted) at once
WARM_START_OWNER = "factorlab:warm-start"  # the owner of the jobs the app queues by itself (factorlab.warmstart)


def one_line(message: str, limit: int = 400) -> str:
    """A message as one line of at most `limit` characters: an echoed value longer than 60 characters
    (a pasted book, a long path) is cut to its start and its length."""
    def cut(match: re.Match) -> str:
        word = match.group(0)
        return f"{word[:40]}…[{len(word):,} characters]"

    text = re.sub(r"\S{61,}", cut, " ".join(str(message).split()))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def user_message(exc: BaseException) -> str | None:
    """The message to show for an error the user can act on, or None for a bug."""
    from .data import DataError
    from .jobs import UnknownJobError
    from .tasks import TaskDataError

    if isinstance(exc, (LabError, ValueError, ModelLoadError, RunError, DataError, TaskDataError, UnknownJobError)):
        return one_line(str(exc))
    if isinstance(exc, OSError):
        return one_line(f"{exc.strerror or exc} ({exc.filename or 'file system'}): check the path and its permissions.")
    return None


# ---------------------------------------------------------------- shared models
_models_lock = threading.Lock()
_moe_cache: OrderedDict[tuple, ModelHandle] = OrderedDict()
_info_cache: dict[str, dict] = {}


def dense_handle(spec: str) -> ModelHandle:
    """The process-wide dense model (read-only, so no lock)."""
    loaded = load_model(spec)
    return ModelHandle(loaded.model, loaded.tokenizer)


def dense_info(spec: str) -> dict:
    """Shapes of a dense model (models.model_info), computed once per model."""
    if spec not in _info_cache:
        _info_cache[spec] = model_info(load_model(spec).model)
    return _info_cache[spec]


def models_root() -> Path:
    """Where the page finds local model folders by name: $FACTORLAB_MODELS, else ./models."""
    return Path(os.environ.get("FACTORLAB_MODELS") or "models").expanduser()


def page_model(spec: str) -> str:
    """The model the page may load for what a visitor typed: 'default', a Hub id (owner/name) or a folder
    of the models folder by its name. Any other path is refused with one message, whether it exists or not:
    the page never reveals or reads server folders (the command line takes any path)."""
    text = (spec or "").strip() or "default"
    if text == "default":
        return text
    parts = text.split("/")
    if (len(text) > 200 or len(parts) > 2 or text.startswith("~") or "\\" in text or ":" in text
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts)):
        raise LabError(f"model {spec[:80]!r}: the page loads 'default', a Hub id such as {DEFAULT_HUB_ID}, or "
                       f"a folder of the models folder by its name ({models_root().name}/, FACTORLAB_MODELS); "
                       "other paths are refused (the command line takes any folder)")
    local = models_root() / text
    return str(local.resolve()) if (local / "config.json").is_file() else text


def checked_run_name(name: str) -> str:
    """A run's name as the page may use it: a folder name in the runs folder, never a path."""
    text = name if isinstance(name, str) else ""  # exactly: 'victim\n' is not the run 'victim'
    try:
        if text and sanitize_name(text) == text:
            return text
    except RunError:
        pass
    raise LabError(f"no run named {name!r} in the runs folder: choose one from the list")


def load_run(name: str) -> Run:
    """A run of the runs folder, by its name only: the page never reaches another folder by a path."""
    return load_run_or_folder(checked_run_name(name))


def run_handle(name: str, trained: bool = True) -> ModelHandle:
    """The run's factorized model, shared and locked; trained=False gives the same partition with an
    untrained router and untuned experts (FactorLLM's Ex0, "no PAR")."""
    run = load_run(name)
    key = (run.name, str(run.path), run.config.get("created"), trained)
    with _models_lock:
        if key in _moe_cache:
            _moe_cache.move_to_end(key)
            return _moe_cache[key]
    loaded = load_model(run.recipe.model)
    handle = ModelHandle(load_moe(run, loaded.model, trained=trained), loaded.tokenizer, threading.Lock())
    with _models_lock:
        _moe_cache[key] = handle
        while len(_moe_cache) > MOE_CACHE_SIZE:
            _moe_cache.popitem(last=False)
    return handle


def forget_run(name: str) -> None:
    """Drop a run's shared models (after it was deleted or replaced)."""
    with _models_lock:
        for key in [k for k in _moe_cache if k[0] == name]:
            del _moe_cache[key]


def run_shape(name: str) -> dict:
    """Model, N, K, factorized layers, shared width, training mode and per-token K means of a run."""
    run = load_run(name)
    recipe = run.recipe
    return {"model": recipe.model, "num_experts": recipe.num_experts, "top_k": recipe.top_k, "layers": run.layers,
            "shared_size": recipe.shared_size, "mode": recipe.mode, "per_token_k": run.per_token_k}


def run_flops(info: dict, shape: dict, k: int, seq_len: int) -> dict:
    """FLOPs per token of a run at K (per-token K: the mean experts per token training measured)."""
    return flops_per_token(info, seq_len, shape["num_experts"], k, shape["layers"], shape["shared_size"],
                           top_k_per_layer=mean_k_plan(shape["per_token_k"], k))


def check_chat(message: str, conversations: list[list[dict]], max_new: int) -> None:
    """Refuse a chat turn beyond the host's quotas: the message, each side's conversation (ten messages'
    worth) and the reply's length."""
    quota = limits()
    quota.check("chat_chars", len(message), "the message's length in characters")
    said = max(sum(len(m["content"]) for m in side) for side in conversations)
    if quota.chat_chars and said > 10 * quota.chat_chars:
        raise LabError(f"the conversation holds {said:,} characters, more than this server keeps "
                       f"(10 x FACTORLAB_MAX_CHAT_CHARS = {10 * quota.chat_chars:,}): press Clear")
    quota.check("new_tokens", max_new, "max new tokens")


def heldout_at(name: str, k: int) -> dict | None:
    """The run's held-out metrics at K (perplexity, agreement, KL against dense), if measured."""
    value = (load_run(name).metrics.get("heldout") or {}).get(str(k))
    return value or None


def chat_fidelity_at(name: str, k: int) -> dict | None:
    """The run's chat fidelity at K (fidelity.chat_fidelity: agreement, KL, NLL gap, identical replies), if measured."""
    return _chat_fidelity(load_run(name), k)


def _chat_fidelity(run: Run, k: int) -> dict | None:
    stored = run.metrics.get("chat_fidelity") or {}
    value = (stored.get("by_k") or {}).get(str(k))
    return {**value, "prompts": stored["settings"]["prompts"]} if value else None


def chat_fidelity_text(name: str, k: int) -> str:
    """One line for under the factorized chat: the run's measured chat fidelity at K, or how to measure it."""
    run = load_run(name)
    f = _chat_fidelity(run, k)
    # runs trained without the model's own chat are pointed at the preset that trains on it (docs/research.md Q)
    hint = "" if "selfgen" in run.recipe.data else " · the <i>chat</i> preset trains closer chat"
    if f is None:
        return (f"chat fidelity at K={k} not measured yet: Trade-offs → Measure chat fidelity, or "
                f"`python -m factorlab fidelity {name}`{hint}")
    lo, hi = f["agreement_ci"]
    return (f"chat fidelity at K={k} ({f['prompts']} shipped prompts, greedy): top-1 agreement with dense on its "
            f"replies <b>{f['agreement']:.0%}</b> [{lo:.0%}, {hi:.0%}], replies identical for 16 tokens "
            f"<b>{f['identical']['16']:.0%}</b> of prompts{hint}")


def dense_ffn_gflops(spec: str, seq_len: int = 512) -> float:
    """Active FFN GFLOPs per token of the dense model."""
    return flops_per_token(dense_info(spec), seq_len)["ffn"] / 1e9


def ffn_gflops(name: str, k: int, seq_len: int = 512) -> tuple[float, float]:
    """Active FFN GFLOPs per token: (dense, the run at K)."""
    shape = run_shape(name)
    info = dense_info(shape["model"])
    moe = run_flops(info, shape, k, seq_len)
    return flops_per_token(info, seq_len)["ffn"] / 1e9, moe["ffn"] / 1e9


# ---------------------------------------------------------------- runs
RUN_COLUMNS = ["run", "recipe", "model", "N", "K", "split", "layers", "training", "dense ppl",
               "held-out by K: perplexity (agreement)", "eval: mean relative at K", "created"]


def run_rows() -> list[list]:
    """One row per run on disk (RUN_COLUMNS), newest first; a corrupt run shows its error."""
    rows = []
    for r in list_runs():
        row = dict.fromkeys(RUN_COLUMNS)
        row.update({"run": r.name, "recipe": "corrupt", "model": r.error} if r.run is None else _run_row(r.run))
        rows.append(list(row.values()))
    return rows


def _run_row(run: Run) -> dict:
    recipe, m = run.recipe, run.metrics
    held = sorted(((int(k), v) for k, v in (m.get("heldout") or {}).items() if v))
    mean = (((m.get("eval") or {}).get("summary") or {}).get("k") or {}).get(str(recipe.top_k)) or {}
    return {"run": run.name, "recipe": recipe.preset_name() or "custom", "model": recipe.model,
            "N": recipe.num_experts, "K": recipe.top_k, "split": recipe.split, "layers": layers_text(run.layers),
            "training": recipe.mode, "dense ppl": f"{held[0][1]['dense_perplexity']:.2f}" if held else None,
            "held-out by K: perplexity (agreement)":
                " · ".join(f"K={k}: {v['perplexity']:.1f} ({pct(v['agreement'])})" for k, v in held) or None,
            "eval: mean relative at K": pct(mean.get("relative_capped")),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.config.get("created", 0)))}


def run_names() -> list[str]:
    """Names of the readable runs, newest first."""
    return [r.name for r in list_runs() if r.ok]


def recipe_summary(recipe: Recipe) -> str:
    """Markdown: the preset a recipe is, or `custom` and the fields where it differs from the default."""
    name = recipe.preset_name()
    if name:
        return f"recipe **{name}** (preset)"
    changed = {k: v for k, v in recipe.differences().items() if k != "model"}
    return "recipe **custom**: " + ", ".join(f"`{k}={v}`" for k, v in changed.items()) + " (default otherwise)"


def describe_run(name: str | None) -> str:
    """Markdown: the run's recipe and headline metrics."""
    if not name:
        return f"**{no_run_note()}**"
    run = load_run(name)
    r, m = run.recipe, run.metrics
    shared = f" + {r.shared_size} shared neurons" if r.shared_size else ""
    lines = [f"**Current run: `{run.name}`** — {r.model}, {recipe_summary(r)}: N={r.num_experts} experts{shared}, "
             f"K={r.top_k}, {r.split} split over {len(run.layers)} layer(s), training: {r.mode}, output: {r.output_mode}"]
    if run.per_token_k:
        means = [v[r.top_k - 1] for v in run.per_token_k.values()]
        lines[0] += (f", per-token K (each token runs the experts its router scores above a threshold; "
                     f"{sum(means) / len(means):.2f} experts per token at K={r.top_k}, measured in training)")
    if run.removed_settings:
        lines.append("- made with settings factorlab no longer has (measured worse; docs/research.md): " +
                     ", ".join(f"`{k}={v}`" for k, v in run.removed_settings.items()))
    for k, h in sorted((m.get("heldout") or {}).items(), key=lambda kv: int(kv[0])):
        if h:
            lines.append(f"- held-out at K={k}: perplexity {h['perplexity']:.2f} (dense {h['dense_perplexity']:.2f}), "
                         f"top-1 agreement with dense {pct(h['agreement'])}, KL {h['kl']:.3f} nats/token")
    return "\n".join(lines)


def no_run_note() -> str:
    """What a page with no run says: the warm start's first model is coming, or how to get a run."""
    warming = [j for j in get_manager().jobs() if j.owner == WARM_START_OWNER and not j.is_finished]
    if warming:
        return (f"No run yet: the lab is training its first model (`{warming[-1].name}`, see the bar); it becomes "
                "current here when done. Meanwhile the dense side of Chat answers.")
    return "No run loaded. Train one (or load one from the list) in Factorize & train."


def delete(name: str) -> None:
    """Delete a run from disk (atomically), unless a job is using it."""
    from .runs import delete_run

    if not name:
        raise LabError("choose a run to delete")
    name = checked_run_name(name)  # as jobs hold it; a corrupt run can be deleted too
    with _start_lock:  # no job of this run can be queued between the check and the delete
        busy = [j for j in get_manager().jobs() if not j.is_finished and j.params.get("run") == name]
        if busy:
            raise LabError(f"run {name!r} is in use by a {busy[0].kind} job: cancel it first")
        try:
            delete_run(name)
        except OSError as exc:
            raise LabError(f"cannot delete {name!r}: {readonly_hint(exc)}") from exc
    forget_run(name)


def readonly_hint(exc: OSError) -> str:
    """Why the runs folder cannot be written, and what to do."""
    return (f"the runs folder {runs_root().resolve()} is not writable ({exc.strerror or exc}). Existing runs can "
            "still be browsed and chatted with; set FACTORLAB_RUNS to a writable folder to save new ones.")


def check_writable() -> None:
    """Fail fast, with the fix, when new runs or metrics could not be saved."""
    root = runs_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check."):
            pass
    except OSError as exc:
        raise LabError(readonly_hint(exc)) from exc


def pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def interval_text(interval: list[float] | None) -> str:
    """A 95% bootstrap interval after a percentage (evaluate.bootstrap_means), or nothing."""
    return "" if not interval else f" (95% CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f}%)"


# ---------------------------------------------------------------- the recipe on the page
def control_values(recipe: Recipe) -> dict[str, Any]:
    """What the page's controls show for a recipe, by field name: `data` as the three DATA_CONTROLS
    widgets, no time limit (minutes None) as 0."""
    values = {f.name: getattr(recipe, f.name) for f in recipe_fields() if f.name != "data"}
    values["minutes"] = recipe.minutes or 0
    if recipe.data.startswith("hub:"):
        return {**values, "data_kind": "hub", "upload": None, "hub_id": recipe.data.removeprefix("hub:")}
    if recipe.data in _BUILTINS:
        return {**values, "data_kind": recipe.data, "upload": None, "hub_id": ""}
    if Path(recipe.data).suffix.lower() in UPLOAD_SUFFIXES:
        return {**values, "data_kind": "upload", "upload": recipe.data, "hub_id": ""}
    raise LabError(f"the page cannot show the training text {recipe.data!r}: train it with "
                   f"`python -m factorlab train NAME --data {recipe.data}`")


CUSTOM = "custom"  # the preset selector's value when the controls show no preset exactly


def preset_label(values: dict[str, Any]) -> str:
    """The preset the page's controls show exactly (the model aside), else CUSTOM; half-typed values
    are CUSTOM too. An upload or Hub text is never a preset, so it is not checked here."""
    if values.get("data_kind") not in _BUILTINS:
        return CUSTOM
    try:
        return recipe_from_controls(values).preset_name() or CUSTOM
    except LabError:
        return CUSTOM


def recipe_from_controls(values: dict[str, Any]) -> Recipe:
    """The Recipe the page's controls show (control_values' keys; a missing field keeps its default).

    Whole numbers are checked here and 0 or empty minutes mean no limit; a LabError names the setting."""
    values = dict(values)
    if "data_kind" in values:
        values["data"] = data_source(values.pop("data_kind"), values.pop("upload", None), values.pop("hub_id", None))
    fields = {f.name: f for f in recipe_fields()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise LabError(f"unknown settings {', '.join(unknown)}: the recipe has {', '.join(fields)}")
    typed = {name: _typed(fields[name], value) for name, value in values.items()}
    if "model" in typed:
        typed["model"] = page_model(typed["model"])
    try:
        return Recipe(**typed)
    except ValueError as exc:
        raise LabError(str(exc)) from None


def _typed(f, value: Any) -> Any:
    """A control's value as the field's type (Number boxes may send 4.0 or None, text boxes spaces)."""
    what = f"{f.metadata['label']} ({f.name})"
    kind = field_type(f)
    if f.default is None and value in (None, "", 0):
        return None
    if kind is int:
        return _int(value, what)
    if kind is float:
        return _float(value, what)
    return str(value if value is not None else "").strip()


def _float(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise LabError(f"{what} must be a finite number, got {value!r}")
    return number


def _int(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise LabError(f"{what} must be a whole number, got {value!r}")
    return int(number)


# ---------------------------------------------------------------- factorize
def quick_factorize(recipe: Recipe) -> tuple[str, list[list]]:
    """Factorize without saving: the K=N exactness check as markdown and the FLOPs table per K."""
    from .workflows import factorize_run

    result = factorize_run(recipe)
    result.pop("_moe")
    diff = result["max_abs_logit_diff"]
    verdict = "exact (fp32 rounding)" if diff < 1e-3 else "NOT exact: something is wrong"
    shared = f" + {recipe.shared_size} shared" if recipe.shared_size else ""
    text = (f"**K=N exactness check:** max |logit difference| = **{diff:.2e}** over {result['tokens']} tokens "
            f"(largest |logit| {result['max_abs_logit']:.1f}) — {verdict}.\n\n"
            f"{result['model_source']}: {recipe.split} split of {len(result['layers'])} layer(s) into "
            f"{recipe.num_experts} experts of {result['expert_size']} neurons{shared}, in "
            f"{result['factorize_seconds']:.1f} s. Nothing was saved: *Start training* saves a run.")
    table = result["flops"]
    rows = [["dense", round(table["dense"]["ffn"] / 1e9, 4), round(table["dense"]["total"] / 1e9, 4), "100%", "100%"]]
    rows += [[f"K={k}", round(r["ffn"] / 1e9, 4), round(r["total"] / 1e9, 4), pct(r["ffn_ratio"]),
              pct(r["total_ratio"])] for k, r in table["k"].items()]
    return text, rows


# ---------------------------------------------------------------- training jobs
def data_source(kind: str, upload: str | None, hub_id: str | None) -> str:
    """The recipe's `data` for the page's choice (a DATA_SOURCES key), checked now. An upload stays where
    Gradio put it (a rejected one is removed there); a training job takes a copy (`keep_upload`)."""
    from .data import DataError, load_texts

    if kind in ("builtin", *_BUILTIN_TEXT):
        return kind
    if kind == "upload":
        if not upload:
            raise LabError("choose a .txt or .jsonl file to upload, or pick a built-in source")
        path = Path(upload)
        if not _is_upload(path):  # a client sent a server path instead of uploading a file
            raise LabError("the training file must be uploaded with the file picker (server paths are refused)")
        try:
            if path.suffix.lower() not in UPLOAD_SUFFIXES:
                raise LabError(f"{path.name}: unsupported file type; upload .txt (paragraphs separated by blank "
                               "lines) or .jsonl (a `text` field per line)")
            load_texts(str(path), max_chars=1)  # raises DataError: empty, binary, not UTF-8, too large, bad JSON
        except (LabError, DataError):
            if path.parent != _uploads_dir():  # Gradio's copy of a rejected upload is of no further use
                path.unlink(missing_ok=True)
            raise
        return str(path)
    if kind == "hub":
        name = (hub_id or "").strip()
        if not name:
            raise LabError("type a Hugging Face dataset id, e.g. HuggingFaceFW/fineweb-edu:sample-10BT")
        source = name if name.startswith("hub:") else f"hub:{name}"
        load_texts(source, max_chars=1)  # offline, unknown or benchmark datasets fail here, with the fix
        return source
    raise LabError(f"unknown data source {kind!r}: choose one of {', '.join(DATA_SOURCES)}")


def _uploads_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "uploads"


def _is_upload(path: Path) -> bool:
    """Whether a file path came from an upload: Gradio's upload folder, or an upload a run already keeps."""
    roots = [Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio"), _uploads_dir()]
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def keep_upload(recipe: Recipe) -> Recipe:
    """The recipe with an uploaded training file copied into the cache by its content (Gradio deletes its
    own copy after a while, and a run names its text); other recipes unchanged."""
    path = Path(recipe.data)
    if path.suffix.lower() not in UPLOAD_SUFFIXES or path.parent == _uploads_dir():
        return recipe
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = _uploads_dir() / f"{digest}{path.suffix.lower()}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    return recipe.replace(data=str(target))


# ---------------------------------------------------------------- routing
@dataclass
class Routing:
    """Routing of one text: tokens, layers, per layer chosen experts (per token a list, best first: K of
    them, or 0..N with per-token K) and probabilities (T, N)."""
    tokens: list[str]
    layers: list[int]
    top_k_index: dict[int, list[list[int]]]
    probs: dict[int, list[list[float]]]
    num_experts: int

    def loads(self) -> dict[int, list[float]]:
        """Per layer, the share of (token, slot) assignments each expert receives."""
        out = {}
        for i in self.layers:
            counts = torch.bincount(torch.tensor([e for row in self.top_k_index[i] for e in row], dtype=torch.long),
                                    minlength=self.num_experts).float()
            out[i] = (counts / counts.sum()).tolist()
        return out

    def load_entropy(self) -> list[float]:
        """Per layer, the entropy of the load over log N: 1 = even, 0 = one expert takes everything."""
        out = []
        for share in self.loads().values():
            out.append(-sum(p * math.log(p) for p in share if p > 0) / math.log(self.num_experts))
        return out


def route(name: str, text: str, top_k: int, trained: bool = True) -> Routing:
    """Run the run's factorized model (or its untrained twin) on `text` at K and record the routing."""
    if not name:
        raise LabError("load a run first (Factorize & train → runs on disk → Load)")
    if not (text or "").strip():
        raise LabError("type some text (or pick an example) to route")
    limits().check("chat_chars", len(text), "the text's length in characters")
    k, n = _int(top_k, "K"), run_shape(name)["num_experts"]
    if not 1 <= k <= n:
        raise LabError(f"K must be in 1..{n} (this run's experts), got {k}")
    handle = run_handle(name, trained)
    ids = handle.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :MAX_ROUTE_TOKENS]
    with handle.guard():
        set_top_k(handle.model, k)
        with torch.inference_mode(), record_routing(handle.model) as rec:
            handle.model(input_ids=ids, use_cache=False)
    chosen, probs = rec.stacked()
    layers = sorted(chosen)
    return Routing([handle.tokenizer.decode([t]) for t in ids[0].tolist()], layers,
                   {i: chosen_lists(chosen[i]) for i in layers}, {i: probs[i].tolist() for i in layers},
                   factorized_layers(handle.model)[layers[0]].num_experts)


def newest_run() -> str | None:
    """The most recently created readable run, if any."""
    names = run_names()
    return names[0] if names else None


def env_flag(name: str) -> bool:
    """True when an environment variable is set to something other than 0/false/no."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
