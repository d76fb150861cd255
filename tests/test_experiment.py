"""The experiment grid: expansion, validation, and resumability (finished rows are skipped)."""
import json
from types import SimpleNamespace

import pytest

from factorlab import experiment


def test_expand_grid_and_rows():
    cfg = {"base": {"num_experts": 4, "top_k": 2}, "grid": {"split": ["random", "cluster"], "mode": ["router", "none"]},
           "rows": [{"shared_size": 256}]}
    settings = experiment.expand(cfg)
    assert len(settings) == 5
    assert {"num_experts": 4, "top_k": 2, "split": "cluster", "mode": "none"} in settings
    assert settings[-1] == {"num_experts": 4, "top_k": 2, "shared_size": 256}
    only_rows = experiment.expand({"base": {"top_k": 1}, "rows": [{"mode": "none"}]})
    assert only_rows == [{"top_k": 1, "mode": "none"}]
    with pytest.raises(ValueError, match="unknown setting"):
        experiment.expand({"grid": {"experts": [4]}})
    with pytest.raises(ValueError, match="K \\(top_k\\) must be in 1..4"):  # every row is checked up front
        experiment.expand({"rows": [{"top_k": 2}, {"top_k": 5}]})
    with pytest.raises(ValueError, match="`data` block is gone"):
        experiment.expand({"data": {"source": "builtin"}})


def test_setting_recipe_starts_from_its_preset():
    from factorlab.recipe import Recipe, preset

    assert experiment.setting_recipe({"label": "x"}) == Recipe()
    assert experiment.setting_recipe({"preset": "paper", "seed": 3, "label": "p"}) == preset("paper", seed=3)


def test_rows_are_resumable(tmp_path, monkeypatch):
    calls = []

    def fake_train_model(recipe, *, loaded, eval_ks=None):
        calls.append((recipe.split, recipe.mode, recipe.train_tokens))
        summary = {"mean_router_label_accuracy": 0.5}
        return SimpleNamespace(seconds=1.0, tokens=recipe.train_tokens, heldout={"2": {"perplexity": 3.0}},
                               result=SimpleNamespace(summary=lambda: summary), moe=None)

    monkeypatch.setattr(experiment, "train_model", fake_train_model)
    monkeypatch.setattr(experiment, "gflops_by_k", lambda dense, moe, ks: {"2": 0.2})
    monkeypatch.setattr("factorlab.models.load_model", lambda spec: SimpleNamespace(model=None, tokenizer=None))
    cfg = {"base": {"top_k": 2, "train_tokens": 512}, "grid": {"mode": ["router", "none"]}}
    out = tmp_path / "out.json"
    experiment.run_experiment(cfg, out)
    assert calls == [("cluster", "router", 512), ("cluster", "none", 512)]
    experiment.run_experiment(cfg, out)  # nothing left to do
    assert len(calls) == 2
    cfg["grid"]["mode"].append("experts")
    done = experiment.run_experiment(cfg, out)
    assert len(calls) == 3 and len(done["rows"]) == 3
    assert json.loads(out.read_text())["rows"][0]["heldout"]["2"]["perplexity"] == 3.0
    lines = experiment.table(done["rows"])
    assert lines[0]["ppl"] == 3.0 and lines[0]["K"] == "2"


def test_dense_cache_round_trip_and_merge(tmp_path):
    from factorlab.evaluate import TaskScores

    path = tmp_path / "dense.json"
    a = TaskScores("piqa", 2, 0.5, 0.35, 0.5, 0.35, 0.5, 1.0, 20.0, [[-1.0, -2.0], [-3.0, -0.5]])
    b = TaskScores("boolq", 1, 1.0, None, None, None, 0.62, 1.0, 90.0, [[-0.1, -2.0]])
    experiment.write_dense_cache(path, "default", {("piqa", 500, 0, "validation", "x"): a})
    experiment.write_dense_cache(path, "default", {("boolq", 500, 0, "validation", "x"): b})  # another process
    back = experiment.read_dense_cache(path, "default")
    assert back == {("piqa", 500, 0, "validation", "x"): a, ("boolq", 500, 0, "validation", "x"): b}
    assert back[("piqa", 500, 0, "validation", "x")].main == 0.5
    assert experiment.read_dense_cache(path, "other-model") == {}
    assert experiment.read_dense_cache(tmp_path / "missing.json", "default") == {}


def test_gflops_by_k_real_shapes(tiny_model):
    from factorlab.factorize import build_moe, make_partition

    moe = build_moe(tiny_model, make_partition(tiny_model, 4, "random", seed=0), top_k=2)
    g = experiment.gflops_by_k(tiny_model, moe, [1, 2, 4])
    assert g["1"] < g["2"] < g["4"]
    assert g["4"] == pytest.approx(g["dense"], rel=0.01)  # K=N runs every neuron (plus a tiny router)


def test_summary_over_a_subset_of_tasks(tmp_path, monkeypatch):
    def fake_train_model(recipe, *, loaded, eval_ks=None):
        return SimpleNamespace(seconds=1.0, tokens=512, heldout={"2": {"perplexity": 3.0}}, moe=None,
                               result=SimpleNamespace(summary=lambda: {"mean_router_label_accuracy": 0.5}))

    def task(rel, above):
        return {"k": {"2": {"relative": rel, "above_chance": above}}}

    def fake_sweep(dense, tok, moe, tasks, ks, *args, **kw):
        t = {"piqa": task(0.9, 0.5), "arc_easy": task(1.2, 0.7), "mmlu": task(0.2, None)}
        return {"tasks": t, "summary": {}}

    monkeypatch.setattr(experiment, "train_model", fake_train_model)
    monkeypatch.setattr(experiment, "gflops_by_k", lambda dense, moe, ks: {"2": 0.2})
    monkeypatch.setattr("factorlab.evaluate.run_sweep", fake_sweep)
    monkeypatch.setattr("factorlab.models.load_model", lambda spec: SimpleNamespace(model=None, tokenizer=None))
    cfg = {"base": {"top_k": 2, "train_tokens": 512}, "rows": [{"mode": "none"}],
           "eval": {"tasks": "piqa,arc_easy,mmlu", "summary_tasks": "piqa,arc_easy"}}
    row = experiment.run_experiment(cfg, tmp_path / "o.json")["rows"][0]
    sub = row["eval"]["summary_subset"]
    assert sub["tasks"] == ["piqa", "arc_easy"]
    assert sub["k"]["2"]["relative_capped"] == pytest.approx(0.95)  # (0.9 + 1.0 capped) / 2, MMLU left out
    assert sub["k"]["2"]["above_chance"] == pytest.approx(0.6)
    assert experiment.table([row])[0]["relative"] == pytest.approx(0.95)
