"""Analytic FLOPs equal torch's FlopCounterMode on the real forward, dense and factorized."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from factorlab.factorize import build_moe, make_partition
from factorlab.flops import flops_per_token, flops_table
from factorlab.models import model_info


def _counted(model, ids) -> int:
    # eager attention: the CPU SDPA kernel is not registered with FlopCounterMode, explicit matmuls are
    model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("seq_len", [16, 64])
def test_dense_matches_flop_counter(tiny_model, seq_len):
    info = model_info(tiny_model)
    ids = torch.randint(0, 128, (1, seq_len))
    analytic = flops_per_token(info, seq_len)["total"] * seq_len
    assert _counted(tiny_model, ids) == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_factorized_matches_flop_counter(tiny_model, k):
    info = model_info(tiny_model)
    part = make_partition(tiny_model, 4, "contiguous")
    moe = build_moe(tiny_model, part, top_k=k)
    ids = torch.randint(0, 128, (1, 32))
    analytic = flops_per_token(info, 32, 4, k)["total"] * 32
    assert _counted(moe, ids) == pytest.approx(analytic, rel=1e-6)


def test_ffn_share_and_components(tiny_model):
    info = model_info(tiny_model)
    table = flops_table(info, 128, 4)
    for k in range(1, 5):
        assert table["k"][str(k)]["ffn_ratio"] == pytest.approx(k / 4)
        assert sum(table["k"][str(k)]["shares"].values()) == pytest.approx(1.0)
    # attention scores grow with sequence length, nothing else does
    a, b = flops_per_token(info, 100), flops_per_token(info, 200)
    assert b["attention_scores"] == 2 * a["attention_scores"]
    assert b["ffn"] == a["ffn"] and b["lm_head"] == a["lm_head"]
    # unfactorized layers stay dense
    half = flops_per_token(info, 128, 4, 1, factorized_layers=[0])
    assert half["ffn"] == pytest.approx(flops_per_token(info, 128)["ffn"] * (1 + 0.25) / 2)



def test_per_layer_k_flops_match_flop_counter(tiny_model):
    from factorlab.moe import set_top_k

    info = model_info(tiny_model)
    part = make_partition(tiny_model, 4, "contiguous")
    moe = build_moe(tiny_model, part, top_k=2)
    set_top_k(moe, {0: 3, 1: 1})  # an explicit K per layer
    ids = torch.randint(0, 128, (1, 32))
    analytic = flops_per_token(info, 32, 4, 2, top_k_per_layer={0: 3, 1: 1})
    assert analytic["ffn"] == pytest.approx(flops_per_token(info, 32, 4, 2)["ffn"])  # 3 + 1 = 2 + 2
    assert analytic["ffn"] != flops_per_token(info, 32, 4, 2, top_k_per_layer={0: 3})["ffn"]
    assert _counted(moe, ids) == pytest.approx(analytic["total"] * 32, rel=1e-6)


def test_flops_table_uses_the_per_token_k_means_measured_in_training(tiny_model):
    from factorlab.flops import mean_k_plan

    info = model_info(tiny_model)
    per_token_k = {"0": [1.0, 2.5, 3.0, 4.0], "1": [1.2, 2.0, 3.0, 4.0]}  # as runs store it
    assert mean_k_plan(per_token_k, 2) == {0: 2.5, 1: 2.0}
    table = flops_table(info, 128, 4, per_token_k=per_token_k)
    plain = flops_table(info, 128, 4)
    means = flops_per_token(info, 128, 4, 2, top_k_per_layer={0: 2.5, 1: 2.0})
    assert table["k"]["2"]["ffn"] == pytest.approx(means["ffn"])
    assert table["k"]["2"]["ffn_ratio"] == pytest.approx((2.5 + 2.0) / 8)
    assert table["k"]["1"]["ffn_ratio"] == pytest.approx(2.2 / 8) and table["k"]["1"]["ffn"] > plain["k"]["1"]["ffn"]
    assert table["k"]["4"] == plain["k"]["4"]
