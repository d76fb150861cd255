"""Build lm-evaluation-harness's own requests for the exported documents and compare them with factorlab's.

Run with a separate venv that has lm-eval (never the factorlab venv), after export.py:
    HF_DATASETS_OFFLINE=1 /tmp/lmeval/bin/python tests/lmeval_crosscheck/compare_requests.py /tmp/factorlab_lmeval
Checks, per document, the (context, continuation) strings, the choice strings acc_norm divides by,
and the gold index, for each task's installed lm-eval config with only the data source replaced.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

TASKS = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "piqa": "piqa", "hellaswag": "hellaswag",
         "boolq": "boolq", "winogrande": "winogrande", "openbookqa": "openbookqa"}


def build(manager: TaskManager, name: str, data_file: Path, split: str) -> ConfigurableTask:
    """The installed task config, reading `data_file` as its evaluation split, zero-shot."""
    cfg = load_yaml(manager._entry(name).yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: str(data_file)}},
               training_split=None, validation_split="validation" if split == "validation" else None,
               test_split="test" if split == "test" else None, fewshot_split=None, fewshot_config=None)
    return ConfigurableTask(config=cfg)


def lmeval_items(task: ConfigurableTask) -> list[dict]:
    items = []
    for i, doc in enumerate(task.eval_docs):
        ctx = task.fewshot_context(doc, 0)
        args = [inst.arguments for inst in task.construct_requests(doc, ctx, metadata=(task.config.task, i, 1))]
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        items.append({"requests": [list(a) for a in args], "choices": task.doc_to_choice(doc), "gold": gold})
    return items


def compare(name: str, ours: list[dict], theirs: list[dict]) -> int:
    bad = 0
    if len(ours) != len(theirs):
        print(f"{name}: {len(ours)} factorlab items vs {len(theirs)} lm-eval items")
        return 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for field in ("requests", "choices", "gold"):
            if a[field] != b[field]:
                bad += 1
                if bad <= 3:
                    print(f"{name} item {i} {field} differs:\n  factorlab {a[field]!r}\n  lm-eval   {b[field]!r}")
    print(f"{name}: {len(ours)} items, {sum(len(x['requests']) for x in ours)} requests, "
          f"{'all identical' if not bad else f'{bad} differences'}")
    return bad


def main() -> int:
    folder = Path(sys.argv[1])
    ours = json.loads((folder / "factorlab_requests.json").read_text())
    manager = TaskManager()
    failures = 0
    for name, lm_name in TASKS.items():
        if name in ours:
            failures += compare(name, ours[name], lmeval_items(build(manager, lm_name, folder / f"{name}.jsonl",
                                                                      "validation")))
    if "mmlu" in ours:  # lm-eval has one task per subject (its description names the subject)
        by_subject = defaultdict(list)
        for line in (folder / "mmlu.jsonl").read_text().splitlines():
            by_subject[json.loads(line)["subject"]].append(line)
        theirs = []
        for subject in sorted(by_subject):
            path = folder / f"mmlu_{subject}.jsonl"
            path.write_text("\n".join(by_subject[subject]) + "\n")
            theirs += lmeval_items(build(manager, f"mmlu_{subject}", path, "test"))
        failures += compare("mmlu", [{k: v for k, v in x.items() if k != "subject"} for x in ours["mmlu"]], theirs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
