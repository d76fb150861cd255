"""What the per-token decode path spends on routing, against the whole layer (issue 28).

Usage: PYTHONPATH=. .venv/bin/python experiments/speed/routing_overhead.py RUN [--k 2]

One thread; three layers of the run on their real inputs (512 seeded random tokens through the dense model), fed
one token at a time as decode does: the dense FFN, the factorized layer (`FactorizedMLP._decode_one`), and the
router's part alone (its product, the sigmoid and the scores to the host). Medians of 7 alternating repeats, in
microseconds per token. The weights of one layer stay in cache here, so the absolute times are not decode's
(memory-bound); the routing's share of them is the point.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from factorlab.bench import ffn_inputs
from factorlab.moe import factorized_layers, set_top_k
from factorlab.workflows import open_run


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    k = int(sys.argv[sys.argv.index("--k") + 1]) if "--k" in sys.argv else 2
    torch.set_num_threads(1)
    _, loaded, moe = open_run(sys.argv[1])
    set_top_k(moe, k)
    dense = loaded.model
    ids = torch.randint(0, dense.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for layer in (5, 15, 25):
            x = ffn_inputs(dense, ids, layer)[0]
            mlp, dense_mlp = factorized_layers(moe)[layer], dense.model.layers[layer].mlp
            rows = [x[i:i + 1] for i in range(x.shape[0])]
            variants = {"dense FFN": dense_mlp, "factorized layer": mlp,
                        "routing only": lambda r: mlp.router.logits(r).float().sigmoid().view(-1).tolist()}
            times: dict[str, list[float]] = {name: [] for name in variants}
            for repeat in range(8):  # the first is a warm-up
                for name, fn in variants.items():
                    start = time.perf_counter()
                    for r in rows:
                        fn(r)
                    if repeat:
                        times[name].append(time.perf_counter() - start)
            print(f"layer {layer}: " + ", ".join(f"{name} {1e6 * statistics.median(t) / len(rows):.1f} us/token"
                                                 for name, t in times.items()))


if __name__ == "__main__":
    main()
