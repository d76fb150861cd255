"""Issue 28: would ordering each layer's experts help batch-1 decode? Counts, not times.

    PYTHONPATH=. python experiments/speed/adjacency.py RUN [--tokens 600] [--json OUT]

Decode reads the shared block and a token's experts with one gate/up product per run of adjacent column blocks
(shared block first, then experts by index; factorlab/moe.py `_decode_one`). A permutation of a layer's experts
changes no function but changes which chosen sets are adjacent. Routes the shipped chat prompts through the run at
K=2 and prints, per layer and overall, the mean number of gate/up products per token now and under the best of
the 24 expert orders of that layer (chosen on the same tokens: an upper bound on what an order could save).
"""
from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import torch


def products(chosen: tuple[int, ...], order: tuple[int, ...]) -> int:
    """Gate/up products for one token: runs of adjacent blocks, the shared block (position -1) first."""
    blocks = [-1] + sorted(order.index(e) for e in chosen)
    return 1 + sum(1 for a, b in zip(blocks, blocks[1:]) if b != a + 1)


def main() -> None:
    from factorlab.fidelity import CHAT_PROMPTS
    from factorlab.moe import chosen_lists, record_routing, set_top_k
    from factorlab.workflows import open_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _, loaded, moe = open_run(args.run)
    set_top_k(moe, 2)
    prompts = [json.loads(line)["prompt"] for line in Path(CHAT_PROMPTS).read_text().splitlines() if line.strip()]
    ids = loaded.tokenizer(" ".join(prompts), return_tensors="pt").input_ids[:, :args.tokens]
    with torch.no_grad(), record_routing(moe) as trace:
        moe(ids)
    chosen, _ = trace.stacked()
    rows, now_total, best_total, count = {}, 0, 0, 0
    for layer, index in chosen.items():
        sets = Counter(tuple(sorted(c)) for c in chosen_lists(index))
        experts = index.shape[1]
        cost = {o: sum(c * products(s, o) for s, c in sets.items()) for o in itertools.permutations(range(experts))}
        best = min(cost, key=cost.get)
        tokens = sum(sets.values())
        rows[layer] = {"now": cost[tuple(range(experts))] / tokens, "best": cost[best] / tokens, "best_order": best}
        now_total, best_total, count = now_total + cost[tuple(range(experts))], best_total + cost[best], count + tokens
    result = {"run": args.run, "tokens": ids.shape[1], "k": 2, "mean_products_now": now_total / count,
              "mean_products_best_order": best_total / count, "by_layer": rows}
    print(f"gate/up products per token and layer: now {result['mean_products_now']:.3f}, "
          f"best order per layer {result['mean_products_best_order']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
