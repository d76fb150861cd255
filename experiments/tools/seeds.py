"""One recipe trained with several seeds: its mean over the seeds, with intervals (issue 7).

Usage: PYTHONPATH=. python experiments/tools/seeds.py OUT.json SCREEN.json[:K] SCREEN.json[:K] ...
Each SCREEN is a sweep of the same recipe with another training seed on the same items
(experiments/tools/screen.py). Prints, over the seven tasks of issue 7, each seed's mean relative
maintenance (capped) and mean above-chance retention, their mean over the seeds and the seeds'
standard deviation, and two 95% bootstrap intervals of the seed mean (2,000 resamples, seed 0):
- items: the items of each task resampled (the same draw for the dense model and every seed), the
  seeds fixed — how much the score on these tasks' items is uncertain for these trained models;
- seeds: the seeds resampled with replacement, the items fixed — how well the seeds pin down the
  recipe's mean on these items;
- seeds and items: the seeds resampled with replacement as well — for the recipe, a new seed included.
For the seeds-and-items resamples it also prints the share at or above issue 7's goals (90% / 60%).
Writes the numbers to OUT.json.
"""
import json
import sys
from pathlib import Path

import torch

from experiments.tools.compare import SEVEN as SEVEN_TASKS, interval, load
from factorlab.evaluate import BOOTSTRAP_RESAMPLES, above_chance_series, outcomes, resampled_means

SEVEN = SEVEN_TASKS.split(",")
GOALS = {"mean relative (capped)": 0.90, "mean above-chance": 0.60}  # issue 7's goals


def seed_series(specs: list, n_res: int, gen: torch.Generator) -> dict:
    """The two means of each sweep in specs (same items), at full items (point_rel / point_above (S,))
    and per item resample (rel / above (R, S), the same draw of each task's items for the dense model
    and every sweep); above_tasks: the tasks where above-chance retention is defined."""
    first, n_seeds = specs[0][1], len(specs)
    rel = torch.zeros(n_res, n_seeds, dtype=torch.float64)
    above = torch.zeros(n_res, n_seeds, dtype=torch.float64)
    point_rel, point_above = torch.zeros(n_seeds, dtype=torch.float64), torch.zeros(n_seeds, dtype=torch.float64)
    above_tasks = []
    for t in SEVEN:
        dense_bits = first["tasks"][t]["dense"]["correct"]
        if any(s["tasks"][t]["dense"]["correct"] != dense_bits for _, s, _ in specs):
            sys.exit(f"{t}: the sweeps scored different items (their dense outcomes differ)")
        d = outcomes(dense_bits)
        models = [outcomes(s["tasks"][t]["k"][k]["correct"]) for _, s, k in specs]
        dm, means = resampled_means(d, models, n_res, gen)
        means = torch.stack(means, 1)  # (R, seeds)
        rel += (means / dm.unsqueeze(1)).clamp(max=1.0)
        point_rel += (torch.stack([m.mean() for m in models]) / d.mean()).clamp(max=1.0)
        if first["tasks"][t]["k"][specs[0][2]].get("above_chance") is not None:
            above_tasks.append(t)
            chance = first["tasks"][t]["chance"]
            above += above_chance_series(means, dm.unsqueeze(1).expand_as(means), chance)
            point_above += (torch.stack([m.mean() for m in models]) - chance) / (d.mean() - chance)
    return {"rel": rel / len(SEVEN), "above": above / len(above_tasks), "point_rel": point_rel / len(SEVEN),
            "point_above": point_above / len(above_tasks), "above_tasks": above_tasks}


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out_path, specs = sys.argv[1], [load(s) for s in sys.argv[2:]]
    names = [n for n, _, _ in specs]
    n_seeds, n_res = len(specs), BOOTSTRAP_RESAMPLES
    gen = torch.Generator().manual_seed(0)
    series = seed_series(specs, n_res, gen)
    rel, above, above_tasks = series["rel"], series["above"], series["above_tasks"]
    point_rel, point_above = series["point_rel"], series["point_above"]
    pick = torch.randint(0, n_seeds, (n_res, n_seeds), generator=gen)  # seeds drawn with replacement
    result = {"screens": names, "tasks": SEVEN, "above_chance_tasks": above_tasks, "resamples": n_res}
    print(f"{n_seeds} seeds: {', '.join(names)}; seven tasks (above-chance over {', '.join(above_tasks)})")
    for label, point, series in (("mean relative (capped)", point_rel, rel), ("mean above-chance", point_above, above)):
        mean = float(point.mean())
        items = interval(series.mean(1))
        seeds_only = interval(point[pick].mean(1))
        joint = series.gather(1, pick).mean(1)
        both = interval(joint)
        joint = joint[~joint.isnan()]
        at_goal = float((joint >= GOALS[label]).double().mean())
        result[label] = {"per_seed": [float(x) for x in point], "mean": mean, "sd": float(point.std()),
                         "interval_items": items, "interval_seeds": seeds_only, "interval_seeds_and_items": both,
                         "goal": GOALS[label], "share_at_goal_seeds_and_items": at_goal}
        print(f"{label}: per seed {' / '.join(f'{100 * x:.1f}' for x in point)}; mean {100 * mean:.1f}% "
              f"(sd {100 * float(point.std()):.1f}); 95% interval, items [{100 * items[0]:.1f}, {100 * items[1]:.1f}], "
              f"seeds [{100 * seeds_only[0]:.1f}, {100 * seeds_only[1]:.1f}], "
              f"seeds and items [{100 * both[0]:.1f}, {100 * both[1]:.1f}]; "
              f"{100 * at_goal:.0f}% of these at or above {100 * GOALS[label]:.0f}%")
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
