"""Paired comparison of two benchmark sweeps on the same items (issue 7): is A better than B?

Usage: PYTHONPATH=. python experiments/tools/compare.py A.json[:K] B.json[:K] [TASKS] [OUT.json]
A and B are sweep JSON files (experiments/tools/screen.py, `eval --json`) whose rows stored per-item
outcomes ("correct"); K defaults to the file's only K. A side may list several sweeps of one
recipe (training seeds), comma-separated (A1.json,A2.json): that side's score is their mean.
TASKS (comma-separated) defaults to the seven of issue 7. The items of each task are resampled
(2,000 times, seed 0) with the same draw for the dense model, A and B; per task it prints A − B
on the main metric with a 95% interval, then the difference of the mean relative maintenance
(capped) and of the mean above-chance retention (over the tasks where it is defined on the full
items for both) with their intervals and the share of resamples in which A is ahead.
When both sides list the same number of sweeps (more than one), the i-th of A and the i-th of B are
taken as a pair (the same training seed) and it also prints each pair's difference of the two means
on the full items, and two intervals of the mean difference that count the seeds as a source of
chance too: "pairs" (the pairs resampled with replacement, items fixed) and "pairs and items" (both
resampled; 2,000 draws, the pairs' draw seeded 1 so that the item draws above are unchanged).
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


def interval(x: torch.Tensor) -> list[float]:
    """The 95% percentile interval of resampled values, NaN (undefined) resamples dropped."""
    x = x[~x.isnan()]
    return [float(v) for v in torch.quantile(x, torch.tensor([0.025, 0.975], dtype=x.dtype))]


def pairs_summary(per_pair: torch.Tensor, both: torch.Tensor, pick: torch.Tensor, label: str) -> dict:
    """Print and return one mean's per-pair differences (full items) and its intervals with the pairs
    resampled (items fixed) and with the pairs and the items resampled."""
    both = both[~both.isnan()]
    res = {"per_pair": [float(v) for v in per_pair], "mean": float(per_pair.mean()),
           "a_ahead_pairs": int((per_pair > 0).sum()),
           "pairs_interval": interval(per_pair[pick].mean(1)),
           "pairs_and_items_interval": interval(both),
           "pairs_and_items_a_ahead": float((both > 0).double().mean())}
    print(f"{label}, pair by pair (A − B on the full items): "
          + " / ".join(f"{100 * v:+.1f}" for v in per_pair)
          + f"; A ahead in {res['a_ahead_pairs']} of {per_pair.numel()} pairs, mean {100 * res['mean']:+.1f}")
    print(f"  95% interval with the pairs resampled [{100 * res['pairs_interval'][0]:+.1f}, "
          f"{100 * res['pairs_interval'][1]:+.1f}]; pairs and items resampled "
          f"[{100 * res['pairs_and_items_interval'][0]:+.1f}, {100 * res['pairs_and_items_interval'][1]:+.1f}], "
          f"A ahead in {100 * res['pairs_and_items_a_ahead']:.0f}%")
    return {label: res}


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
    paired = len(side_a) == len(side_b) > 1
    n_pairs = len(side_a)
    pick = torch.randint(0, n_pairs, (n_res, n_pairs), generator=torch.Generator().manual_seed(1)) if paired else None
    # per pair on the full items (items fixed), and per resample of pairs and items
    pair_rel = torch.zeros(n_pairs, dtype=torch.float64)
    pair_above = torch.zeros(n_pairs, dtype=torch.float64)
    both_rel = torch.zeros(n_res, dtype=torch.float64)
    both_above = torch.zeros(n_res, dtype=torch.float64)
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
        has_above = ta["k"][ka].get("above_chance") is not None and tb["k"][kb].get("above_chance") is not None
        if has_above:
            above_tasks.append(t)
            above["a"] += above_chance_series(am, dm, ta["chance"])  # NaN where dense is at chance: dropped
            above["b"] += above_chance_series(bm, dm, ta["chance"])
        if paired:
            full_a = torch.stack([s.mean() for s in sa])  # (pairs,): each sweep's score on the full items
            full_b = torch.stack([s.mean() for s in sb])
            pair_rel += (full_a / d.mean()).clamp(max=1.0) - (full_b / d.mean()).clamp(max=1.0)
            # the same pairs drawn for every task: (resamples, pairs) -> the drawn pairs' mean per resample
            drawn_a = torch.stack(means[:n_pairs], 1).gather(1, pick).mean(1)
            drawn_b = torch.stack(means[n_pairs:], 1).gather(1, pick).mean(1)
            both_rel += (drawn_a / dm).clamp(max=1.0) - (drawn_b / dm).clamp(max=1.0)
            if has_above:
                gap = float(d.mean()) - ta["chance"]
                pair_above += (full_a - full_b) / gap
                both_above += above_chance_series(drawn_a, dm, ta["chance"]) - above_chance_series(drawn_b, dm, ta["chance"])
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
    if paired:
        out["pairs"] = pairs_summary(pair_rel / len(tasks), both_rel / len(tasks), pick, "mean relative (capped)")
        if above_tasks:
            out["pairs"].update(pairs_summary(pair_above / len(above_tasks), both_above / len(above_tasks), pick,
                                              "mean above-chance"))
    if len(args) > 3:
        Path(args[3]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
