"""Export the seeded benchmark subsets factorlab scores, for the lm-evaluation-harness cross-check.

Run with the factorlab venv: writes <out>/<task>.jsonl (the documents, Hub field names) and
<out>/factorlab_requests.json (factorlab's (context, continuation) requests, choices and gold).
    PYTHONPATH=. .venv/bin/python tests/lmeval_crosscheck/export.py --limit 200 --out /tmp/factorlab_lmeval
"""
import argparse
import json
from pathlib import Path

from factorlab.tasks import TASK_NAMES, load_docs, load_task, subset_indices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/factorlab_lmeval")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requests = {}
    for name in args.tasks.split(","):
        docs, _, _ = load_docs(name)
        if name == "mmlu":
            docs = sorted(docs, key=lambda d: d["subject"])  # the order load_task uses
        keep = subset_indices(len(docs), args.limit, args.seed)
        with open(out / f"{name}.jsonl", "w") as f:
            for i in keep:
                doc = dict(docs[i])
                if name == "boolq":
                    doc["label"] = int(doc["answer"])  # super_glue's field, which lm-eval's boolq reads
                f.write(json.dumps(doc) + "\n")
        task = load_task(name, limit=args.limit, seed=args.seed)
        requests[name] = [{"requests": it.requests, "choices": it.choices, "gold": it.gold, "subject": it.subject}
                          for it in task.items]
    (out / "factorlab_requests.json").write_text(json.dumps(requests))


if __name__ == "__main__":
    main()
