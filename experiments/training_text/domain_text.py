"""Training text from the benchmarks' own distributions: validation items that are NOT evaluated.

Usage: PYTHONPATH=. python experiments/training_text/domain_text.py OUT.jsonl [LIMIT] [SEED] [--with-everyday]

The research question (README, tenth round): how much of what the factorized model loses on the
benchmarks is the *kind* of training text? `everyday` holds no narrative (HellaSwag), no physical
how-to (PIQA) and no encyclopedia passages (BoolQ). This writes, as `--data` JSONL, the items of
HellaSwag, PIQA, Winogrande, BoolQ and ARC-Easy that the evaluation's seeded subset (LIMIT items per
task with SEED, default 500 and 0: the grid's) leaves out, each rendered as plain text with its gold
answer (the dense model's FFN outputs on it are the training targets; the answers are never a
label). Items that are near-duplicates of an evaluated one (same HellaSwag source video, same
Winogrande option pair, same BoolQ passage, same PIQA goal) are left out as well. OpenBookQA and
ARC-Challenge have no item left (their whole splits are evaluated); MMLU is not used. The script
checks that no written text is also the text of a scored item (exact duplicates inside a split
would pass the index filter) and records per task how many items it wrote; an evaluation with
another LIMIT or SEED would overlap these items, so the file is only for runs scored with the
same LIMIT and SEED.
--with-everyday appends the `everyday` documents too (a half-half mix by records is not attempted:
`everyday` simply adds its documents to the pool the training rows are drawn from).
"""
import json
import sys
from pathlib import Path

from factorlab.tasks import hellaswag_preprocess, load_docs, subset_indices

PER_DOC = 8  # records per document, as `everyday` (the held-out split is by document)
MAX_RECORDS = {"hellaswag": 2000, "piqa": 2000, "winogrande": 2000, "boolq": 500, "arc_easy": 2000}


def group(task: str, d: dict):
    """What makes two items near-duplicates: an item sharing it with an evaluated one is not written.
    HellaSwag: the same source video/article (consecutive items repeat each other's sentences);
    Winogrande: the same pair of options (twin sentences differ in one word); BoolQ: the same
    passage; PIQA: the same goal; ARC-Easy: the question itself."""
    if task == "hellaswag":
        return d["source_id"]
    if task == "winogrande":
        return frozenset((d["option1"].strip().lower(), d["option2"].strip().lower()))
    if task == "boolq":
        return d["passage"].strip()[:200]
    if task == "piqa":
        return d["goal"].strip().lower()
    return d["question"].strip().lower()


def render(task: str, d: dict) -> str:
    if task == "hellaswag":
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        return hellaswag_preprocess(d["activity_label"] + ": " + ctx + " " + d["endings"][int(d["label"])])
    if task == "piqa":
        return f"{d['goal'].strip()} {[d['sol1'], d['sol2']][int(d['label'])].strip()}"
    if task == "winogrande":
        option = d["option1"] if str(d["answer"]) == "1" else d["option2"]
        return d["sentence"].replace("_", option)
    if task == "boolq":
        gold = int(d["label"]) if "label" in d else int(bool(d["answer"]))
        return f"{d['passage'].strip()} {d['question'].strip()}? {['No', 'Yes'][gold]}."
    if task == "arc_easy":
        c = d["choices"]
        return f"{d['question'].strip()} {dict(zip(c['label'], c['text']))[d['answerKey']].strip()}."
    raise ValueError(task)


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    out = Path(args[0])
    limit = int(args[1]) if len(args) > 1 else 500
    seed = int(args[2]) if len(args) > 2 else 0
    docs, counts = [], {}
    for task, cap in MAX_RECORDS.items():
        rows, _, _ = load_docs(task)
        evaluated = set(subset_indices(len(rows), limit, seed))
        near = {group(task, rows[i]) for i in evaluated}  # whole groups of near-duplicates stay out
        free = [i for i in range(len(rows)) if i not in evaluated and group(task, rows[i]) not in near]
        texts = [render(task, rows[i]) for i in free[:cap]]
        texts = [t for t in texts if len(t) > 20]
        scored = {render(task, rows[i]) for i in evaluated}
        if overlap := scored.intersection(texts):
            sys.exit(f"{task}: {len(overlap)} written texts are also scored items' texts; not written")
        counts[task] = {"split_items": len(rows), "evaluated": len(evaluated), "near_duplicates_left_out":
                        len(rows) - len(evaluated) - len(free), "written": len(texts)}
        docs += ["\n\n".join(texts[i:i + PER_DOC]) for i in range(0, len(texts), PER_DOC)]
    if "--with-everyday" in argv:
        from factorlab.data import _everyday_docs
        everyday = _everyday_docs()
        counts["everyday_docs"] = len(everyday)
        docs += everyday
    with out.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    print(json.dumps({"documents": len(docs), "limit": limit, "seed": seed, "tasks": counts}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
