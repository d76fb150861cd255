"""The Recipe: one set of defaults for the library, the CLI and the app; presets that train; checks with
clear messages; runs saved before the Recipe (format 1, commit 25c6601) still load with the same logits."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from factorlab.recipe import PRESETS, Recipe, parse_assignments, parse_layers, preset, recipe_fields

FIXTURES = Path(__file__).parent / "fixtures"
SMOLLM = {"intermediate_size": 1536, "num_layers": 30}  # the embedded model's shapes (models.model_info)


def test_one_default_everywhere(monkeypatch):
    """Recipe() == what `python -m factorlab train x` trains == what the app's controls show on a fresh page."""
    import app
    import factorlab.workflows as workflows
    from factorlab import lab
    from factorlab.cli import main

    seen = []
    monkeypatch.setattr(workflows, "train_run", lambda recipe, name, **kw: seen.append(recipe) or
                        {"run": name, "seconds": 0.0, "tokens": 0, "heldout_by_k": {}, "train": {}})
    assert main(["train", "x", "--json"]) == 0
    page = lab.recipe_from_controls({name: control.value for name, control in app.SETTINGS.items()})
    assert seen == [Recipe()] and page == Recipe()
    assert Recipe().preset_name() == "default" and preset("default") == Recipe()


def test_defaults_are_the_measured_recipe():
    """The documented default recipe (docs/research.md, 'The default recipe'), field by field."""
    r = Recipe()
    assert (r.model, r.num_experts, r.top_k, r.split, r.layers, r.shared_size, r.output_mode) == \
        ("default", 4, 2, "cluster", "1-", 256, "scaled")
    assert (r.data, r.train_tokens, r.heldout_tokens, r.seq_len, r.calibration_tokens) == \
        ("builtin", 32768, 8192, 256, 4096)
    assert (r.mode, r.router_steps, r.per_token_rounds, r.per_token_router_steps, r.ridge, r.e2e_steps) == \
        ("experts", 600, 5, 200, 1e-3, 0)
    assert r.validate(SMOLLM) == list(range(1, 30))


def test_presets_validate_against_the_embedded_shapes():
    for name, (text, changes) in PRESETS.items():
        recipe = preset(name)
        assert text and recipe.preset_name() == name
        assert recipe.differences() == changes, name  # a preset is data: its changes, nothing hidden
        recipe.validate(SMOLLM)
    paper = preset("paper")
    assert (paper.split, paper.layers, paper.shared_size, paper.top_k, paper.per_token, paper.output_mode) == \
        ("contiguous", "all", 0, 1, False, "scaled")
    assert not preset("no-par").per_token and preset("no-par").router_steps == 0


@pytest.mark.parametrize("values, message", [
    ({"top_k": 5}, r"K \(top_k\) must be in 1..4"),
    ({"num_experts": 0}, "num_experts must be at least 1"),
    ({"split": "coverage"}, "split='coverage' is not a choice: use one of contiguous, random, cluster"),
    ({"num_experts": 16}, "per-token K scores every set of experts, so at most 8"),
    ({"train_tokens": 100}, "train_tokens must be at least one row of 256 tokens"),
    ({"minutes": 0}, "minutes must be positive, or None"),
    ({"layers": "x-3"}, "write 'all', '1-' or ranges"),
    ({"router_steps": 1.5}, "router_steps must be a whole number"),
    ({"model": " "}, "model is empty"),
])
def test_bad_recipes_say_what_to_fix(values, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**values)


def test_validate_against_a_model_names_the_fix():
    with pytest.raises(ValueError, match=r"3 experts do not divide the FFN width 1280 \(after 256 shared neurons\): "
                                         r"choose N from \[2, 4, 5"):
        Recipe(num_experts=3).validate({"intermediate_size": 1536, "num_layers": 30})
    with pytest.raises(ValueError, match=r"out of range: this model has layers 0..29"):
        Recipe(layers="0-30").validate(SMOLLM)
    with pytest.raises(ValueError, match="shared_size must be in 0..1535"):
        Recipe(shared_size=1536).validate(SMOLLM)
    assert Recipe(layers="0-3,10").validate(SMOLLM) == [0, 1, 2, 3, 10]
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("1-", 3) == [1, 2]


def test_set_assignments_replace_and_round_trip():
    assert parse_assignments(["router_steps=300", "ridge=0.1", "minutes=none", "split=random"]) == \
        {"router_steps": 300, "ridge": 0.1, "minutes": None, "split": "random"}
    with pytest.raises(ValueError, match="unknown recipe setting 'gate_up_steps'"):
        parse_assignments(["gate_up_steps=5"])
    r = Recipe().replace(seed=3, data="local")
    assert r.differences() == {"seed": 3, "data": "local"} and r.preset_name() is None
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="unknown recipe setting"):
        Recipe().replace(first_token_dense=True)
    with pytest.raises(TypeError):
        Recipe(4)  # keyword-only: no setting travels by position
    with pytest.raises(Exception):
        r.seed = 1  # frozen
    described = "\n".join(Recipe().describe())
    for f in recipe_fields():
        assert f.name in described and f.metadata["help"] in described


def _tiny(recipe: Recipe) -> Recipe:
    """A preset shrunk to a 2-layer test model: fewer shared neurons, tokens and steps; the rest kept."""
    small = {"shared_size": min(recipe.shared_size, 32), "calibration_tokens": 256, "data": "local",
             "train_tokens": 512, "heldout_tokens": 256, "seq_len": 64,
             "router_steps": min(recipe.router_steps, 20), "per_token_router_steps": 5,
             "per_token_rounds": min(recipe.per_token_rounds, 1)}
    return recipe.replace(model="tiny", **small)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains_a_tiny_model(name, embedded):
    """Each preset, shrunk, factorizes and trains a tiny Llama (the embedded model's tokenizer) and gives
    the model its recipe describes: per-token K or plain top-K, its layers, shared width and router."""
    from tests.conftest import tiny_llama

    from factorlab.factorize import build_moe
    from factorlab.moe import factorized_layers
    from factorlab.workflows import train_model

    recipe = _tiny(preset(name))
    dense = tiny_llama(vocab=embedded.tokenizer.vocab_size + 64)
    loaded = SimpleNamespace(model=dense, tokenizer=embedded.tokenizer, source="tiny random Llama")
    t = train_model(recipe, loaded=loaded, eval_ks=[1, recipe.top_k])
    layers = factorized_layers(t.moe)
    assert sorted(layers) == recipe.validate({"intermediate_size": 128, "num_layers": 2})
    for m in layers.values():
        assert (m.num_experts, m.top_k, m.shared_size, m.output_mode) == \
            (recipe.num_experts, recipe.top_k, recipe.shared_size, recipe.output_mode)
        assert m.adaptive == recipe.per_token
    untrained = build_moe(dense, t.partition, recipe.top_k, recipe.output_mode, router_seed=recipe.seed)
    same_router = all(torch.equal(m.router.linear.weight, factorized_layers(untrained)[i].router.linear.weight)
                      for i, m in layers.items())
    assert same_router == (recipe.router_steps == 0)  # no-par keeps the untrained router; PAR changes it
    for k, h in t.heldout.items():
        assert h["perplexity"] > 0 and torch.isfinite(torch.tensor(h["perplexity"])), (name, k)
    assert all(v == v for v in t.result.layer_mse.values())  # finite refit errors for every layer


def _legacy_run(tmp_path: Path, **config_changes) -> str:
    """The format-1 run written by factorlab at commit 25c6601 (tests/fixtures), copied, its config changed."""
    target = tmp_path / "runs" / "legacy"
    shutil.copytree(FIXTURES / "legacy_run_25c6601", target)
    config = json.loads((target / "config.json").read_text())
    for key, value in config_changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def test_a_run_saved_before_the_recipe_loads_with_the_same_logits(tmp_path):
    """The fixture: a 2-layer tiny Llama (tests.conftest.tiny_llama(), seed 0), layer 1 factorized into 4
    cluster experts + 32 energy-share shared neurons, trained with PAR, the refit and one per-token round
    by factorlab at 25c6601, with the logits that code gave on fixed token ids."""
    from safetensors.torch import load_file

    from factorlab.runs import load_moe, load_run
    from tests.conftest import tiny_llama

    run = load_run(_legacy_run(tmp_path))
    assert run.config["versions"]["format"] == 1 and "recipe" not in run.config
    assert run.recipe == Recipe(model="tiny", split="cluster", layers="1-", shared_size=32, calibration_tokens=256,
                                train_tokens=512, heldout_tokens=0, seq_len=64, router_steps=20,
                                per_token_rounds=1, per_token_router_steps=10)
    assert run.removed_settings == {} and run.layers == [1] and run.per_token_k == {"1": [1.0, 2.0, 3.0, 4.0]}
    expected = load_file(str(FIXTURES / "legacy_run_25c6601_logits.safetensors"))
    moe = load_moe(run, tiny_llama())
    with torch.no_grad():  # fp32 rounding only: the fixture was written on another CPU (5.96e-8 on an AMD EPYC)
        torch.testing.assert_close(moe(expected["ids"]).logits, expected["logits"], rtol=0, atol=1e-6)


def test_old_runs_with_removed_settings(tmp_path):
    """A removed setting that inference does not use (how the shared neurons were chosen, refine rounds)
    is reported and the run loads; one that changed inference (first token dense, a per-layer K plan)
    is refused with the commit that can still run it."""
    from factorlab.runs import RunError, load_moe, load_run
    from tests.conftest import tiny_llama

    old = load_run(_legacy_run(tmp_path / "a", partition={"shared_choice": "frequency"},
                               train={"refine_rounds": 2}))
    assert old.removed_settings == {"shared_choice": "frequency", "refine_rounds": 2}
    load_moe(old, tiny_llama())
    first = load_run(_legacy_run(tmp_path / "b", first_token_dense=True))
    with pytest.raises(RunError, match="first_token_dense=True.*commit 25c6601"):
        load_moe(first, tiny_llama())
    plan = load_run(_legacy_run(tmp_path / "c", k_offsets={"1": 1}))
    with pytest.raises(RunError, match="layer_k=.*git checkout 25c6601"):
        load_moe(plan, tiny_llama())
