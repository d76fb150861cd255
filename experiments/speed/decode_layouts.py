"""Two weight layouts for the one-token path, measured before building them (issue 28): not kept.

Usage: PYTHONPATH=. .venv/bin/python experiments/speed/decode_layouts.py

The default recipe's shapes (hidden 576, 256 shared neurons, 4 experts of 320), 29 layers of distinct
random weights (so that they stream from memory, as in decode), 64 tokens whose expert sets are drawn
as per-token K runs them on the benchmark (each expert with probability 2.25 / 4, at least one), 1
thread, medians of 9 alternating repeats. Compares, per token:
* gate/up: the packed (H, 2I) matrix, one product per run of adjacent blocks (what decode does), against
  a contiguous (H, 2w) matrix per block, one product per block;
* down: one product per block (what decode does) against the down rows of shared block and experts
  packed in one (I, H) matrix, one product per run of adjacent blocks (fewer calls).
"""
from __future__ import annotations

import random
import statistics
import time

import torch

H, S, D, N, LAYERS, TOKENS = 576, 256, 320, 4, 29, 64


def runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Runs of adjacent block ids (-1 the shared block) as (first, last)."""
    out, i = [], 0
    while i < len(blocks):
        j = i + 1
        while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
            j += 1
        out.append((blocks[i], blocks[j - 1]))
        i = j
    return out


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    sets = [[[-1] + ([e for e in range(N) if rng.random() < 2.25 / N] or [rng.randrange(N)])
             for _ in range(LAYERS)] for _ in range(TOKENS)]
    width = 2 * (S + N * D)
    packed = [torch.randn(H, width + 16, generator=gen)[:, :width] for _ in range(LAYERS)]
    per_block_gu = [[torch.randn(H, 2 * S, generator=gen)] + [torch.randn(H, 2 * D, generator=gen) for _ in range(N)]
                    for _ in range(LAYERS)]
    down_rows = [torch.randn(S + N * D, H, generator=gen) for _ in range(LAYERS)]
    col = {-1: 0, **{e: 2 * S + 2 * D * e for e in range(N)}}
    row = {-1: 0, **{e: S + D * e for e in range(N)}}

    def size(b: int) -> int:
        return S if b < 0 else D

    x, a = torch.randn(1, H), torch.randn(1, S + N * D)

    def gu_packed_runs():
        for token in sets:
            for layer, blocks in enumerate(token):
                for first, last in runs(blocks):
                    torch.mm(x, packed[layer][:, col[first]:col[last] + 2 * size(last)])

    def gu_per_block():
        for token in sets:
            for layer, blocks in enumerate(token):
                for b in blocks:
                    torch.mm(x, per_block_gu[layer][b + 1])

    def down_per_block():
        for token in sets:
            for layer, blocks in enumerate(token):
                out = None
                for b in blocks:
                    w = down_rows[layer][row[b]:row[b] + size(b)]
                    if out is None:
                        out = torch.mm(a[:, row[b]:row[b] + size(b)], w)
                    else:
                        out.addmm_(a[:, row[b]:row[b] + size(b)], w, alpha=2.0)

    def down_packed_runs():
        for token in sets:
            for layer, blocks in enumerate(token):
                out = None
                for first, last in runs(blocks):
                    r0, r1 = row[first], row[last] + size(last)
                    if out is None:
                        out = torch.mm(a[:, r0:r1], down_rows[layer][r0:r1])
                    else:
                        out.addmm_(a[:, r0:r1], down_rows[layer][r0:r1])

    variants = {"gate/up: packed, one product per run (kept)": gu_packed_runs,
                "gate/up: contiguous per block": gu_per_block,
                "down: one product per block (kept)": down_per_block,
                "down: packed rows, one product per run": down_packed_runs}
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for _ in range(9):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name:45s} {statistics.median(t) / TOKENS * 1e3:6.2f} ms per token (29 layers)")


if __name__ == "__main__":
    main()
