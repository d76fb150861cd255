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


def test_rows_are_resumable(tmp_path, monkeypatch):
    calls = []

    def fake_train_model(spec, cfg, data, loaded, eval_ks=None):
        calls.append((spec.split, cfg.mode, data.train_tokens))
        summary = {"mean_router_label_accuracy": 0.5}
        return SimpleNamespace(seconds=1.0, tokens=data.train_tokens, heldout={"2": {"perplexity": 3.0}},
                               result=SimpleNamespace(summary=lambda: summary), moe=None)

    monkeypatch.setattr(experiment, "train_model", fake_train_model)
    monkeypatch.setattr("factorlab.models.load_model", lambda spec: SimpleNamespace(model=None, tokenizer=None))
    cfg = {"base": {"top_k": 2}, "grid": {"mode": ["router", "none"]}, "data": {"train_tokens": 512}}
    out = tmp_path / "out.json"
    experiment.run_experiment(cfg, out)
    assert len(calls) == 2
    experiment.run_experiment(cfg, out)  # nothing left to do
    assert len(calls) == 2
    cfg["grid"]["mode"].append("experts")
    done = experiment.run_experiment(cfg, out)
    assert len(calls) == 3 and len(done["rows"]) == 3
    assert json.loads(out.read_text())["rows"][0]["heldout"]["2"]["perplexity"] == 3.0
    lines = experiment.table(done["rows"])
    assert lines[0]["ppl"] == 3.0 and lines[0]["K"] == "2"
