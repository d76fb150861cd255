"""How the always-on shared neurons are chosen (factorize.SHARED_CHOICES)."""
import argparse

import pytest
import torch

from factorlab.factorize import SHARED_CHOICES, Partition, _shared_neurons, build_moe, make_partition
from factorlab.workflows import RECIPE_SHARED_CHOICE, FactorizeSpec


def _acts():
    """8 neurons, 6 tokens, built so that every choice picks a different pair:
    neuron 0: the largest |activation| on every token but the smallest down row (little output);
    neuron 1: one token's huge output, nothing elsewhere (the largest mean energy);
    neurons 2, 3: a moderate, steady share of every token's output (the largest mean share);
    the others: small."""
    act = torch.full((6, 8), 0.1)
    act[:, 0] = 5.0
    act[0, 1] = 100.0
    act[:, 2] = 1.0
    act[:, 3] = 0.9
    down2 = torch.ones(8)
    down2[0] = 1e-4
    return act, down2


def test_each_choice_picks_by_its_own_score():
    act, down2 = _acts()
    assert 0 in _shared_neurons(act, 2, "frequency").tolist()  # |activation| alone: the loud, silent neuron
    assert 0 not in _shared_neurons(act, 2, "energy_frequency", down2).tolist()
    assert _shared_neurons(act, 2, "energy_share", down2).tolist() == [2, 3]
    assert _shared_neurons(act, 1, "energy_mean", down2).tolist() == [1]
    # a per-token share is scale-free: one token's huge output does not buy a place
    assert 1 not in _shared_neurons(act, 2, "energy_share", down2).tolist()


def test_energy_choices_need_the_down_norms_and_names_are_checked():
    act, _ = _acts()
    with pytest.raises(ValueError, match="down projection"):
        _shared_neurons(act, 2, "energy_share")
    with pytest.raises(ValueError, match="unknown shared-neuron choice 'loud'"):
        _shared_neurons(act, 2, "loud")
    with pytest.raises(ValueError, match="unknown shared-neuron choice"):
        FactorizeSpec(shared_choice="loud")
    assert _shared_neurons(act, 0, "energy_share").numel() == 0


@pytest.mark.parametrize("choice", SHARED_CHOICES)
def test_every_choice_keeps_exactness_and_is_saved(tiny_model, choice):
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    part = make_partition(tiny_model, 4, "cluster", calibration_ids=ids, shared_size=32, shared_choice=choice)
    assert part.shared_choice == choice
    moe = build_moe(tiny_model, part, top_k=4)
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, tiny_model(ids).logits, atol=1e-4, rtol=0)
    again = Partition.from_saved(part.to_config(), part.to_tensors())
    assert again.shared_choice == choice
    assert all(torch.equal(again.permutations[i], part.permutations[i]) for i in part.layers)


def test_the_choice_changes_the_shared_block(tiny_model):
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    blocks = {c: make_partition(tiny_model, 4, "cluster", calibration_ids=ids, shared_size=32,
                                shared_choice=c).permutations[0][:32].tolist() for c in SHARED_CHOICES}
    assert blocks["frequency"] != blocks["energy_share"]
    # runs saved before the choice existed load as frequency
    config = make_partition(tiny_model, 4, "random", seed=1).to_config()
    config.pop("shared_choice")
    assert Partition.from_saved(config, {}).shared_choice == "frequency"


def test_cli_passes_the_shared_choice():
    from factorlab.cli import add_train, train_specs

    parser = argparse.ArgumentParser()
    add_train(parser.add_subparsers())
    spec, _, _ = train_specs(parser.parse_args(["train", "x", "--shared-choice", "frequency"]))
    assert spec.shared_choice == "frequency"
    spec, _, _ = train_specs(parser.parse_args(["train", "x"]))
    assert spec.shared_choice == RECIPE_SHARED_CHOICE


def test_the_app_spec_keeps_its_fields():
    """The app builds its FactorizeSpec positionally: a new field must not shift the others."""
    from factorlab.lab import factorize_spec

    spec = factorize_spec("default", 4, 2, "cluster", "1-", "scaled", 3, 256, 2048, True, "uniform")
    assert (spec.shared_size, spec.calibration_tokens, spec.first_token_dense, spec.layer_k) == (256, 2048, True, "uniform")
    assert spec.shared_choice == RECIPE_SHARED_CHOICE  # the page's control left alone: the recipe's
    again = factorize_spec("default", 4, 2, "cluster", "1-", "scaled", 3, 256, 2048, True, "uniform", "frequency")
    assert again.shared_choice == "frequency"
