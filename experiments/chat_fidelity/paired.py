"""Two stored chat-fidelity results on the same prompts, at each K both hold: A minus B, with paired bootstrap intervals.

    PYTHONPATH=. python experiments/chat_fidelity/paired.py fidelity_chat-s1_k13.json fidelity_default-s1_k13.json

File names are taken from experiments/chat_fidelity/results/ (or give paths). Prints the difference and its 95%
interval, at every K both files hold, for agreement, KL and the shares of replies identical for 8 and 16 tokens (fidelity.paired_difference).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from factorlab.fidelity import paired_difference

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict:
    path = Path(name) if Path(name).exists() else RESULTS / name
    return json.loads(path.read_text())


def main() -> None:
    a, b = load(sys.argv[1]), load(sys.argv[2])
    for k in sorted(set(a["by_k"]) & set(b["by_k"])):
        print(f"K={k}")
        for measure in ("agreement", "kl", "identical_8", "identical_16"):
            d = paired_difference(a, b, k, measure)
            print(f"  {measure:>13}: {d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")


if __name__ == "__main__":
    main()
