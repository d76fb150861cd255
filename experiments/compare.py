"""Paired comparison of two benchmark sweeps on the same items (issue 7): is A better than B?

Usage: PYTHONPATH=. python experiments/compare.py A.json[:K] B.json[:K] [TASKS] [OUT.json]
A and B are sweep JSON files (experiments/screen.py, `eval --json`) whose rows stored per-item
outcomes ("correct"); K defaults to the file's only K. A side may list several sweeps of one
recipe (training seeds), comma-separated (A1.json,A2.json): that side's score is their mean.
TASKS (comma-separated) defaults to the seven of issue 7. The items of each task are resampled
(2,000 times, seed 0) with the same draw for the dense model, A and B; per task it prints A − B
on the main metric with a 95% interval, then the difference of the mean relative maintenance
(capped) and of the mean above-chance retention (over the tasks where it is defined on the full
items for both) with their intervals and the share of resamples in which A is ahead.
"""
import json
import sys
from pathlib import Path

import torch

from factorlab.evaluate import BOOTSTRAP_RESAMPLES, above_chance_series, outcomes, resampled_means

SEVEN = "hellaswag,openbookqa,winogrande,arc_easy,arc_challenge,boolq,piqa"


def load(spec: str) -> tuple[str, dict, str]:
    path, _, k = spec.partition(":")
    sweep = json.loads(Path(path).read_text())
    ks = sorted({kk for t in sweep["tasks"].values() for kk in t["k"]})
    if not k:
        if len(ks) != 1:
            sys.exit(f"{path} has K values {ks}: name one as {path}:K")
        k = ks[0]
    return Path(path).stem, sweep, k


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    side_a, side_b = [load(s) for s in args[0].split(",")], [load(s) for s in args[1].split(",")]
    (_, a, ka), (_, b, kb) = side_a[0], side_b[0]
    name_a, name_b = "+".join(n for n, _, _ in side_a), "+".join(n for n, _, _ in side_b)
    tasks = (args[2] if len(args) > 2 else SEVEN).split(",")
    gen = torch.Generator().manual_seed(0)
    n_res = BOOTSTRAP_RESAMPLES
    rel = {"a": torch.zeros(n_res, dtype=torch.float64), "b": torch.zeros(n_res, dtype=torch.float64)}
    above = {"a": torch.zeros(n_res, dtype=torch.float64), "b": torch.zeros(n_res, dtype=torch.float64)}
    above_tasks, rows = [], {}
    print(f"A = {name_a} (K={ka}), B = {name_b} (K={kb}); main metric in %, 95% paired bootstrap intervals")
    print(f"{'task':15s}{'n':>5s}{'dense':>7s}{'A':>7s}{'B':>7s}{'A − B':>8s}{'interval':>17s}")
    for t in tasks:
        ta, tb = a["tasks"][t], b["tasks"][t]
        d = outcomes(ta["dense"]["correct"])
        if any(s["tasks"][t]["dense"]["correct"] != ta["dense"]["correct"] for _, s, _ in side_a + side_b):
            sys.exit(f"{t}: the sweeps scored different items (their dense outcomes differ)")
        sa = [outcomes(s["tasks"][t]["k"][k]["correct"]) for _, s, k in side_a]
        sb = [outcomes(s["tasks"][t]["k"][k]["correct"]) for _, s, k in side_b]
        dm, means = resampled_means(d, sa + sb, n_res, gen)  # the same item draw for every sweep
        am, bm = torch.stack(means[:len(sa)]).mean(0), torch.stack(means[len(sa):]).mean(0)
        fa, fb = torch.stack(sa).mean(0), torch.stack(sb).mean(0)  # per item: the share of sweeps right
        diff = am - bm
        lo, hi = (float(v) for v in torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)))
        point = float(fa.mean() - fb.mean())
        rows[t] = {"n": d.numel(), "dense": float(d.mean()), "a": float(fa.mean()), "b": float(fb.mean()),
                   "difference": point, "interval": [lo, hi], "a_ahead": float((diff > 0).double().mean())}
        print(f"{t:15s}{d.numel():5d}{100 * d.mean():7.1f}{100 * fa.mean():7.1f}{100 * fb.mean():7.1f}"
              f"{100 * point:+8.1f}   [{100 * lo:+5.1f}, {100 * hi:+5.1f}]")
        rel["a"] += (am / dm).clamp(max=1.0)
        rel["b"] += (bm / dm).clamp(max=1.0)
        if ta["k"][ka].get("above_chance") is not None and tb["k"][kb].get("above_chance") is not None:
            above_tasks.append(t)
            above["a"] += above_chance_series(am, dm, ta["chance"])  # NaN where dense is at chance: dropped
            above["b"] += above_chance_series(bm, dm, ta["chance"])
    out = {"a": f"{name_a}:{ka}", "b": f"{name_b}:{kb}", "tasks": rows, "resamples": n_res}
    for label, series, count in (("mean relative (capped)", rel, len(tasks)),
                                 ("mean above-chance", above, len(above_tasks))):
        if not count:
            continue
        diff = (series["a"] - series["b"]) / count
        diff = diff[~diff.isnan()]
        lo, hi = (float(v) for v in torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)))
        ahead = float((diff > 0).double().mean())
        print(f"{label}: A − B median {100 * float(diff.median()):+.1f} points, 95% interval "
              f"[{100 * lo:+.1f}, {100 * hi:+.1f}], A ahead in {100 * ahead:.0f}% of resamples")
        out[label] = {"median": float(diff.median()), "interval": [lo, hi], "a_ahead": ahead}
    if above_tasks:
        print(f"above-chance over: {', '.join(above_tasks)}")
        out["above_chance_tasks"] = above_tasks
    if len(args) > 3:
        Path(args[3]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
