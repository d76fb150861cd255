"""Every K on the slider is a real model (issue 34): K = N is the dense model again after training, and
every K < N runs its own refit (stored with the run, used whenever K changes)."""
from types import SimpleNamespace

import pytest
import torch

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers, set_top_k
from factorlab.par import train
from factorlab.recipe import Recipe

N = 4


def _trained(tiny_model, **changes):
    """A tiny model factorized into 4 experts + 32 shared neurons and trained at K=2 (experts mode)."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(**{"model": "tiny", "split": "random", "layers": "all", "shared_size": 32, "top_k": 2,
                       "router_steps": 20, "per_token_rounds": 1, "per_token_router_steps": 10, **changes})
    part = make_partition(tiny_model, N, "random", seed=0, shared_size=32, calibration_ids=ids)
    moe = build_moe(tiny_model, part, top_k=2, output_mode=recipe.output_mode)
    train(tiny_model, moe, ids, recipe)
    return ids, recipe, part, moe


def _logits(model, ids, k=None):
    if k is not None:
        set_top_k(model, k)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("changes", [{}, {"per_token_rounds": 0}, {"output_mode": "gated"}])
def test_k_equals_n_is_the_dense_model_whatever_was_trained(tiny_model, changes):
    ids, recipe, part, moe = _trained(tiny_model, **changes)
    dense = _logits(tiny_model, ids)
    assert (_logits(moe, ids, N) - dense).abs().max() < 1e-5
    for mlp in factorized_layers(moe).values():  # without the dense weights at K = N: the refit shows
        mlp.tuned = False
        mlp.set_output_mode("scaled")
    assert (_logits(moe, ids, N) - dense).abs().max() > 1e-3


def test_every_k_below_n_runs_its_own_refit_which_fits_better_than_the_trained_ks(tiny_model):
    ids, recipe, part, moe = _trained(tiny_model)
    mlp = factorized_layers(moe)[1]
    assert sorted(mlp.weights_by_k) == [1, 2, 3] and mlp.trained_k == 2
    x = torch.randn(256, mlp.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = tiny_model.model.layers[1].mlp(x)
    for k in (1, 3):
        mlp.set_top_k(k)
        assert mlp.down.data_ptr() == mlp.weights_by_k[k][0].data_ptr()  # K's own weights, no copy
        with torch.no_grad():
            own = (mlp(x) - teacher).pow(2).mean()
            mlp.down.data, mlp.shared_down.data = mlp.weights_by_k[2]  # the trained K's weights at this K
            reused = (mlp(x) - teacher).pow(2).mean()
        assert own < reused, (k, float(own), float(reused))
    mlp.set_top_k(2)
    assert mlp.down.data_ptr() == mlp.weights_by_k[2][0].data_ptr()


def test_a_run_keeps_every_ks_refit_and_reloads_each_k_exactly(tiny_model, runs_dir):
    from factorlab.runs import load_moe, load_run, moe_tensors, save_run
    from factorlab.workflows import run_config, tuned_params

    ids, recipe, part, moe = _trained(tiny_model)
    before = {k: _logits(moe, ids, k) for k in range(1, N + 1)}
    set_top_k(moe, 3)  # the model runs another K when it is saved: the trained K's weights are still saved as such
    tensors = moe_tensors(moe, part, tuned_params(recipe))
    assert {f"down.k{k}.0" for k in (1, 3)} <= set(tensors) and "down.k2.0" not in tensors
    save_run("every-k", run_config(recipe, part, SimpleNamespace(source="tiny"), moe), tensors)
    again = load_moe(load_run("every-k"), tiny_model)
    assert factorized_layers(again)[0].top_k == 2
    for k in range(1, N + 1):
        assert torch.equal(_logits(again, ids, k), before[k]), k
    assert (before[N] - _logits(tiny_model, ids)).abs().max() < 1e-5


@pytest.mark.slow
def test_k_equals_n_is_the_dense_model_on_the_embedded_model(embedded, runs_dir):
    from factorlab.runs import load_moe
    from factorlab.workflows import train_run

    recipe = Recipe(split="random", layers="1-3", data="local", train_tokens=512, heldout_tokens=0, seq_len=128,
                    router_steps=5, per_token_router_steps=2, per_token_rounds=1)
    train_run(recipe, "k4", loaded=embedded)
    moe = load_moe("k4", embedded.model)
    ids = embedded.tokenizer("The factorized model at K = N is the dense model again.", return_tensors="pt").input_ids
    dense = _logits(embedded.model, ids)
    assert (_logits(moe, ids, N) - dense).abs().max() < 1e-4
    assert (_logits(moe, ids, 2) - dense).abs().max() > 1e-2  # K = 2 is the trained, smaller model
