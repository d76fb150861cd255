"""The measured numbers of the default recipe, from one source: the README's "Headline results" table.

The About tab shows rows of that table as they are written there (with the command that reproduces each in
the README), so a number is typed once and a new measurement changes both at the same time.
"""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Headline results"
# What About shows, by key: the start of the row's first cell ("what is measured") in the README's table.
ROWS = {
    "relative": "mean relative maintenance, default recipe",
    "above_chance": "mean above-chance retention",
    "perplexity": "held-out perplexity, factorized / dense",
    "every_k": "every K a real model",
    "compute": "compute per token",
    "speed": "measured speed of the default recipe",
    "chat": "chat fidelity of the default recipe",
    "par": "PAR vs the untrained router at K=2",
    "exactness": "exactness: max",
}
_CELL = re.compile(r"(?<!\\)\|")  # a cell border (a `\|` inside a cell is text)


def headline_rows(readme: Path = README) -> dict[str, tuple[str, str]]:
    """key -> (what is measured, result) of the ROWS found in the README's headline table (markdown as written)."""
    text = readme.read_text(encoding="utf-8")
    if SECTION not in text:
        return {}
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    cells = [[c.strip() for c in _CELL.split(line.strip())[1:-1]] for line in section.splitlines()
             if line.startswith("|")]
    found = {}
    for key, start in ROWS.items():
        row = next((c for c in cells if len(c) >= 2 and c[0].startswith(start)), None)
        if row:
            found[key] = (row[0], row[1])
    return found


def headline_markdown(readme: Path = README) -> str:
    """The rows as a markdown list for About, or a pointer to the README when it is not next to the code."""
    try:
        rows = headline_rows(readme)
    except OSError:
        rows = {}
    if not rows:
        return "The measured numbers of the default recipe are in the README's *Headline results*."
    return "\n".join(f"- {what}: {result}" for what, result in rows.values())
