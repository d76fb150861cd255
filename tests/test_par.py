"""PAR labels and losses on hand-computed tensors; the trainer really trains."""
import math

import pytest
import torch

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from factorlab.par import (TrainingCancelled, balance_loss, combination_labels, label_accuracy, lr_at, pseudo_labels,
                           refit_down, router_bce_loss, router_kl_loss, train)
from factorlab.recipe import Recipe


def test_pseudo_labels_hand_computed():
    experts = torch.tensor([[[1.0], [3.0]], [[0.0], [4.0]]])  # (T=2, N=2, H=1)
    teacher = torch.tensor([[2.0], [7.0]])  # K=1: target = teacher / 2
    mse, mask = pseudo_labels(experts, teacher, top_k=1)
    assert torch.allclose(mse, torch.tensor([[0.0, 4.0], [12.25, 0.25]]))
    assert mask.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    mse2, mask2 = pseudo_labels(experts, teacher, top_k=2)  # K=N: target = teacher, both chosen
    assert mask2.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert torch.allclose(mse2[0], torch.tensor([1.0, 1.0]))


def test_router_losses_hand_computed():
    logits = torch.zeros(1, 2)
    mask = torch.tensor([[1.0, 0.0]])
    p = math.e / (math.e + 1)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert router_kl_loss(logits, mask).item() == pytest.approx(kl, rel=1e-5)
    assert router_bce_loss(logits, mask).item() == pytest.approx(math.log(2), rel=1e-5)
    # KL is zero when the router already equals softmax(mask)
    assert router_kl_loss(mask.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_balance_loss_hand_computed():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # probs [.75,.25] and [.5,.5]
    # K=1: masks [1,0] and one of the tied pair; mean over T*N = (0.75 + 0.5) / 4
    assert balance_loss(logits, 1).item() == pytest.approx(0.3125)
    assert balance_loss(logits, 2).item() == pytest.approx(0.5)  # everything selected: mean of probs


def test_combination_labels_pick_the_best_joint_experts():
    import itertools

    gen = torch.Generator().manual_seed(0)
    outputs, target = torch.randn(40, 4, 6, generator=gen), torch.randn(40, 6, generator=gen)
    mask = combination_labels(outputs, target, weight=2.0, top_k=2)
    assert torch.equal(mask.sum(1), torch.full((40,), 2.0))
    for t in range(40):  # brute force over the 6 pairs
        best = min(itertools.combinations(range(4), 2),
                   key=lambda c: (target[t] - 2.0 * outputs[t, list(c)].sum(0)).pow(2).sum().item())
        assert mask[t].nonzero().flatten().tolist() == sorted(best)
    # hand-computed: expert 1 alone equals the target, experts 0 + 2 sum to it
    o = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-5.0, 0.0]]])
    assert combination_labels(o, torch.tensor([[1.0, 1.0]]), 1.0, 1).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert combination_labels(o, torch.tensor([[1.0, 1.0]]), 1.0, 2).tolist() == [[1.0, 0.0, 1.0, 0.0]]
    greedy = combination_labels(outputs, target, weight=2.0, top_k=2, max_combinations=1)
    assert torch.equal(greedy.sum(1), torch.full((40,), 2.0))
    exact1 = combination_labels(outputs, target, weight=2.0, top_k=1)
    assert torch.equal(combination_labels(outputs, target, 2.0, 1, max_combinations=1), exact1)  # greedy = exact at K=1


def test_label_accuracy_and_schedule():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert label_accuracy(logits, mask, 1) == 0.5
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def _setup(tiny_model, k=1):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    part = make_partition(tiny_model, 4, "random", seed=0)
    return ids, build_moe(tiny_model, part, top_k=k)


def _recipe(**values) -> Recipe:
    """A training recipe for the tiny model: its shapes (no shared neurons, every layer), plain top-K."""
    return Recipe(**{"model": "tiny", "split": "random", "layers": "all", "shared_size": 0,
                     "per_token_rounds": 0, **values})


def test_router_mode_learns_pseudo_labels(tiny_model):
    ids, moe = _setup(tiny_model)
    log = []
    result = train(tiny_model, moe, ids, _recipe(mode="router", top_k=1, router_steps=150, router_batch=128),
                   progress=log.append)
    routes = [r for r in log if r["phase"] == "router"]
    assert len(routes) == 2
    # untrained routers sit near chance (1/4); trained ones predict the labels
    assert result.summary()["mean_router_label_accuracy"] > 0.6


def test_router_loss_falls(tiny_model):
    from factorlab.par import layer_labels, train_router

    ids, moe = _setup(tiny_model)
    mlp = factorized_layers(moe)[0]
    x = torch.randn(512, 64)
    with torch.no_grad():
        teacher = tiny_model.model.layers[0].mlp(x)
    labels = layer_labels(mlp, x, teacher, 1, 256)
    first = train_router(mlp, x, labels, _recipe(), steps=1, loss_fn=router_kl_loss, check=lambda: None)
    later = train_router(mlp, x, labels, _recipe(router_batch=256), steps=200, loss_fn=router_kl_loss,
                         check=lambda: None)
    assert later["route"] < first["route"]
    assert later["label_accuracy"] > first["label_accuracy"]
    assert not mlp.router.linear.weight.requires_grad  # frozen again after its steps


def test_refit_down_reduces_error(tiny_model):
    _, moe = _setup(tiny_model, k=2)
    mlp = factorized_layers(moe)[0]
    x = torch.randn(600, 64)
    with torch.no_grad():
        target = tiny_model.model.layers[0].mlp(x)
        before = torch.nn.functional.mse_loss(mlp(x), target).item()
        refit_down(mlp, x, target, ridge=1e-6, chunk=256)
        after = torch.nn.functional.mse_loss(mlp(x), target).item()
    assert after < 0.5 * before


@pytest.mark.parametrize("per_token_rounds", [0, 2])
def test_experts_mode_beats_none_on_heldout(tiny_model, per_token_rounds):
    ids, moe_none = _setup(tiny_model, k=1)
    _, moe_exp = _setup(tiny_model, k=1)
    train(tiny_model, moe_none, ids, _recipe(mode="none", top_k=1))
    train(tiny_model, moe_exp, ids, _recipe(mode="experts", top_k=1, router_steps=100, router_batch=128,
                                            per_token_rounds=per_token_rounds, per_token_router_steps=100))
    assert all(m.adaptive == bool(per_token_rounds) for m in factorized_layers(moe_exp).values())
    held = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_model(held).logits.log_softmax(-1)

        def kl(m):
            return torch.nn.functional.kl_div(m(held).logits.log_softmax(-1), ref, log_target=True,
                                              reduction="batchmean").item()
        assert kl(moe_exp) < kl(moe_none)


def test_training_is_deterministic(tiny_model):
    ids, a = _setup(tiny_model)
    _, b = _setup(tiny_model)
    recipe = _recipe(mode="experts", top_k=1, router_steps=20, router_batch=64, per_token_rounds=1,
                     per_token_router_steps=10, seed=3)
    train(tiny_model, a, ids, recipe)
    train(tiny_model, b, ids, recipe)
    for (i, ma), mb in zip(factorized_layers(a).items(), factorized_layers(b).values()):
        assert torch.equal(ma.router.linear.weight, mb.router.linear.weight)
        assert torch.equal(ma.down, mb.down)
        assert torch.equal(ma.thresholds, mb.thresholds)


def test_cancel_and_bad_recipe(tiny_model):
    ids, moe = _setup(tiny_model)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(TrainingCancelled):
        train(tiny_model, moe, ids, _recipe(mode="router", router_steps=50), should_stop=stop)
    with pytest.raises(ValueError, match="mode='fast' is not a choice"):
        _recipe(mode="fast")
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        _recipe(ridge=-1.0)
    with pytest.raises(ValueError, match="router_lr must be positive"):
        _recipe(router_lr=0.0)


def test_end_to_end_distillation_runs(tiny_model):
    ids, moe = _setup(tiny_model, k=2)
    log = []
    train(tiny_model, moe, ids, _recipe(mode="experts", top_k=2, router_steps=10, e2e_steps=4, e2e_batch=2),
          progress=log.append)
    e2e = [r["losses"]["kl"] for r in log if r["phase"] == "e2e"]
    assert len(e2e) == 4 and all(math.isfinite(v) for v in e2e)
    assert log[-1]["step"] == log[-1]["total"]


def test_end_to_end_down_only_changes_only_down_projections(tiny_model):
    ids, moe = _setup(tiny_model, k=2)
    recipe = _recipe(mode="experts", top_k=2, router_steps=5, per_token_rounds=1, per_token_router_steps=5,
                     e2e_steps=3, e2e_batch=2, e2e_params="down", e2e_lr=1e-3)
    before = {}

    def snapshot(rec):
        if rec["phase"] == "experts" and rec["layer"] == max(factorized_layers(moe)) and not before:
            before.update({n: p.detach().clone() for n, p in moe.named_parameters()})

    train(tiny_model, moe, ids, recipe, progress=snapshot)
    changed = {n for n, p in moe.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(".down") or n.endswith("shared_down") for n in changed)
    assert not any(p.requires_grad for p in moe.parameters())
    with pytest.raises(ValueError, match="e2e_params='router' is not a choice"):
        _recipe(e2e_params="router")


def test_end_to_end_schedule_fits_the_minutes(tiny_model, monkeypatch):
    ids, moe = _setup(tiny_model, k=2)
    clock = {"t": 0.0}

    def fake_monotonic():  # every call advances 1 s: two timed steps cost a few seconds each
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr("factorlab.par.trainer.time.monotonic", fake_monotonic)
    log = []
    recipe = _recipe(mode="experts", top_k=2, router_steps=2, e2e_steps=1000, e2e_batch=1, minutes=1.0)
    result = train(tiny_model, moe, ids, recipe, progress=log.append)
    e2e = [r for r in log if r["phase"] == "e2e"]
    assert 2 < len(e2e) < 1000  # fitted to the minute, far below the 1000-step cap
    assert e2e[-1]["step"] == e2e[-1]["total"]  # the progress total follows the fitted schedule
    assert not result.stopped_early  # the fitted schedule ends within the budget
    with pytest.raises(ValueError, match="minutes must be positive"):
        _recipe(minutes=0)


@pytest.mark.parametrize("params", ["down", "all"])
def test_a_run_tuned_end_to_end_saves_what_changed_and_reloads_exactly(tiny_model, runs_dir, params):
    from types import SimpleNamespace

    from factorlab.runs import load_moe, moe_tensors, save_run
    from factorlab.workflows import run_config, tuned_params

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    part = make_partition(tiny_model, 4, "random", seed=0)
    moe = build_moe(tiny_model, part, top_k=2)
    recipe = _recipe(mode="experts", top_k=2, router_steps=5, per_token_rounds=1, per_token_router_steps=5,
                     e2e_steps=3, e2e_params=params)
    train(tiny_model, moe, ids, recipe)
    saved = tuned_params(recipe)
    assert ("gate_up" in saved) == (params == "all") and "down" in saved
    save_run("e2e", run_config(recipe, part, SimpleNamespace(source="tiny"), moe), moe_tensors(moe, part, saved))
    again = load_moe("e2e", tiny_model)
    assert all(m.adaptive for m in factorized_layers(again).values())
    with torch.no_grad():
        assert torch.equal(again(ids).logits, moe(ids).logits)


def test_the_time_budget_counts_from_the_callers_start(tiny_model):
    import time

    ids, moe = _setup(tiny_model, k=2)
    log = []
    recipe = _recipe(mode="experts", top_k=2, router_steps=50, e2e_steps=5, minutes=1.0)
    result = train(tiny_model, moe, ids, recipe, progress=log.append, started=time.monotonic() - 120)
    assert result.stopped_early and not [r for r in log if r["phase"] == "e2e"]  # the budget was spent before
    assert result.seconds >= 120


def test_the_pass_trains_each_layer_on_the_inputs_inference_gives_it(tiny_model):
    """Layer 1 is trained on the stream the pass builds through the trained layer 0; a real forward of the
    trained model must give layer 1 the same inputs, so its error there is the one the pass recorded."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    part = make_partition(tiny_model, 4, "random", seed=0)
    moe = build_moe(tiny_model, part, top_k=1)
    result = train(tiny_model, moe, ids, _recipe(mode="experts", top_k=1, router_steps=20, router_batch=128,
                                                 per_token_rounds=1, per_token_router_steps=20))
    seen = []
    handle = moe.model.layers[1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        moe(ids)
    handle.remove()
    x = seen[0].reshape(-1, 64)
    with torch.no_grad():
        mlp, dense = moe.model.layers[1].mlp, tiny_model.model.layers[1].mlp
        mse = torch.nn.functional.mse_loss(mlp(x), dense(x)).item()
    assert mse == pytest.approx(result.layer_mse[1], rel=1e-4)


@pytest.mark.parametrize("rounds", [0, 2])
def test_each_layer_is_refitted_after_its_router_and_after_each_per_token_round(tiny_model, monkeypatch, rounds):
    import factorlab.par.per_token as per_token
    import factorlab.par.trainer as trainer

    calls = []
    real = trainer.refit_down
    spy = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]  # noqa: E731
    monkeypatch.setattr(trainer, "refit_down", spy)
    monkeypatch.setattr(per_token, "refit_down", spy)
    ids, moe = _setup(tiny_model)
    layers = len(factorized_layers(moe))
    train(tiny_model, moe, ids, _recipe(mode="experts", top_k=2, router_steps=5, per_token_rounds=rounds,
                                        per_token_router_steps=5))
    assert len(calls) == layers * (1 + rounds)
