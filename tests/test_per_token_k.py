"""Per-token K (adaptive routing at the same mean K): dispatch, best sets, thresholds, training, runs, FLOPs."""
import json

import pytest
import torch

from factorlab.factorize import build_moe, make_partition
from factorlab.flops import flops_per_token, mean_k_plan
from factorlab.models import model_info
from factorlab.moe import count_active_experts, factorized_layers, layer_mean_k, set_top_k
from factorlab.par import (best_sets, layer_labels, min_experts, per_token_rounds, refit_down, router_bce_loss,
                           router_kl_loss, subset_masks, train, train_router, tune_thresholds)
from factorlab.recipe import Recipe
from factorlab.runs import load_moe, moe_tensors, save_run


def _recipe(**values) -> Recipe:
    """A recipe for the tiny model (every layer, random split, no shared neurons unless given)."""
    return Recipe(**{"model": "tiny", "split": "random", "layers": "all", "shared_size": 0, **values})


def _save(name, recipe, part, moe, tuned):
    """Save a run as workflows does: the recipe once, and the facts derived from the model."""
    from types import SimpleNamespace

    from factorlab.workflows import run_config

    return save_run(name, run_config(recipe, part, SimpleNamespace(source="tiny"), moe), moe_tensors(moe, part, tuned))


def _adaptive_moe(tiny_model, mode="scaled", k=2, shared=0):
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0)) if shared else None
    part = make_partition(tiny_model, 4, "random", seed=0, calibration_ids=calib, shared_size=shared)
    moe = build_moe(tiny_model, part, top_k=k, output_mode=mode)
    with torch.no_grad():
        for mlp in factorized_layers(moe).values():
            mlp.router.linear.weight.normal_()
            mlp.set_thresholds(torch.tensor([0.99, 0.6, 0.3, 0.0]))
    return part, moe


@pytest.mark.parametrize("mode", ["scaled", "gated"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_per_token_dispatch_equals_the_masked_reference(tiny_model, mode, k):
    _, moe = _adaptive_moe(tiny_model, mode, k, shared=16)
    mlp = factorized_layers(moe)[0]
    for shape in [(1, 1, 64), (1, 2, 64), (3, 7, 64), (2, 33, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(mlp(x), mlp.forward_reference(x), atol=1e-5)


def test_tokens_run_a_varying_number_of_experts_and_k_n_runs_all(tiny_model):
    _, moe = _adaptive_moe(tiny_model, "scaled", 2)
    mlp = factorized_layers(moe)[0]
    x = torch.randn(500, 64)
    with torch.no_grad():
        weights = mlp.routing_weights(x)
        sizes = (weights > 0).sum(1)
        assert sizes.min() >= 1 and sizes.max() > sizes.min()  # per token, not a fixed K
        assert torch.allclose(weights[weights > 0], torch.tensor(2.0))  # scaled: N / nominal K
        with count_active_experts(moe) as active:
            moe(torch.randint(0, 128, (2, 25)))
        assert set(active) == {0, 1} and all(1.0 <= v <= 4.0 for v in active.values())
        set_top_k(moe, 4)  # threshold 0: every expert, weight N/N = 1: the dense FFN (untrained weights)
        dense = tiny_model.model.layers[0].mlp
        assert torch.allclose(mlp(x), dense(x), atol=1e-5)
    with pytest.raises(ValueError, match="one threshold per K"):
        mlp.set_thresholds(torch.tensor([0.5, 0.2]))
    mlp.set_thresholds(None)
    assert not mlp.adaptive and layer_mean_k(moe) == {0: 4.0, 1: 4.0}


def test_best_sets_pick_each_tokens_best_set_of_its_size(tiny_model):
    _, moe = _adaptive_moe(tiny_model, "scaled", 2)
    mlp = factorized_layers(moe)[0]
    x = torch.randn(400, 64)
    with torch.no_grad():
        target = tiny_model.model.layers[0].mlp(x)
        labels = best_sets(mlp, x, target, 2.0, chunk=128)
        assert abs(labels.sum(1).mean().item() - 2.0) < 0.1
        masks = subset_masks(4)
        outs = mlp.expert_outputs(x) * 2.0  # (T, N, H), scaled weight N/K
        errs = ((target.unsqueeze(1) - torch.einsum("sn,tnh->tsh", masks, outs)).pow(2).sum(-1))  # (T, 15)
    chosen = (labels.unsqueeze(1) == masks.unsqueeze(0)).all(-1).float().argmax(1)  # each token's set
    for t in range(len(x)):
        same_size = masks.sum(1) == labels[t].sum()
        assert errs[t, chosen[t]] <= errs[t, same_size].min() + 1e-4


def test_thresholds_give_the_mean_k_they_are_tuned_for():
    scores = torch.rand(2000, 4, generator=torch.Generator().manual_seed(0))
    thresholds, means = tune_thresholds(scores)
    assert torch.allclose(means, torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=0.01)
    assert torch.all(thresholds[:-1] >= thresholds[1:]) and thresholds[-1] == 0
    # each threshold sits in the widest gap near its quantile, away from every score: a rounding-level change
    # of the scores (another thread or process count) moves no token across it
    rest = scores.sort(1, descending=True).values[:, 1:].flatten().sort().values
    typical_gap = (rest[1:] - rest[:-1]).median()
    for tau in thresholds[1:-1]:
        assert (rest - tau).abs().min() > typical_gap


def test_per_token_rounds_beat_top_k_at_the_same_mean(tiny_model):
    """Tokens of unequal size (norms 0.5 and 3, as FFN inputs vary): on held-out inputs, per-token K at
    mean <= 2 fits the FFN clearly better than the same layer trained for top-2 (PAR router, refit).
    Every token runs its best expert (min 1, the rule without shared neurons): on these random
    inputs a router cannot tell which tokens need no routed expert."""
    part = make_partition(tiny_model, 4, "random", seed=0)
    moe = build_moe(tiny_model, part, top_k=2)
    mlp, dense = factorized_layers(moe)[0], tiny_model.model.layers[0].mlp
    g = torch.Generator().manual_seed(1)

    def data(n):
        return torch.randn(n, 64, generator=g) * torch.where(torch.rand(n, 1, generator=g) < 0.3, 3.0, 0.5)

    x, held = data(3000), data(1000)
    recipe = _recipe(top_k=2, per_token_rounds=3, per_token_router_steps=66)
    with torch.no_grad():
        target, held_target = dense(x), dense(held)
    train_router(mlp, x, layer_labels(mlp, x, target, 2, 1024), recipe, steps=200, loss_fn=router_kl_loss,
                 check=lambda: None)
    refit_down(mlp, x, target, 1e-3, 1024)
    with torch.no_grad():
        before = (mlp(held) - held_target).pow(2).sum() / held_target.pow(2).sum()
    assert min_experts(mlp) == 1
    per_token_rounds(mlp, x, target, recipe, lambda: None, None, 1024)
    with torch.no_grad(), count_active_experts(moe) as active:
        after = (mlp(held) - held_target).pow(2).sum() / held_target.pow(2).sum()
    assert mlp.adaptive and mlp.min_experts == 1 and 1.7 < active[0] < 2.1
    assert after < 0.92 * before


def test_a_per_token_k_run_trains_saves_reloads_and_counts_its_flops(tiny_model, runs_dir):
    part = make_partition(tiny_model, 4, "random", seed=0)
    moe = build_moe(tiny_model, part, top_k=2)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = _recipe(mode="experts", top_k=2, router_steps=50, router_batch=64, per_token_rounds=1,
                     per_token_router_steps=50)
    result = train(tiny_model, moe, ids, recipe)
    layers = factorized_layers(moe)
    assert all(m.adaptive for m in layers.values()) and set(result.layer_mse) == {0, 1}
    path = _save("ptk", recipe, part, moe, ("down", "shared_down"))
    again = load_moe("ptk", tiny_model)
    with torch.no_grad():
        assert torch.equal(again(ids[:2]).logits, moe(ids[:2]).logits)
    means = layer_mean_k(again, 2)
    assert all(abs(v - 2.0) < 0.05 for v in means.values())
    info = model_info(tiny_model)
    stored = json.loads((path / "config.json").read_text())["per_token_k"]  # what the run says training measured
    assert set(stored) == {"0", "1"} and all(len(v) == 4 for v in stored.values())
    plan = mean_k_plan(stored, 2)
    assert plan == pytest.approx(means, abs=1e-4)
    measured = flops_per_token(info, 64, 4, 2, [0, 1], top_k_per_layer=plan)["ffn"]
    assert measured == pytest.approx(flops_per_token(info, 64, 4, 2, [0, 1])["ffn"], rel=0.03)


def test_mean_k_plan_and_recipe_checks():
    assert mean_k_plan(None, 2) is None and mean_k_plan({}, 2) is None
    assert mean_k_plan({"3": [1.0, 2.1, 3.05, 4.0]}, 2) == {3: 2.1}
    assert mean_k_plan({"3": [1.0, 2.1, 3.05, 4.0]}, 3) == {3: 3.05}
    with pytest.raises(ValueError, match="per_token_rounds must be at least 0"):
        _recipe(per_token_rounds=-1)
    with pytest.raises(ValueError, match="at most 8 experts"):
        _recipe(num_experts=16, top_k=2)
    assert not _recipe(num_experts=16, top_k=2, per_token_rounds=0).per_token  # plain top-K: any N
    assert not _recipe(mode="router").per_token  # only the experts mode fits experts


def test_routing_traces_record_the_experts_that_ran(tiny_model):
    from factorlab.lab import Routing
    from factorlab.moe import chosen_lists, record_routing

    _, moe = _adaptive_moe(tiny_model, "scaled", 2)
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad(), record_routing(moe) as trace:
        moe(ids)
    index, _ = trace.stacked()
    lists = chosen_lists(index[0])
    seen = {}
    handle = factorized_layers(moe)[0].register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].reshape(-1, 64)))
    with torch.no_grad():
        moe(ids)
        weights = factorized_layers(moe)[0].routing_weights(seen["x"])
    handle.remove()
    assert [sorted(r) for r in lists] == [sorted((w > 0).nonzero().flatten().tolist()) for w in weights]
    assert len({len(r) for r in lists}) > 1  # per-token K: the counts vary
    routing = Routing(["a", "b"], [0], {0: [[1], [0, 2]]}, {0: [[0.25] * 4] * 2}, 4)
    assert routing.loads()[0] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_tokens_may_run_no_expert_when_allowed(tiny_model, runs_dir):
    """min_experts 0: a token may run only the shared block; labels, thresholds, dispatch and runs follow."""
    part, moe = _adaptive_moe(tiny_model, "gated", 1, shared=16)
    mlp = factorized_layers(moe)[0]
    x = torch.randn(600, 64)
    with torch.no_grad():
        target = tiny_model.model.layers[0].mlp(x)
        labels = best_sets(mlp, x, target, 1.0, chunk=256, least=0)
        assert (labels.sum(1) == 0).any() and abs(labels.sum(1).mean().item() - 1.0) < 0.1
        scores = mlp.router.linear(x).sigmoid()
    thresholds, means = tune_thresholds(scores, least=0)
    assert torch.allclose(means, torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=0.01)
    for m in factorized_layers(moe).values():
        m.set_thresholds(thresholds, means, min_experts=0)
    with torch.no_grad():
        weights = mlp.routing_weights(x)
        none = (weights == 0).all(1)
        assert none.any()
        out, ref = mlp(x), mlp.forward_reference(x)
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(out[none], mlp.shared_output(x[none]), atol=1e-6)  # the shared block alone
        first_none = int(none.nonzero()[0])
        for i in [first_none] + list(range(10)):  # decode (one token at a time) takes its own path
            assert torch.allclose(mlp(x[i:i + 1]), ref[i:i + 1], atol=1e-5)
    _save("none", _recipe(top_k=1, output_mode="gated", shared_size=16, mode="experts"), part, moe, True)
    again = factorized_layers(load_moe("none", tiny_model))[0]
    assert again.min_experts == 0 and torch.equal(again(x), mlp(x))
    with pytest.raises(ValueError, match="min_experts must be 0 or 1"):
        mlp.set_thresholds(thresholds, means, min_experts=2)


def test_the_heatmap_shows_tokens_that_run_no_routed_expert():
    from factorlab.viz import routing_heatmap

    fig = routing_heatmap(["a", "b", "c"], [1], {1: [[2], [], [0, 3, 1]]}, {1: [[0.1, 0.2, 0.6, 0.1]] * 3}, 4)
    assert fig.data[0].z[0] == (2, None, 0) or list(fig.data[0].z[0]) == [2, None, 0]
    assert "none (the shared neurons only)" in fig.data[0].customdata[0][1]


def test_tokens_may_skip_the_routed_experts_only_where_shared_neurons_remain(tiny_model):
    x = torch.randn(800, 64)
    with torch.no_grad():
        target = tiny_model.model.layers[0].mlp(x)
    for shared, least in ((0, 1), (16, 0)):
        _, moe = _adaptive_moe(tiny_model, "scaled", 2, shared=shared)
        mlp = factorized_layers(moe)[0]
        mlp.set_thresholds(None)
        assert min_experts(mlp) == least
        per_token_rounds(mlp, x, target, _recipe(shared_size=shared, per_token_rounds=1, per_token_router_steps=20),
                         lambda: None, None, 400)
        assert mlp.adaptive and mlp.min_experts == least


@pytest.mark.parametrize("mode,shared,adaptive", [("scaled", 16, True), ("scaled", 0, True), ("gated", 16, False),
                                                  ("scaled", 0, False), ("gated", 0, True)])
def test_block_normal_equations_equal_the_full_design(tiny_model, mode, shared, adaptive):
    """The refit's normal equations, accumulated only over the blocks each token's experts fill, equal
    A^T A and A^T t of the full design matrix (zeros where an expert does not run)."""
    from factorlab.par import normal_equations

    _, moe = _adaptive_moe(tiny_model, mode, 2, shared=shared)
    mlp = factorized_layers(moe)[0]
    if not adaptive:
        mlp.set_thresholds(None)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(257, 64, generator=g), torch.randn(257, 64, generator=g)
    with torch.no_grad():
        acts = mlp.expert_activations(x) * mlp.routing_weights(x).unsqueeze(-1)  # (T, N, D)
        parts = [acts.reshape(x.shape[0], -1)]
        if shared:
            h = x @ mlp.shared_gate_up.t()
            parts.insert(0, mlp.act_fn(h[:, :shared]) * h[:, shared:])
        a = torch.cat(parts, 1).double()
        cols = a.shape[1]
        gram, cross = torch.zeros(cols, cols, dtype=torch.float64), torch.zeros(cols, 64, dtype=torch.float64)
        normal_equations(mlp, x, t, gram, cross)
    assert (mlp.routing_weights(x) == 0).any()  # the routing leaves blocks empty
    assert torch.allclose(gram, a.t() @ a, rtol=1e-4, atol=1e-4)
    assert torch.allclose(cross, a.t() @ t.double(), rtol=1e-4, atol=1e-4)


def test_per_token_rounds_train_the_router_for_their_own_step_count(tiny_model, monkeypatch):
    import factorlab.par.per_token as per_token
    import factorlab.par.trainer as trainer

    seen = []

    def spy(real):
        def wrapped(mlp, x, labels, recipe, *, steps, loss_fn, **kw):
            seen.append((loss_fn, steps))
            return real(mlp, x, labels, recipe, steps=steps, loss_fn=loss_fn, **kw)
        return wrapped

    monkeypatch.setattr(trainer, "train_router", spy(trainer.train_router))
    monkeypatch.setattr(per_token, "train_router", spy(per_token.train_router))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    _, moe = _adaptive_moe(tiny_model, "scaled", 2, shared=16)
    train(tiny_model, moe, ids, _recipe(shared_size=16, top_k=2, router_steps=20, router_batch=64,
                                        per_token_rounds=2, per_token_router_steps=7))
    # per layer: the PAR router (KL to its labels), then each round's router (BCE to the best sets)
    assert seen == [(router_kl_loss, 20), (router_bce_loss, 7), (router_bce_loss, 7)] * 2
    with pytest.raises(ValueError, match="per_token_router_steps must be at least 1"):
        _recipe(per_token_router_steps=0)


def test_the_set_size_multiplier_lies_midway_between_two_token_decisions():
    """best_sets' multiplier: bisection ends where one token is indifferent between two sets; the multiplier used
    is midway across the interval in which no token changes its set, so each token's choice has a margin and a
    rounding-level change of the errors (another thread or process count) decides nothing."""
    from factorlab.par.per_token import _midway

    torch.manual_seed(0)
    size = subset_masks(4).sum(1).double()
    err = torch.rand(500, 1, dtype=torch.float64) * 5 + torch.rand(500, len(size), dtype=torch.float64) / size
    lo, hi = 0.0, 10.0
    for _ in range(60):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if size[(err + lam * size).argmin(1)].mean() > 2.0 else (lo, lam)
    cost = err + hi * size
    edge = cost.sort(1).values
    assert (edge[:, 1] - edge[:, 0]).min() < 1e-12  # at the bisection's end one token sits on a tie
    mid = _midway(err, size, hi)
    assert mid > hi
    cost_mid = err + mid * size
    assert torch.equal(cost_mid.argmin(1), cost.argmin(1))  # the same sets
    margin = cost_mid.sort(1).values
    assert (margin[:, 1] - margin[:, 0]).min() > 1e-6  # and every choice has a margin
