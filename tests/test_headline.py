"""About matches the default (issue 29): its measured numbers come from the README's "Headline results" only,
and its diagram shows what the default runs (shared block, per-token K) beside the paper's top-K."""
import re
from pathlib import Path

from factorlab.headline import ROWS, headline_markdown, headline_rows
from factorlab.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_headline_row_about_shows_is_found_in_the_readme():
    rows = headline_rows()
    assert set(rows) == set(ROWS), f"rows About shows but the README's headline table lacks: {set(ROWS) - set(rows)}"
    assert rows["relative"][1].startswith("**") and "%" in rows["relative"][1]
    assert "\\|logit difference\\|" in rows["exactness"][0]  # an escaped pipe stays inside its cell


def test_about_shows_the_readmes_numbers_and_types_none_of_them(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORLAB_RUNS", str(tmp_path / "runs"))
    import app

    about = next(b.value for b in app.demo.blocks.values() if getattr(b, "elem_id", None) == "about-rest")
    for what, result in headline_rows().values():
        assert f"- {what}: {result}" in about  # the same text as the README's table row
    for page in ("app.py", "assets/about.md"):  # and no headline number typed into the app or its About text
        source = (ROOT / page).read_text()
        for _, result in headline_rows().values():
            for number in re.findall(r"\*\*([^*]+)\*\*", result):
                assert number not in source, f"{number!r} is typed in {page}: read it from the README instead"
    assert "**Current run" not in about
    missing = tmp_path / "README.md"
    missing.write_text("# no results here\n")
    assert "README's *Headline results*" in headline_markdown(missing)  # a copy without the README says where


def test_the_diagram_shows_the_default_recipe_next_to_the_papers_top_k():
    svg = (ROOT / "assets" / "diagram.svg").read_text()
    r = Recipe()
    assert "plain top-K" in svg and "shared block + per-token K" in svg
    assert f"{r.shared_size} shared neurons" in svg and f"N = {r.num_experts} experts" in svg
    assert f"K = {r.top_k} on average" in svg and f"exactly K = {r.top_k} of {r.num_experts}" in svg
    assert r.layers == "1-" and "layer 0 dense" in svg
