"""Partitions and the exactness invariant: K = N with scaled output equals the dense model."""
import pytest
import torch

from factorlab.factorize import Partition, build_moe, calibration_inputs, make_partition, shared_neurons
from factorlab.moe import FactorizedMLP, factorized_layers, set_top_k
from factorlab.recipe import Recipe, parse_layers


def _ids(vocab=128, rows=4, length=24, seed=0):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["contiguous", "random", "cluster"])
def test_k_equals_n_matches_dense(tiny_model, strategy):
    ids = _ids()
    part = make_partition(tiny_model, 4, strategy, seed=1, calibration_ids=ids)
    moe = build_moe(tiny_model, part, top_k=4)
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, tiny_model(ids).logits, atol=1e-4, rtol=0)


def test_partitions_are_permutations_with_equal_groups(tiny_model):
    ids = _ids()
    for strategy in ("contiguous", "random", "cluster"):
        part = make_partition(tiny_model, 4, strategy, seed=3, calibration_ids=ids)
        for perm in part.permutations.values():
            assert sorted(perm.tolist()) == list(range(128))
        assert part.expert_size == 32
    contiguous = make_partition(tiny_model, 4, "contiguous")
    assert contiguous.permutations[0].tolist() == list(range(128))


def test_random_and_cluster_are_seeded(tiny_model):
    ids = _ids()
    a = make_partition(tiny_model, 4, "random", seed=5)
    b = make_partition(tiny_model, 4, "random", seed=5)
    c = make_partition(tiny_model, 4, "random", seed=6)
    assert torch.equal(a.permutations[0], b.permutations[0])
    assert not torch.equal(a.permutations[0], c.permutations[0])
    x = make_partition(tiny_model, 4, "cluster", seed=2, calibration_ids=ids)
    y = make_partition(tiny_model, 4, "cluster", seed=2, calibration_ids=ids)
    assert all(torch.equal(x.permutations[i], y.permutations[i]) for i in x.layers)


def test_cluster_groups_coactive_neurons():
    """Neurons driven by the same input direction end up in the same expert."""
    from factorlab.factorize import balanced_kmeans

    gen = torch.Generator().manual_seed(0)
    profiles = torch.rand(4, 200, generator=gen)  # 4 activation patterns over 200 tokens
    group = torch.arange(64) % 4
    feats = profiles[group] + 0.05 * torch.rand(64, 200, generator=gen)
    assign = balanced_kmeans(feats, 4, seed=0)
    assert torch.bincount(assign).tolist() == [16] * 4
    for g in range(4):
        assert len(set(assign[group == g].tolist())) == 1


def test_layer_choice_and_sharing(tiny_model):
    part = make_partition(tiny_model, 2, "contiguous", layers=[1])
    moe = build_moe(tiny_model, part, top_k=1)
    assert list(factorized_layers(moe)) == [1]
    assert not isinstance(moe.model.layers[0].mlp, FactorizedMLP)
    # non-FFN weights are shared, the dense model is untouched
    assert moe.model.embed_tokens.weight is tiny_model.model.embed_tokens.weight
    assert not isinstance(tiny_model.model.layers[1].mlp, FactorizedMLP)
    assert parse_layers("0-1", 2) == [0, 1]
    assert parse_layers("1-", 30) == list(range(1, 30))  # open range: to the last layer
    assert parse_layers("0,2-", 4) == [0, 2, 3]
    assert parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("1-", 1)
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("5", 2)


def test_bad_n_and_k_are_clear_errors(tiny_model):
    from factorlab.models import model_info

    info = model_info(tiny_model)
    with pytest.raises(ValueError, match="do not divide the FFN width 128.*choose N"):
        Recipe(num_experts=5, top_k=2, shared_size=0).validate(info)
    with pytest.raises(ValueError, match=r"do not divide the FFN width 96 \(after 32 shared neurons\).*choose N"):
        Recipe(num_experts=5, top_k=2, shared_size=32).validate(info)
    with pytest.raises(ValueError, match="do not divide the 128 routed neurons"):
        build_moe(tiny_model, make_partition(tiny_model, 5), top_k=1)
    with pytest.raises(ValueError, match=r"K \(top_k\) must be in 1..4"):
        Recipe(num_experts=4, top_k=5)
    part = make_partition(tiny_model, 4)
    with pytest.raises(ValueError, match=r"top_k must be in 1..4"):
        build_moe(tiny_model, part, top_k=5)
    moe = build_moe(tiny_model, part, top_k=2)
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        set_top_k(moe, 0)
    with pytest.raises(ValueError, match="unknown split"):
        make_partition(tiny_model, 4, "kmeans")
    with pytest.raises(ValueError, match="calibration"):
        make_partition(tiny_model, 4, "cluster")


def test_shared_neurons_keep_exactness(tiny_model):
    ids = _ids()
    part = make_partition(tiny_model, 4, "cluster", calibration_ids=ids, shared_size=32)
    assert part.expert_size == 24
    moe = build_moe(tiny_model, part, top_k=4)
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, tiny_model(ids).logits, atol=1e-4, rtol=0)


def test_partition_roundtrip(tiny_model):
    part = make_partition(tiny_model, 4, "random", seed=9)
    again = Partition.from_tensors(part.to_tensors(), 4, "random", 0, seed=9)
    assert again.layers == part.layers and again.intermediate_size == 128 and again.expert_size == 32
    assert all(torch.equal(again.permutations[i], part.permutations[i]) for i in part.layers)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from factorlab.models import UnsupportedModelError, check_supported

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is not supported.*Llama"):
        check_supported(gpt2)
    with pytest.raises(UnsupportedModelError):
        make_partition(gpt2, 4)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["contiguous", "random", "cluster"])
def test_embedded_model_exactness(embedded, strategy):
    from factorlab.workflows import exactness_check

    tok = embedded.tokenizer
    calib = tok(["The cat sat on the mat and looked at the birds outside. " * 8] * 2, return_tensors="pt").input_ids
    part = make_partition(embedded.model, 4, strategy, layers=parse_layers("0-29", 30), seed=0,
                          calibration_ids=calib)
    moe = build_moe(embedded.model, part, top_k=2)
    check = exactness_check(embedded.model, moe, tok)
    assert check["max_abs_logit_diff"] < 3e-4  # fp32 summation-order noise on logits of magnitude ~40
    assert all(m.top_k == 2 for m in factorized_layers(moe).values())  # restored after the check
    out = moe.generate(tok("Hello", return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1



# ---- the always-on shared neurons: chosen by their mean share of each token's FFN output energy ----
def _acts():
    """8 neurons, 6 tokens, built so that each plausible score picks a different pair:
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


def test_shared_neurons_are_chosen_by_their_share_of_the_output_energy():
    act, down2 = _acts()
    assert shared_neurons(act, 2, down2).tolist() == [2, 3]
    # output energy, not |activation|: the loud neuron with a tiny down row adds little to the output
    assert 0 not in shared_neurons(act, 3, down2).tolist()
    # a per-token share is scale-free: one token's huge output does not buy a place
    assert 1 not in shared_neurons(act, 2, down2).tolist()
    assert shared_neurons(act, 3, down2).tolist() == [1, 2, 3]  # third: its share on its one token; sorted
    assert shared_neurons(act, 0, down2).numel() == 0
    assert shared_neurons(act, 2, torch.ones(8)).tolist() == [0, 1]  # equal down rows: |activation| decides


def test_make_partition_puts_the_energy_share_choice_first_and_keeps_it_on_reload(tiny_model):
    from factorlab.factorize import _activations

    ids = _ids()
    part = make_partition(tiny_model, 4, "cluster", calibration_ids=ids, shared_size=32)
    inputs = calibration_inputs(tiny_model, ids, part.layers)
    for i in part.layers:
        mlp = tiny_model.model.layers[i].mlp
        with torch.no_grad():
            act = _activations(mlp, inputs[i]).abs()
        expected = shared_neurons(act, 32, mlp.down_proj.weight.pow(2).sum(0))
        assert part.permutations[i][:32].tolist() == expected.tolist()
    assert make_partition(tiny_model, 4, "random", seed=0, calibration_ids=ids, shared_size=32,
                          inputs=inputs).permutations[0][:32].tolist() == part.permutations[0][:32].tolist()
    again = Partition.from_tensors(part.to_tensors(), 4, "cluster", 32)
    assert again.expert_size == 24
    assert all(torch.equal(again.permutations[i], part.permutations[i]) for i in part.layers)
    moe = build_moe(tiny_model, again, top_k=4)
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, tiny_model(ids).logits, atol=1e-4, rtol=0)
