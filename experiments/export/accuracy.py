"""Issue 32 evidence: benchmark accuracy at K=2 of what exports exactly, next to the default recipe.

    PYTHONPATH=. python experiments/export/accuracy.py [--limit 200] [--portable portable] [--default default]

Scores, on the same seeded items as experiments/every_k/results/eval_default_200.json (7 tasks, 200 items, seed 0),
with one dense pass shared by both:
* `default-top2`: the default run with per-token K switched off (plain top-2 over its trained router and its K=2
  weights) = what `python -m factorlab export default` writes (the run itself is not changed: a copy with the
  thresholds left out is saved in a temporary runs folder);
* the `portable` preset's run (gated top-2: exports exactly).
Writes experiments/export/results/accuracy_200.json and prints a table with the default (per-token K) from
eval_default_200.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TASKS = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa"]


def top_k_copy(name: str, root: Path) -> str:
    """Save the run `name` without its per-token thresholds (plain top-K, same weights) as `<name>-top2` in root."""
    from factorlab.runs import load_run, save_run

    run = load_run(name)
    tensors = {k: v for k, v in run.tensors().items()
               if not k.startswith(("thresholds.", "expected_k.", "min_experts."))}
    config = {k: v for k, v in run.config.items() if k not in ("per_token_k", "name", "created", "versions")}
    config["recipe"] = run.recipe.replace(per_token_rounds=0).to_dict()
    target = f"{run.name}-top2"
    save_run(target, config, tensors, {}, root=root, overwrite=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--portable", default="portable")
    parser.add_argument("--default", default="default")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from factorlab.workflows import evaluate_run

    root = Path(tempfile.gettempdir()) / "factorlab-export" / "runs"
    copy = top_k_copy(args.default, root)
    dense_cache: dict = {}
    sweeps = {"default-top2": evaluate_run(copy, TASKS, [2], limit=args.limit, seed=0, runs_dir=root, store=False,
                                           dense_cache=dense_cache),
              "portable": evaluate_run(args.portable, TASKS, [2], limit=args.limit, seed=0, store=True,
                                       dense_cache=dense_cache)}
    stored = json.loads((HERE.parent / "every_k" / "results" / "eval_default_200.json").read_text())
    out = {"settings": {"limit": args.limit, "seed": 0, "tasks": TASKS, "k": 2},
           "default (per-token K, eval_default_200.json)": {"tasks": {t: stored["tasks"][t]["k"]["2"] for t in TASKS},
                                                            "summary": stored["summary"]["k"]["2"]},
           "dense": {t: sweeps["portable"]["tasks"][t]["dense"] for t in TASKS}}
    for label, sweep in sweeps.items():
        out[label] = {"tasks": {t: sweep["tasks"][t]["k"]["2"] for t in TASKS}, "summary": sweep["summary"]["k"]["2"]}
    (HERE / "results" / f"accuracy_{args.limit}.json").write_text(json.dumps(out, indent=2, default=str))
    metric = {t: sweeps["portable"]["tasks"][t]["main_metric"] for t in TASKS}
    print("| model | " + " | ".join(TASKS) + " | mean relative (capped) | mean above-chance |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    print("| dense | " + " | ".join(f"{100 * out['dense'][t][metric[t]]:.1f}" for t in TASKS) + " | 100% | 100% |")
    for label in ("default (per-token K, eval_default_200.json)", "default-top2", "portable"):
        row = out[label]
        print(f"| {label} | " + " | ".join(f"{100 * row['tasks'][t][metric[t]]:.1f}" for t in TASKS)
              + f" | {100 * row['summary']['relative_capped']:.1f}% | {100 * row['summary']['above_chance']:.1f}% |")


if __name__ == "__main__":
    main()
