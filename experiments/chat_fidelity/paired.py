"""Two stored chat-fidelity results at K=2 on the same prompts: A minus B, with paired bootstrap intervals.

    PYTHONPATH=. python experiments/chat_fidelity/paired.py fidelity_chat-s1_k2.json fidelity_default-s1_k2.json

File names are taken from experiments/chat_fidelity/results/ (or give paths). Prints the difference and its 95%
interval for agreement, KL and the shares of replies identical for 8 and 16 tokens (fidelity.paired_difference).
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
    for measure in ("agreement", "kl", "identical_8", "identical_16"):
        d = paired_difference(a, b, "2", measure)
        print(f"{measure:>13}: {d['difference']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")


if __name__ == "__main__":
    main()
