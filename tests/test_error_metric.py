"""The output metric that picks experts (--error-metric output): the dense model's Fisher information at a
layer's FFN output, and labels / per-token sets measured in it."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from factorlab.par import (TrainConfig, adaptive_labels, joint_labels, layer_labels, measured, output_sensitivity,
                           subset_masks, train)


def _moe(tiny_model, shared=16):
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    part = make_partition(tiny_model, 4, "random", seed=0, calibration_ids=calib, shared_size=shared)
    return build_moe(tiny_model, part, top_k=2)


def _kl_with_layer_output_moved(model, ids, layer, direction, eps):
    """Mean KL(dense || dense with `eps * direction` added to the layer's FFN output at every token)."""
    def move(_module, _args, output):
        return output + eps * direction

    with torch.no_grad():
        ref = F.log_softmax(model(ids).logits.float(), -1)
        handle = model.model.layers[layer].mlp.register_forward_hook(move)
        try:
            moved = F.log_softmax(model(ids).logits.float(), -1)
        finally:
            handle.remove()
    return F.kl_div(moved, ref, log_target=True, reduction="none").sum(-1).mean().item()


def test_output_sensitivity_is_the_dense_outputs_fisher(tiny_model):
    ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))
    factors = output_sensitivity(tiny_model, ids, [0, 1], tokens=2048, seed=0)
    assert set(factors) == {0, 1}
    for factor in factors.values():
        assert factor.shape == (64, 64) and torch.equal(factor, factor.tril())
        m = factor.double() @ factor.double().t()
        assert m.diagonal().mean().item() == pytest.approx(1.0 + 1e-4, rel=1e-4)  # scaled, plus the 1e-4 floor
    # it means what it says: for a small move e of a layer's FFN output the KL to the dense model grows
    # like e^T M e (up to one scale per layer): along M's most, median and least sensitive directions
    held = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    for layer, factor in factors.items():
        values, vectors = torch.linalg.eigh(factor.double() @ factor.double().t())
        assert values[-1] > 10 * values[0]
        picks = (0, 32, 63)
        kl = [_kl_with_layer_output_moved(tiny_model, held, layer, vectors[:, j].float(), 0.05) for j in picks]
        assert kl[2] > 10 * kl[0]
        per_unit = [k / values[j].item() for k, j in zip(kl, picks)]
        assert max(per_unit) < 2 * min(per_unit)
    # a layer's metric does not depend on which other layers are measured with it (the gradient reaches it
    # through every later layer, MLPs included) and a seed repeats it; more tokens than given are capped
    again = output_sensitivity(tiny_model, ids, [0], tokens=2048, seed=0)
    assert torch.equal(again[0], factors[0])
    assert output_sensitivity(tiny_model, ids[:2], [1], tokens=10**6, seed=0)[1].shape == (64, 64)


def test_identity_metric_gives_the_plain_labels(tiny_model):
    moe = _moe(tiny_model)
    mlp = factorized_layers(moe)[0]
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    eye = torch.eye(64)
    with torch.no_grad():
        t = tiny_model.model.layers[0].mlp(x)
        assert torch.equal(measured(t, None, 128), t)
        assert torch.allclose(measured(t, eye, 128), t)
        assert torch.equal(layer_labels(mlp, x, t, 2, 128), layer_labels(mlp, x, t, 2, 128, factor=eye))
        assert torch.equal(joint_labels(mlp, x, t, 2, 128), joint_labels(mlp, x, t, 2, 128, factor=eye))
        assert torch.equal(adaptive_labels(mlp, x, t, 2.0, 128, 0), adaptive_labels(mlp, x, t, 2.0, 128, 0, None, eye))


@pytest.mark.parametrize("shared", [0, 16])
def test_per_token_sets_minimise_the_error_in_the_metric(tiny_model, shared):
    moe = _moe(tiny_model, shared)
    mlp = factorized_layers(moe)[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g)
    factor = torch.randn(64, 64, generator=g).tril() + 4 * torch.eye(64)  # far from a multiple of I
    with torch.no_grad():
        t = tiny_model.model.layers[0].mlp(x)
        labels = adaptive_labels(mlp, x, measured(t, factor, 128), 2.0, 128, 1, None, factor)
        plain = adaptive_labels(mlp, x, t, 2.0, 128, 1)
        masks = subset_masks(4)
        outs = mlp.expert_outputs(x) * 2.0  # scaled: N / K
        err = (t - mlp.shared_output(x)).unsqueeze(1) - torch.einsum("sn,tnh->tsh", masks, outs)
        errs = (err @ factor).pow(2).sum(-1)  # (T, 15): ||e L||^2 = e^T M e
    assert abs(labels.sum(1).mean().item() - 2.0) < 0.1
    assert not torch.equal(labels, plain)  # the metric changes which experts tokens run
    chosen = (labels.unsqueeze(1) == masks.unsqueeze(0)).all(-1).float().argmax(1)
    for i in range(len(x)):
        same_size = masks.sum(1) == labels[i].sum()
        assert errs[i, chosen[i]] <= errs[i, same_size].min() * (1 + 1e-4) + 1e-4


def test_training_with_the_output_metric(tiny_model):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    moes = {}
    for metric in ("plain", "output"):
        moes[metric] = _moe(tiny_model)
        log = []
        result = train(tiny_model, moes[metric], ids, TrainConfig(top_k=2, router_steps=30, router_batch=128,
                                                                  adaptive_rounds=1, error_metric=metric,
                                                                  metric_tokens=128), progress=log.append)
        assert set(result.layer_mse) == {0, 1} and all(v == v for v in result.layer_mse.values())
        assert any(r["phase"] == "sensitivity" for r in log) == (metric == "output")
        assert log[-1]["step"] == log[-1]["total"]  # the extra phase does not break the progress count
    routers = [factorized_layers(m)[0].router.linear.weight for m in moes.values()]
    assert not torch.equal(*routers)
    with pytest.raises(ValueError, match="error_metric"):
        TrainConfig(error_metric="fisher")
    with pytest.raises(ValueError, match="metric_tokens"):
        TrainConfig(metric_tokens=0)


def test_cli_passes_the_error_metric():
    from factorlab.cli import add_train, train_specs

    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    _, cfg, _ = train_specs(parser.parse_args(["train", "x", "--error-metric", "output", "--metric-tokens", "4096"]))
    assert (cfg.error_metric, cfg.metric_tokens) == ("output", 4096)
    _, cfg, _ = train_specs(parser.parse_args(["train", "x"]))
    assert cfg.error_metric == "plain"
