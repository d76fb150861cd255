"""Where the time of the default recipe's forward goes, op by op, against the dense model (issue 28).

Usage: PYTHONPATH=. .venv/bin/python experiments/speed/profile_default.py RUN [--k 2] [--out FILE.md]
(REPEATS=5 by default; ONLY=decode or ONLY=prefill keeps the workloads whose name contains it)

For 1 and 2 threads and three workloads (prefill of 512 tokens, batch-1 decode with a KV cache,
batched prefill 8 x 512), profiles the dense model and the run's factorized model at K with
torch.profiler (self CPU time per op, summed over the forward) and writes a markdown table of the ops
that take the most time, per model, with each model's total wall time (median of alternating
repeats, outside the profiler). Run it alone: other processes on the cores distort 2-thread times.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from factorlab.models import load_model
from factorlab.moe import set_top_k
from factorlab.runs import load_moe, load_run

PREFILL, DECODE_STEPS, BATCH = 512, 32, 8


def workloads(vocab: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PREFILL), generator=gen)
    batch_ids = torch.randint(0, vocab, (BATCH, PREFILL), generator=gen)

    def prefill(model):
        model(input_ids=ids, use_cache=True, logits_to_keep=1)

    def decode(model):
        out = model(input_ids=ids[:, :32], use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(DECODE_STEPS):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - start

    def batched(model):
        model(input_ids=batch_ids, use_cache=True, logits_to_keep=1)

    return {"prefill 512": prefill, f"decode {DECODE_STEPS} (batch 1)": decode, f"prefill {BATCH}x{PREFILL}": batched}


def timed(fn, model) -> float:
    start = time.perf_counter()
    got = fn(model)
    return got if isinstance(got, float) else time.perf_counter() - start


def op_table(fn, model, top: int) -> list[tuple[str, float, int]]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(model)
    rows = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def main() -> None:
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    k = int(args[args.index("--k") + 1]) if "--k" in args else 2
    out = args[args.index("--out") + 1] if "--out" in args else None
    repeats = int(os.environ.get("REPEATS", "5"))
    run = load_run(args[0])
    loaded = load_model(run.recipe.model)
    dense = loaded.model
    moe = load_moe(run, dense)
    set_top_k(moe, k)
    models = {"dense": dense, f"K={k}": moe}
    lines = [f"# Profile of run `{args[0]}` at K={k} against dense", "",
             f"torch {torch.__version__}, load before: {os.getloadavg()}, {repeats} alternating repeats "
             "(median wall ms); op tables: torch.profiler self CPU ms summed over one call, top ops.", ""]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for name, fn in workloads(dense.config.vocab_size).items():
                if os.environ.get("ONLY") and os.environ["ONLY"] not in name:  # e.g. ONLY=decode
                    continue
                for model in models.values():
                    fn(model)  # warm-up
                times = {m: [] for m in models}
                for r in range(repeats):
                    for m in (list(models) if r % 2 == 0 else list(models)[::-1]):
                        times[m].append(timed(fn, models[m]))
                med = {m: statistics.median(t) * 1e3 for m, t in times.items()}
                lines.append(f"## {name}, {threads} thread{'s' if threads > 1 else ''}: dense {med['dense']:.1f} ms, "
                             f"K={k} {med[f'K={k}']:.1f} ms, ratio {med['dense'] / med[f'K={k}']:.2f}x")
                lines.append("")
                tables = {m: op_table(fn, models[m], 14) for m in models}
                lines.append("| rank | " + " | ".join(f"{m}: op | ms | calls" for m in models) + " |")
                lines.append("|---|" + "---|---|---|" * len(models))
                for i in range(14):
                    cells = []
                    for m in models:
                        row = tables[m][i] if i < len(tables[m]) else ("", 0.0, 0)
                        cells += [f"`{row[0]}`", f"{row[1]:.1f}", str(row[2])]
                    lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
                lines.append("")
                print("\n".join(lines[-18:]), flush=True)
    lines.append(f"load after: {os.getloadavg()}")
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
