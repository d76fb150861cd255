"""Issue 30 lever: end-to-end distillation of a trained run on chat text the dense model wrote itself.

Starts from a saved run (e.g. the default recipe), tunes the down projections of its current K by
KL(dense || factorized) on `selfgen` rows (the dense model's sampled replies to the shipped training
prompts, chat template applied; the fidelity prompts are a different set), and saves the result as a
new run. Wall and process CPU time of the tuning are recorded in the run's metrics.

    PYTHONPATH=. python experiments/chat_fidelity/chat_e2e.py default chat-e2e --steps 40 --tokens 8192
"""
from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from factorlab.data import train_heldout
from factorlab.factorize import Partition
from factorlab.moe import set_top_k
from factorlab.par.trainer import _train_end_to_end
from factorlab.runs import moe_tensors, save_run
from factorlab.workflows import open_run, tuned_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=8192, help="selfgen training tokens (rows of the run's seq_len)")
    ap.add_argument("--lr", type=float, default=None, help="default: the run's e2e_lr")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: the run's e2e_batch)")
    args = ap.parse_args()

    run, loaded, moe = open_run(args.run)
    recipe = run.recipe
    set_top_k(moe, recipe.top_k)
    train_ids, _ = train_heldout("selfgen", loaded.tokenizer, args.tokens, 0, recipe.seq_len, recipe.seed,
                                 model=loaded)
    tuned = recipe.replace(e2e_steps=args.steps, e2e_lr=args.lr or recipe.e2e_lr,
                           e2e_batch=args.batch or recipe.e2e_batch)
    log = []

    def report(phase, layer, losses, advance=1, e2e_total=None):
        log.append({"phase": phase, **losses})
        if len(log) % 5 == 0:
            print(f"step {len(log)}/{e2e_total}: kl {losses['kl']:.4f}", flush=True)

    wall, cpu = time.monotonic(), time.process_time()
    _train_end_to_end(loaded.model, moe, train_ids, tuned, SimpleNamespace(stopped_early=False), lambda: None,
                      report, None)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    tensors = run.tensors()
    partition = Partition.from_tensors(tensors, recipe.num_experts, recipe.split, recipe.shared_size, recipe.seed)
    config = {**run.config, "recipe": tuned.to_dict(), "chat_e2e": {
        "from_run": run.name, "text": "selfgen", "rows": int(train_ids.shape[0]), "steps": args.steps,
        "wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads()}}
    for key in ("name", "created", "versions"):
        config.pop(key, None)
    save_run(args.out, config, moe_tensors(moe, partition, tuned_params(tuned)),
             {"train": {"chat_e2e": config["chat_e2e"], "kl": [r["kl"] for r in log]}}, overwrite=True)
    print(json.dumps(config["chat_e2e"]))


if __name__ == "__main__":
    main()
