"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

End-to-end distillation settings on top of a saved run, screened by held-out perplexity.

Usage: PYTHONPATH=. python experiments/expert_tuning/e2e_probe.py RUN OUT.jsonl '[{"e2e_lr": 3e-4, "e2e_params": "down", "e2e_steps": 40}, ...]'
Each row starts again from the saved run (TrainConfig e2e_* fields), trains on the `everyday` text
the run was trained on (32,768 tokens, same seed) and appends one JSON line: the setting, seconds,
steps, the first and last training KL and the held-out metrics (8,192 tokens) before and after.
Environment: THREADS (default 1), SKIPBASE=1 (skip the before-metrics), SAVE=NAME (save the last
row's model as a run, e.g. to score it on the benchmarks with experiments/tools/screen.py).
"""
import copy
import json
import os
import sys
import time

import torch

from factorlab.evaluate import heldout_metrics
from factorlab.factorize import Partition
from factorlab.models import load_model
from factorlab.par import TrainConfig, TrainResult, _train_end_to_end
from factorlab.runs import load_moe, load_run, moe_tensors, save_run
from factorlab.workflows import DataSpec, load_data

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
run, out, rows = load_run(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
loaded = load_model(run.config["model"])
base = load_moe(run, loaded.model)
train_ids, held = load_data(loaded, DataSpec(source="everyday", train_tokens=32768, heldout_tokens=8192, seq_len=256), 0)
before = None if os.environ.get("SKIPBASE") else heldout_metrics(loaded.model, base, held)
for row in rows:
    moe = copy.deepcopy(base)
    cfg = TrainConfig(mode="experts", top_k=run.config["top_k"], **row)
    log = []
    start = time.time()
    _train_end_to_end(loaded.model, moe, train_ids, cfg, TrainResult(0.0, 0), lambda: None,
                      lambda phase, layer, losses, **_: log.append(losses), None)
    rec = {"row": row, "sec": round(time.time() - start, 1), "steps": len(log), "kl_first": log[0]["kl"],
           "kl_last": sum(r["kl"] for r in log[-5:]) / len(log[-5:]),
           "heldout": heldout_metrics(loaded.model, moe, held), "base": before}
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if os.environ.get("SAVE"):
        part = Partition.from_saved(run.config["partition"], run.tensors())
        save_run(os.environ["SAVE"], {**run.config, "e2e": row}, moe_tensors(moe, part, True),
                 {"heldout": {str(cfg.top_k): rec["heldout"]}}, overwrite=True)
