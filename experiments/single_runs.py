"""Grid-format rows from single runs (`train --json` + experiments/screen.py), for report.py.

Usage: PYTHONPATH=. python experiments/single_runs.py OUT.json NAME=LABEL ...
Reads experiments/results/train_NAME.json and screen_NAME.json (the run's K is the one its
screen scored) and writes {"rows": [...]} with the fields report.py reads: the setting (label,
top_k), training seconds, held-out metrics by K, the sweep with its summary over the seven tasks
of issue 7 (MMLU scored, kept apart) and GFLOPs per token at 512 tokens for the recipe's shape
(layers 1-29; the run's experts, shared neurons and first-token path from runs/NAME/config.json, else 4,
256 and routed; per-token K: the mean training measured, which is the nominal K).
"""
import json
import sys
from pathlib import Path

from experiments.compare import SEVEN as SEVEN_TASKS
from factorlab.evaluate import summarize
from factorlab.flops import flops_per_token
from factorlab.lab import dense_info

RESULTS = Path("experiments/results")
SEVEN = SEVEN_TASKS.split(",")


def row(name: str, label: str, info: dict) -> dict:
    train = json.loads((RESULTS / f"train_{name}.json").read_text())
    sweep = json.loads((RESULTS / f"screen_{name}.json").read_text())
    k = sorted(sweep["tasks"]["hellaswag"]["k"])[0]
    config = Path("runs") / name / "config.json"  # the run's shape, when the run is still here
    config = json.loads(config.read_text()) if config.exists() else {}
    shared, experts = config.get("shared_size", 256), config.get("num_experts", 4)
    sweep["summary_subset"] = {"tasks": SEVEN, **summarize({t: v for t, v in sweep["tasks"].items() if t in SEVEN})}
    gflops = {"seq_len": 512, "dense": flops_per_token(info, 512)["total"] / 1e9,
              k: flops_per_token(info, 512, experts, int(k), list(range(1, 30)), shared,
                                 first_token_dense=config.get("first_token_dense", False))["total"] / 1e9}
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
