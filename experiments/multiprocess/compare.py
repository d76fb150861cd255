"""One recipe trained in 1 and in 2 data-parallel processes (`train --processes 2`, accelerate + gloo): time and results.

    .venv/bin/python experiments/multiprocess/compare.py [--preset quick] [--json experiments/multiprocess/results.json]

Trains the preset on the embedded model through the CLI (runs in a temporary folder), records the wall time of
each command with the machine's load (`uptime`) before and after, and compares the stored runs: partitions
(identical?), routers, thresholds and refitted down projections (largest difference), and held-out perplexity,
agreement and KL at every K. The two-process run is compared with the one-process run, and so, as yardsticks,
are the same one-process command at 1 thread instead of 2 (the same sums in another order: what rounding alone
does) and at seed 1 (another split, router init and data order: the recipe's own spread).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def train(name: str, preset: str, runs: Path, processes: int, *flags: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "factorlab", "train", name, "--preset", preset, "--runs-dir", str(runs), *flags]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    before = load()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    return {"command": " ".join(["python", "-m", "factorlab", *cmd[3:]]), "wall_s": round(seconds, 1),
            "uptime_before": before, "uptime_after": load()}


def compare(runs: Path, one: str, two: str) -> dict:
    from factorlab.runs import load_run

    a_run, b_run = load_run(one, runs), load_run(two, runs)
    a, b = a_run.tensors(), b_run.tensors()
    perms = [n for n in a if n.startswith("permutation.")]
    groups: dict[str, dict] = {}
    for name in sorted(a):
        if name.startswith("permutation."):
            continue
        kind = name.rsplit(".", 1)[0]  # e.g. down, down.k1, router, thresholds
        diff = (a[name].double() - b[name].double()).abs().max().item()
        scale = a[name].double().abs().max().item()
        g = groups.setdefault(kind, {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "layers": 0, "layers_over_1e-5": 0})
        g["max_abs_diff"] = max(g["max_abs_diff"], diff)
        g["max_rel_diff"] = max(g["max_rel_diff"], diff / max(scale, 1e-30))
        g["layers"] += 1
        g["layers_over_1e-5"] += diff / max(scale, 1e-30) > 1e-5
    heldout = {}
    for k, h in a_run.metrics["heldout"].items():
        o = b_run.metrics["heldout"][k]
        heldout[k] = {"perplexity_1": h["perplexity"], "perplexity_2": o["perplexity"],
                      "perplexity_rel_diff": abs(o["perplexity"] - h["perplexity"]) / h["perplexity"],
                      "agreement_1": h["agreement"], "agreement_2": o["agreement"], "kl_1": h["kl"], "kl_2": o["kl"],
                      "dense_perplexity_1": h["dense_perplexity"], "dense_perplexity_2": o["dense_perplexity"],
                      "tokens": [h["tokens"], o["tokens"]]}
    return {"partitions_identical": sum(bool((a[n] == b[n]).all()) for n in perms), "partitions": len(perms),
            "tensors": groups, "heldout": heldout,
            "train_seconds": [a_run.metrics["train"]["seconds"], b_run.metrics["train"]["seconds"]],
            "router_label_accuracy": [a_run.metrics["train"]["mean_router_label_accuracy"],
                                      b_run.metrics["train"]["mean_router_label_accuracy"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    import accelerate
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        one = train("one-process", args.preset, runs, 1)
        two = train("two-processes", args.preset, runs, 2)
        threads = train("one-process-1-thread", args.preset, runs, 1, env={"OMP_NUM_THREADS": "1"})
        seed = train("one-process-seed-1", args.preset, runs, 1, "--seed", "1")
        result = {"preset": args.preset, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                     "torch": torch.__version__, "accelerate": accelerate.__version__},
                  "note": "wall times with the machine's load before and after each command (uptime)",
                  "one_process": one, "two_processes": two, "comparison": compare(runs, "one-process", "two-processes"),
                  "yardsticks": {"one_process_1_thread": {**threads, "comparison": compare(
                      runs, "one-process", "one-process-1-thread")}, "one_process_seed_1": {**seed, "comparison": compare(
                          runs, "one-process", "one-process-seed-1")}}}
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
