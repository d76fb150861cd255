"""Issue 30 benchmark check: a chat-fidelity lever's run at K=2 on the 7 tasks, 200 items (seed 0), next to the
default run's stored sweep on the same items (experiments/every_k/results/eval_default_200.json).

    PYTHONPATH=. python experiments/chat_fidelity/bench_check.py RUN OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa"]


def main() -> None:
    from factorlab.workflows import evaluate_run

    run, out = sys.argv[1], sys.argv[2]
    sweep = evaluate_run(run, TASKS, [2], limit=200, seed=0, store=True)
    stored = json.loads((HERE.parent / "every_k" / "results" / "eval_default_200.json").read_text())
    result = {"settings": {"limit": 200, "seed": 0, "tasks": TASKS, "k": 2},
              "default": {"tasks": {t: stored["tasks"][t]["k"]["2"] for t in TASKS},
                          "summary": stored["summary"]["k"]["2"]},
              run: {"tasks": {t: sweep["tasks"][t]["k"]["2"] for t in TASKS}, "summary": sweep["summary"]["k"]["2"]},
              "dense": {t: sweep["tasks"][t]["dense"] for t in TASKS}}
    Path(out).write_text(json.dumps(result, indent=2, default=str))
    for label in ("default", run):
        s = result[label]["summary"]
        main_metric = {t: sweep["tasks"][t]["main_metric"] for t in TASKS}
        print(f"{label}: " + ", ".join(f"{t} {100 * result[label]['tasks'][t][main_metric[t]]:.1f}" for t in TASKS)
              + f"; mean relative {100 * s['relative_capped']:.1f}% {s['ci95']['relative_capped']}, above chance "
              f"{100 * s['above_chance']:.1f}% {s['ci95'].get('above_chance')}")


if __name__ == "__main__":
    main()
