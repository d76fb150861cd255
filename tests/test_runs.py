"""Run store: atomic saves, reload gives identical logits, corrupt runs listed, names sanitised."""

import pytest
import torch

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from factorlab.runs import (RunError, delete_run, list_runs, load_moe, load_run, moe_tensors, read_log,
                            sanitize_name, save_run, update_metrics, write_log)


def _config(part, k=2, **recipe):
    """A run's config as workflows.run_config writes it: the recipe once, the partition's facts."""
    from factorlab.recipe import Recipe

    r = Recipe(model="tiny", num_experts=part.num_experts, top_k=k, split=part.strategy, layers="all",
               shared_size=part.shared_size, output_mode="gated", seed=part.seed, **recipe)
    return {"recipe": r.to_dict(), "layers": part.layers, "expert_size": part.expert_size,
            "intermediate_size": part.intermediate_size}


def test_save_reload_identical_logits(tiny_model, runs_dir):
    part = make_partition(tiny_model, 4, "random", seed=1)
    moe = build_moe(tiny_model, part, top_k=2, output_mode="gated")
    with torch.no_grad():
        for mlp in factorized_layers(moe).values():
            mlp.router.linear.weight.normal_()
            mlp.down.mul_(1.5)  # a "tuned" expert
    save_run("r1", _config(part), moe_tensors(moe, part, tuned=True))
    again = load_moe("r1", tiny_model)
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, moe(ids).logits)


def test_metrics_log_and_listing(tiny_model, runs_dir):
    part = make_partition(tiny_model, 2, "contiguous")
    moe = build_moe(tiny_model, part, top_k=1)
    save_run("a", _config(part, 1), moe_tensors(moe, part, tuned=False), {"x": 1})
    update_metrics("a", {"eval": {"arc": 0.5}})
    assert load_run("a").metrics == {"x": 1, "eval": {"arc": 0.5}}
    write_log("a", [{"step": 1}, {"step": 2}])
    assert [r["step"] for r in read_log("a")] == [1, 2]
    # a corrupt run is listed as such, not fatal
    bad = runs_dir / "broken"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    listed = {r.name: r for r in list_runs()}
    assert listed["a"].ok and not listed["broken"].ok and "corrupt" in listed["broken"].error
    with pytest.raises(RunError, match="already exists"):
        save_run("a", _config(part, 1), moe_tensors(moe, part, tuned=False))
    delete_run("a")
    assert "a" not in {r.name for r in list_runs()}
    with pytest.raises(RunError, match="no run"):
        load_run("a")


def test_failed_save_leaves_earlier_run_intact(tiny_model, runs_dir):
    part = make_partition(tiny_model, 2, "contiguous")
    moe = build_moe(tiny_model, part, top_k=1)
    save_run("keep", _config(part, 1), moe_tensors(moe, part, tuned=False), {"v": 1})
    with pytest.raises(AttributeError):  # not a tensor: the write fails half-way
        save_run("keep", _config(part, 1), {"bad": "not a tensor"}, {"v": 2}, overwrite=True)
    assert load_run("keep").metrics == {"v": 1}
    assert [p.name for p in runs_dir.iterdir()] == ["keep"]  # no temporary leftovers


def test_names_are_sanitised():
    assert sanitize_name("my run") == "my-run"
    assert "/" not in sanitize_name("../../etc/passwd")
    with pytest.raises(RunError, match="empty"):
        sanitize_name("///")


def test_the_recipe_is_stored_once_and_read_back(tiny_model, runs_dir):
    """config.json holds the recipe once (N, K, split... are not repeated elsewhere); Run.recipe reads it; a
    config whose recipe cannot be read makes the run corrupt (listed as such), not a crash later."""
    import json

    part = make_partition(tiny_model, 2, "contiguous", seed=3)
    moe = build_moe(tiny_model, part, top_k=1)
    save_run("once", _config(part, 1, per_token_rounds=0), moe_tensors(moe, part))
    config = json.loads((runs_dir / "once" / "config.json").read_text())
    assert "num_experts" not in config and "top_k" not in config and "partition" not in config
    run = load_run("once")
    assert (run.recipe.num_experts, run.recipe.top_k, run.recipe.seed, run.layers) == (2, 1, 3, [0, 1])
    assert run.partition.expert_size == 64 and run.removed_settings == {}
    config["recipe"]["top_k"] = 7
    (runs_dir / "once" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="corrupt: its settings cannot be read"):
        load_run("once")
    assert not {r.name: r for r in list_runs()}["once"].ok
