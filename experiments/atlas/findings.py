"""The numbers behind docs/research.md section N, read from a stored atlas JSON.

Usage: PYTHONPATH=. .venv/bin/python experiments/atlas/findings.py experiments/atlas/results/atlas_default.json [OUT.json]

Prints (and writes to OUT.json, if given): expert vs shared-block removal costs, how many removals stand out
from their standard error, the rank correlation of routing share and removal cost, the domain specialisation
of the PAR router against the untrained router, the most over-represented expert per domain, and the
dense FFN's output norm on each expert's tokens against all tokens.
"""
from __future__ import annotations

import json
import statistics
import sys


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def main() -> None:
    atlas = json.loads(open(sys.argv[1]).read())
    layers = [atlas["layers_data"][str(i)] for i in atlas["layers"]]
    experts = [(i, e) for i, d in zip(atlas["layers"], layers) for e in d["experts"]]
    delta = [e["ablation"]["all"]["delta"] for _, e in experts]
    stderr = [e["ablation"]["all"]["stderr"] for _, e in experts]
    shared = [(i, d["shared"]["ablation"]["all"]) for i, d in zip(atlas["layers"], layers) if d["shared"]["ablation"]]
    out = {
        "experts": len(experts), "ablation_tokens_per_removal": experts[0][1]["ablation"]["all"]["tokens"],
        "expert_delta_mean": statistics.fmean(delta), "expert_delta_median": statistics.median(delta),
        "expert_delta_max": max(delta), "expert_delta_max_at": max(experts, key=lambda x: x[1]["ablation"]["all"]["delta"])[0],
        "experts_above_2se": sum(d > 2 * s for d, s in zip(delta, stderr)),
        "experts_below_minus_2se": sum(d < -2 * s for d, s in zip(delta, stderr)),
        "shared_delta_mean": statistics.fmean([a["delta"] for _, a in shared]) if shared else None,
        "shared_delta_median": statistics.median([a["delta"] for _, a in shared]) if shared else None,
        "shared_above_2se": sum(a["delta"] > 2 * a["stderr"] for _, a in shared),
        "shared_top": sorted(((i, round(a["delta"], 3)) for i, a in shared), key=lambda x: -x[1])[:5],
        "shared_more_costly_than_every_expert_of_its_layer": sum(
            d["shared"]["ablation"]["all"]["delta"] > max(e["ablation"]["all"]["delta"] for e in d["experts"])
            for d in layers if d["shared"]["ablation"]),
        "spearman_share_vs_cost": spearman([e["share"] for _, e in experts], delta),
        "specialisation": {k: {f: v[f] for f in ("mi_bits", "mi_ci95", "mi_null_bits", "entropy", "entropy_ci95")
                               if f in v} for k, v in atlas["specialisation"].items() if isinstance(v, dict)},
        "baseline_loss": atlas["baseline_loss"], "timing": atlas["timing"],
    }
    best = {}
    for d in [x["name"] for x in atlas["domains"]]:
        i, e = max(experts, key=lambda x: x[1]["over"][d] or 0)
        best[d] = {"layer": i, "expert": e["expert"], "over": e["over"][d], "share_of_domain": e["domains"][d],
                   "share": e["share"], "vocab": [v["token"] for v in e["vocab"][:8]],
                   "delta_in_domain": e["ablation"][d]["delta"], "delta_all": e["ablation"]["all"]["delta"]}
    out["most_over_represented"] = best
    ratios = [e["norm"]["dense_ffn_routed"] / d["dense_ffn_all"] for (i, e), d in
              zip(experts, [layers[atlas["layers"].index(i)] for i, _ in experts]) if e["norm"]["dense_ffn_routed"]]
    out["dense_norm_routed_over_all"] = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}
    text = json.dumps(out, indent=2)
    print(text)
    if len(sys.argv) > 2:
        open(sys.argv[2], "w").write(text + "\n")


if __name__ == "__main__":
    main()
