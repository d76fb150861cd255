"""Where do a 1-process and a 2-process run of the recipe part? Every discrete decision, layer by layer.

    .venv/bin/python experiments/multiprocess/decisions.py RUNS_DIR [--preset quick] [--json OUT]

Trains the preset in one process (2 threads) and in two (`--processes 2`) into RUNS_DIR (a run already there is
reused with its recording), with `record/sitecustomize.py` saving each per-token-K round's decisions: every
token's best set of experts (the router's labels), and the router scores and thresholds the refit routes by.
Prints, per layer, how many tokens got another label, the largest score difference, the largest threshold
difference, how many tokens route differently at K = 1, 2, 3, and the smallest distance of a score from its
threshold (the margin a rounding difference must cross).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from compare import train  # this folder's: one CLI training command, timed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VARIANTS = {"one-process": [], "two-processes": ["--processes", "2"]}


def recorded(folder: Path, kind: str) -> list:
    """The recording of one variant: per round, the processes' parts joined in rank order."""
    rounds = sorted({p.name.split(".")[0] for p in folder.glob(f"{kind}*.pt")})
    out = []
    for r in rounds:
        parts = [torch.load(p) for p in sorted(folder.glob(f"{r}.rank*.pt"))]
        if kind == "sets":
            out.append(torch.cat(parts))
        else:
            out.append({"scores": torch.cat([p["scores"] for p in parts]), "thresholds": parts[0]["thresholds"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = Path(args.runs)
    for name, flags in VARIANTS.items():
        if not (runs / name).exists():
            train(name, args.preset, runs, 1, *flags, env={
                "FACTORLAB_RECORD": str(runs / f"{name}.decisions"),
                "PYTHONPATH": os.pathsep.join([str(HERE / "record"), str(ROOT), os.environ.get("PYTHONPATH", "")])})
    one, two = (runs / f"{n}.decisions" for n in VARIANTS)
    sets = list(zip(recorded(one, "sets"), recorded(two, "sets")))
    refits = list(zip(recorded(one, "refit"), recorded(two, "refit")))
    rows = []
    for i, ((s1, s2), (r1, r2)) in enumerate(zip(sets, refits), start=1):
        k_range = range(1, len(r1["thresholds"]))
        rows.append({
            "round": i,
            "tokens_with_another_label": int((s1 != s2).any(1).sum()),
            "max_score_difference": float((r1["scores"] - r2["scores"]).abs().max()),
            "max_threshold_difference": float((r1["thresholds"] - r2["thresholds"]).abs().max()),
            "tokens_routed_differently_by_k": [int(((r1["scores"] >= r1["thresholds"][k - 1])
                                                    != (r2["scores"] >= r2["thresholds"][k - 1])).sum())
                                               for k in k_range],
            "smallest_margin_by_k": [float((r1["scores"] - r1["thresholds"][k - 1]).abs().min()) for k in k_range]})
        r = rows[-1]
        print(f"round {i:2d}: labels differ {r['tokens_with_another_label']:5d}, scores {r['max_score_difference']:.1e}, "
              f"thresholds {r['max_threshold_difference']:.1e}, routed differently {r['tokens_routed_differently_by_k']}, "
              f"margins {', '.join(f'{m:.1e}' for m in r['smallest_margin_by_k'])}")
    first = next((r["round"] for r in rows if r["tokens_with_another_label"] or any(r["tokens_routed_differently_by_k"])),
                 None)
    result = {"preset": args.preset, "rounds": rows, "first_round_with_a_different_decision": first,
              "note": "one round per factorized layer in the quick preset (per_token_rounds = 1), layer = round"}
    print(f"first round with a different decision: {first}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
