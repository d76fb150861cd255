"""Grid-format rows from single runs (`train --json` + experiments/tools/screen.py), for report.py.

Usage: PYTHONPATH=. python experiments/tools/single_runs.py OUT.json NAME=LABEL ...
Reads train_NAME.json and screen_NAME.json from the experiments/*/results/ folders (each name must
be found exactly once; the run's K is the one its screen scored) and writes {"rows": [...]} with the
fields report.py reads: the setting (label, top_k), training seconds, held-out metrics by K, the
sweep with its summary over the seven tasks of issue 7 (MMLU scored, kept apart) and GFLOPs per
token at 512 tokens for the recipe's shape (layers 1-29; the run's experts and shared neurons from
runs/NAME, else 4 and 256; per-token K: the mean training measured, which is the nominal K).
"""
import json
import sys
from pathlib import Path

from experiments.tools.compare import SEVEN as SEVEN_TASKS
from factorlab.evaluate import summarize
from factorlab.flops import flops_per_token
from factorlab.lab import dense_info
from factorlab.recipe import Recipe
from factorlab.runs import load_run

RESULTS = Path("experiments")  # results live in experiments/<question>/results/


def result_file(kind: str, name: str) -> Path:
    """experiments/<question>/results/{kind}_{name}.json: the one file of that name in any question folder."""
    found = sorted(RESULTS.glob(f"*/results/{kind}_{name}.json"))
    if len(found) != 1:
        sys.exit(f"{kind}_{name}.json: found {len(found)} times under experiments/*/results/ ({', '.join(map(str, found))})")
    return found[0]


SEVEN = SEVEN_TASKS.split(",")


def row(name: str, label: str, info: dict) -> dict:
    train = json.loads(result_file("train", name).read_text())
    sweep = json.loads(result_file("screen", name).read_text())
    k = sorted(sweep["tasks"]["hellaswag"]["k"])[0]
    path = Path("runs") / name  # the run's shape, when the run is still here (else the default's)
    run = load_run(str(path)) if (path / "config.json").exists() else None
    if run and run.removed_settings.get("first_token_dense"):
        sys.exit(f"{name} ran its first token through the whole FFN: write its row at commit 25c6601")
    recipe = run.recipe if run else Recipe()
    shared, experts = recipe.shared_size, recipe.num_experts
    sweep["summary_subset"] = {"tasks": SEVEN, **summarize({t: v for t, v in sweep["tasks"].items() if t in SEVEN})}
    gflops = {"seq_len": 512, "dense": flops_per_token(info, 512)["total"] / 1e9,
              k: flops_per_token(info, 512, experts, int(k), list(range(1, 30)), shared)["total"] / 1e9}
    return {"key": name, "status": "done", "setting": {"label": label, "top_k": int(k)},
            "train_seconds": train["seconds"], "heldout": train["heldout_by_k"], "eval": sweep,
            "gflops_per_token": gflops}


def main() -> None:
    out, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    info = dense_info("default")
    rows = [row(name, label, info) for name, label in pairs]
    Path(out).write_text(json.dumps({"rows": rows}, indent=1))
    print(f"wrote {out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
