"""Run store: atomic saves, reload gives identical logits, corrupt runs listed, names sanitised."""

import pytest
import torch

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from factorlab.runs import (RunError, delete_run, list_runs, load_moe, load_run, moe_tensors, read_log,
                            sanitize_name, save_run, update_metrics, write_log)


def _config(part, k=2):
    return {"model": "tiny", "top_k": k, "output_mode": "gated", "partition": part.to_config(), "mode": "experts"}


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


def test_a_per_layer_k_plan_and_first_token_dense_reload(tiny_model, runs_dir):
    from factorlab.moe import set_k_offsets

    part = make_partition(tiny_model, 4, "random", seed=1)
    moe = build_moe(tiny_model, part, top_k=2, first_token_dense=True)
    set_k_offsets(moe, {1: 1}, 2)
    with torch.no_grad():
        for mlp in factorized_layers(moe).values():
            mlp.router.linear.weight.normal_()
    config = {**_config(part), "output_mode": "scaled", "first_token_dense": True, "k_offsets": {"1": 1}}
    save_run("plan", config, moe_tensors(moe, part, tuned=True))
    again = load_moe("plan", tiny_model)
    assert {i: m.top_k for i, m in factorized_layers(again).items()} == {0: 2, 1: 3}
    assert factorized_layers(again)[0].first_token_dense
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, moe(ids).logits)
