"""How much do rounding-level differences move the recipe? One process at 2 threads, one process at 1 thread, and
two processes (`--processes 2`), layer by layer.

    .venv/bin/python experiments/multiprocess/sensitivity.py RUNS_DIR [--layers 1-4] [--json OUT]

Trains the quick preset (on the given layers) three ways into RUNS_DIR (a run already there is reused) and
prints, per factorized layer, the largest difference of each stored tensor against the 2-thread run, relative
to the tensor's largest entry, and the held-out perplexity at every K. Changing only torch's thread count
changes the summation order of the same sums, as splitting them over processes does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from compare import train  # noqa: E402  this folder's: one CLI training command, timed
VARIANTS = {"one-process-2-threads": ([], {}), "one-process-1-thread": ([], {"OMP_NUM_THREADS": "1"}),
            "two-processes": (["--processes", "2"], {})}
KINDS = ("router", "thresholds", "down", "shared_down", "down.k1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs")
    parser.add_argument("--layers", default="1-4")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from factorlab.runs import load_run

    runs = Path(args.runs)
    for name, (flags, env) in VARIANTS.items():
        if not (runs / name).exists():
            train(name, "quick", runs, 1, "--layers", args.layers, *flags, env=env)
    loaded = {n: load_run(n, runs) for n in VARIANTS}
    tensors = {n: r.tensors() for n, r in loaded.items()}
    ref = "one-process-2-threads"
    layers = sorted(int(k.split(".")[-1]) for k in tensors[ref] if k.startswith("router."))
    out = {"layers": args.layers, "reference": ref, "against": {}}
    for other in list(VARIANTS)[1:]:
        rows = {}
        for i in layers:
            row = {}
            for kind in KINDS:
                a, b = tensors[ref][f"{kind}.{i}"].double(), tensors[other][f"{kind}.{i}"].double()
                row[kind] = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
            rows[i] = row
        ppl = {k: [h["perplexity"], loaded[other].metrics["heldout"][k]["perplexity"]]
               for k, h in loaded[ref].metrics["heldout"].items()}
        out["against"][other] = {"relative_difference_by_layer": rows, "heldout_perplexity": ppl,
                                 "partitions_identical": all(
                                     bool((tensors[ref][f"permutation.{i}"] == tensors[other][f"permutation.{i}"]).all())
                                     for i in layers)}
        print(f"{ref} vs {other}")
        for i, row in rows.items():
            print(f"  layer {i}: " + "  ".join(f"{k} {v:.1e}" for k, v in row.items()))
        print("  held-out perplexity by K:", {k: [round(x, 3) for x in v] for k, v in ppl.items()})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
