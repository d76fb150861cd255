"""Two recipes, each trained with its own seeds, compared without pairing the seeds (issue 7).

Usage: PYTHONPATH=. python experiments/tools/versus.py OUT.json A1.json[,A2.json...] B1.json[,B2.json...]
Each file is a sweep of experiments/tools/screen.py on the same items (A: a lever's seeds, B: e.g. the
default's seeds). seeds.py gives one recipe's mean; compare.py pairs A's seed s with B's seed s. A
pairing only helps when the seed's shared randomness (the split, the training sample) moves both
recipes the same way; where it does not, a lucky seed of B makes every lever paired with it look
worse. This compares the seed means instead: over the seven tasks of issue 7, A's mean relative
maintenance (capped) and mean above-chance retention minus B's, with two 95% bootstrap intervals
(2,000 resamples, seed 0):
- seeds: each group's seeds resampled with replacement, the items fixed;
- seeds and items: the same, with the items of each task resampled too (one draw for the dense model
  and every sweep of both groups);
and the share of the seeds-and-items resamples where A is ahead. A group's seed spread can only come
from its own seeds: with one seed of A (or two) the seed intervals carry B's spread and little or
none of A's, so they are too narrow; read them with A's seed count. Per task: the difference of the
seed-mean scores (main metric, points). Writes the numbers to OUT.json.
"""
import json
import sys
from pathlib import Path

import torch

from experiments.tools.compare import interval, load
from experiments.tools.seeds import SEVEN, seed_series
from factorlab.evaluate import BOOTSTRAP_RESAMPLES


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    out_path = sys.argv[1]
    a_specs = [load(s) for s in sys.argv[2].split(",")]
    b_specs = [load(s) for s in sys.argv[3].split(",")]
    na, nb, n_res = len(a_specs), len(b_specs), BOOTSTRAP_RESAMPLES
    gen = torch.Generator().manual_seed(0)
    series = seed_series(a_specs + b_specs, n_res, gen)
    pick_a = torch.randint(0, na, (n_res, na), generator=gen)
    pick_b = torch.randint(0, nb, (n_res, nb), generator=gen) + na
    result = {"a": [n for n, _, _ in a_specs], "b": [n for n, _, _ in b_specs], "tasks": SEVEN,
              "above_chance_tasks": series["above_tasks"], "resamples": n_res}
    print(f"A ({na} seeds): {', '.join(result['a'])}\nB ({nb} seeds): {', '.join(result['b'])}")
    for label, key in (("mean relative (capped)", "rel"), ("mean above-chance", "above")):
        point, res = series["point_" + key], series[key]
        a_mean, b_mean = float(point[:na].mean()), float(point[na:].mean())
        seeds_only = point[pick_a].mean(1) - point[pick_b].mean(1)
        both = res.gather(1, pick_a).mean(1) - res.gather(1, pick_b).mean(1)
        both = both[~both.isnan()]
        row = {"a_mean": a_mean, "b_mean": b_mean, "difference": a_mean - b_mean,
               "a_per_seed": [float(v) for v in point[:na]], "b_per_seed": [float(v) for v in point[na:]],
               "interval_seeds": interval(seeds_only), "interval_seeds_and_items": interval(both),
               "a_ahead_seeds_and_items": float((both > 0).double().mean())}
        result[label] = row
        print(f"{label}: A {100 * a_mean:.1f}% - B {100 * b_mean:.1f}% = {100 * row['difference']:+.1f} points; "
              f"95% interval, seeds [{100 * row['interval_seeds'][0]:+.1f}, {100 * row['interval_seeds'][1]:+.1f}], "
              f"seeds and items [{100 * row['interval_seeds_and_items'][0]:+.1f}, "
              f"{100 * row['interval_seeds_and_items'][1]:+.1f}]; A ahead in {100 * row['a_ahead_seeds_and_items']:.0f}%")
    per_task = {}
    for t in SEVEN:
        metric = a_specs[0][1]["tasks"][t]["main_metric"]
        score = [s["tasks"][t]["k"][k][metric] for _, s, k in a_specs + b_specs]
        per_task[t] = 100 * (sum(score[:na]) / na - sum(score[na:]) / nb)
    result["per_task_points"] = per_task
    print("per task, A - B (seed means, points): " + ", ".join(f"{t} {v:+.1f}" for t, v in per_task.items()))
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
