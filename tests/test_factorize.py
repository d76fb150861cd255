"""Partitions and the exactness invariant: K = N with scaled output equals the dense model."""
import pytest
import torch

from factorlab.factorize import Partition, build_moe, calibration_inputs, make_partition, resolve_layers
from factorlab.moe import FactorizedMLP, factorized_layers, set_top_k


def _ids(vocab=128, rows=4, length=24, seed=0):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["contiguous", "random", "cluster", "coverage"])
def test_k_equals_n_matches_dense(tiny_model, strategy):
    ids = _ids()
    part = make_partition(tiny_model, 4, strategy, seed=1, calibration_ids=ids)
    moe = build_moe(tiny_model, part, top_k=4)
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, tiny_model(ids).logits, atol=1e-4, rtol=0)


def test_partitions_are_permutations_with_equal_groups(tiny_model):
    ids = _ids()
    for strategy in ("contiguous", "random", "cluster", "coverage"):
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


def test_coverage_refine_finds_the_groups_tokens_use_together():
    """Tokens each draw their energy from 2 of 4 hidden groups; from a scrambled start the refinement
    recovers a partition whose best 2 experts per token hold (nearly) all of it, never worse than the start."""
    from factorlab.factorize import coverage_refine, lost_energy

    gen = torch.Generator().manual_seed(0)
    group = torch.randperm(64, generator=gen) % 4  # hidden groups of 16 neurons
    pairs = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]])
    used = pairs[torch.randint(0, 6, (600,), generator=gen)]  # (T, 2) groups per token
    on = (group[None, :] == used[:, :1]) | (group[None, :] == used[:, 1:])  # (T, 64)
    energy = torch.rand(600, 64, generator=gen) * on + 0.01 * torch.rand(600, 64, generator=gen)
    start = torch.arange(64) % 4  # balanced, unrelated to the hidden groups
    before = lost_energy(energy, start, 4, 2).item()
    after_assign = coverage_refine(energy, start, 4, 2)
    after = lost_energy(energy, after_assign, 4, 2).item()
    assert torch.bincount(after_assign).tolist() == [16] * 4
    assert before > 0.3 and after < 0.02
    assert coverage_refine(energy, start, 4, 4) is start  # K = N: every expert runs, nothing to improve


def test_coverage_split_loses_less_than_cluster_on_its_calibration(tiny_model):
    from factorlab.factorize import _activations, lost_energy

    ids = _ids(rows=8, length=32)
    cluster = make_partition(tiny_model, 4, "cluster", seed=0, calibration_ids=ids)
    coverage = make_partition(tiny_model, 4, "coverage", seed=0, calibration_ids=ids, top_k=2)
    with torch.no_grad():
        for i in coverage.layers:
            mlp = tiny_model.model.layers[i].mlp
            x = calibration_inputs(tiny_model, ids, [i])[i]
            energy = _activations(mlp, x).pow(2) * mlp.down_proj.weight.pow(2).sum(0)
            lost = [lost_energy(energy[:, p], torch.arange(128) // 32, 4, 2).item()
                    for p in (cluster.permutations[i], coverage.permutations[i])]
            assert lost[1] <= lost[0] + 1e-6
    with pytest.raises(ValueError, match="K must be in 1..4"):
        make_partition(tiny_model, 4, "coverage", calibration_ids=ids, top_k=5)


def test_layer_choice_and_sharing(tiny_model):
    part = make_partition(tiny_model, 2, "contiguous", layers=[1])
    moe = build_moe(tiny_model, part, top_k=1)
    assert list(factorized_layers(moe)) == [1]
    assert not isinstance(moe.model.layers[0].mlp, FactorizedMLP)
    # non-FFN weights are shared, the dense model is untouched
    assert moe.model.embed_tokens.weight is tiny_model.model.embed_tokens.weight
    assert not isinstance(tiny_model.model.layers[1].mlp, FactorizedMLP)
    assert resolve_layers("0-1", 2) == [0, 1]
    assert resolve_layers("1-", 30) == list(range(1, 30))  # open range: to the last layer
    assert resolve_layers("0,2-", 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers("1-", 1)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([5], 2)


def test_bad_n_and_k_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="do not divide the FFN width 128.*choose N"):
        make_partition(tiny_model, 5)
    part = make_partition(tiny_model, 4)
    with pytest.raises(ValueError, match=r"K must be in 1..4"):
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
    again = Partition.from_saved(part.to_config(), part.to_tensors())
    assert again.layers == part.layers
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
    part = make_partition(embedded.model, 4, strategy, layers="0-29", seed=0, calibration_ids=calib)
    moe = build_moe(embedded.model, part, top_k=2)
    check = exactness_check(embedded.model, moe, tok, 4)
    assert check["max_abs_logit_diff"] < 3e-4  # fp32 summation-order noise on logits of magnitude ~40
    assert all(m.top_k == 2 for m in factorized_layers(moe).values())  # restored after the check
    out = moe.generate(tok("Hello", return_tensors="pt").input_ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1


def test_per_layer_k_plan_sets_each_layer_and_keeps_within_1_to_n(tiny_model):
    from factorlab.moe import k_offsets, set_k_offsets

    part = make_partition(tiny_model, 4, "contiguous")
    moe = build_moe(tiny_model, part, top_k=2)
    set_k_offsets(moe, {0: 1, 1: -1}, 2)
    layers = factorized_layers(moe)
    assert (layers[0].top_k, layers[1].top_k) == (3, 1)
    set_top_k(moe, 4)  # nominal K: the offsets apply within 1..N
    assert (layers[0].top_k, layers[1].top_k) == (4, 3)
    set_top_k(moe, 1)
    assert (layers[0].top_k, layers[1].top_k) == (2, 1)
    assert k_offsets(moe) == {0: 1, 1: -1}
    with pytest.raises(ValueError, match="not factorized"):
        set_k_offsets(moe, {5: 1}, 2)


def test_parse_layer_k():
    from factorlab.factorize import parse_layer_k

    assert parse_layer_k("3-4=3; 0,1=1", [0, 1, 2, 3, 4], 2, 4, 5) == {3: 1, 4: 1, 0: -1, 1: -1}
    assert parse_layer_k("2=2", [0, 1, 2], 2, 4, 5) == {}
    with pytest.raises(ValueError, match="LAYERS=K"):
        parse_layer_k("3-4:3", [3, 4], 2, 4, 5)
    with pytest.raises(ValueError, match="not factorized"):
        parse_layer_k("0=3", [1, 2], 2, 4, 5)
    with pytest.raises(ValueError, match="K must be in 1..4"):
        parse_layer_k("1=5", [1, 2], 2, 4, 5)


def test_allocate_k_moves_k_where_the_error_gains_most():
    from factorlab.factorize import allocate_k

    inf = float("inf")
    err = {0: [inf, 0.9, 0.5, 0.2, 0.0],  # hard layer: each added expert helps a lot
           1: [inf, 0.02, 0.01, 0.005, 0.0],  # easy layer: K=1 costs little
           2: [inf, 0.4, 0.2, 0.1, 0.0]}
    plan = allocate_k(err, 2)
    assert plan == {0: 1, 1: -1}  # gain 0.3 on layer 0 against a loss of 0.01 on layer 1; no further move pays
    assert sum(plan.values()) == 0
    flat = {i: [inf, 0.5, 0.3, 0.1, 0.0] for i in range(3)}
    assert allocate_k(flat, 2) == {}  # equal layers: nothing to gain


def test_plan_layer_k_keeps_the_total(tiny_model):
    from factorlab.factorize import layer_errors, plan_layer_k

    part = make_partition(tiny_model, 4, "random", seed=0)
    moe = build_moe(tiny_model, part, top_k=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    err = layer_errors(tiny_model, moe, ids)
    assert set(err) == {0, 1} and all(e[4] < 1e-6 and e[1] >= e[2] - 1e-6 for e in err.values())
    plan = plan_layer_k(tiny_model, moe, ids, 2)
    assert sum(plan.values()) == 0 and all(1 <= 2 + o <= 4 for o in plan.values())
