"""One FFN layer of a run, dense vs factorized, on its real inputs: 512-token prefill and one-token decode.

Usage: PYTHONPATH=. .venv/bin/python experiments/speed/layer_paths.py RUN [--k 2] [--layer 15] [--profile]

Times the layer alone (median of alternating repeats, 1 and 2 threads): the whole 512-token input at
once, and its 512 tokens one by one (as decode runs them, so every routing case occurs). --profile
adds torch.profiler's self CPU time per op for each. Used to measure each change of the fast paths
(issue 28); the end-to-end numbers come from `python -m factorlab bench`.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from factorlab.bench import ffn_inputs
from factorlab.models import decoder_layers, load_model
from factorlab.moe import factorized_layers, set_top_k
from factorlab.runs import load_moe, load_run


def main() -> None:
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    k = int(args[args.index("--k") + 1]) if "--k" in args else 2
    layer = int(args[args.index("--layer") + 1]) if "--layer" in args else 15
    repeats = int(os.environ.get("REPEATS", "15"))
    run = load_run(args[0])
    dense = load_model(run.recipe.model).model
    moe = load_moe(run, dense)
    set_top_k(moe, k)
    ids = torch.randint(0, dense.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    print(f"load {os.getloadavg()}, layer {layer}, K={k}, {repeats} repeats")
    with torch.inference_mode():
        x = ffn_inputs(dense, ids, layer)[0]  # (512, H)
        mlps = {"dense": decoder_layers(dense)[layer].mlp, f"K={k}": factorized_layers(moe)[layer]}
        rows = [r.view(1, 1, -1) for r in x]
        work = {"prefill 512": lambda m: m(x.view(1, 512, -1)),
                "decode 512 x 1": lambda m: [m(r) for r in rows]}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, fn in work.items():
                for m in mlps.values():
                    fn(m)
                times = {n: [] for n in mlps}
                for r in range(repeats):
                    for n in (list(mlps) if r % 2 == 0 else list(mlps)[::-1]):
                        start = time.perf_counter()
                        fn(mlps[n])
                        times[n].append(time.perf_counter() - start)
                med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
                a, b = med.values()
                print(f"{threads}T {name}: " + "  ".join(f"{n} {v:.3f} ms" for n, v in med.items()) + f"  ratio {a / b:.2f}x")
                if "--profile" in args:
                    for n, m in mlps.items():
                        with profile(activities=[ProfilerActivity.CPU]) as prof:
                            fn(m)
                        print(f"  {n}:")
                        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
