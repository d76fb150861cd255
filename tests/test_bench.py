"""bench: the documented result shape on a tiny model (timings are never asserted as speed claims)."""
import json

import pytest
import torch

from factorlab.bench import DECODE_PROMPT_TOKENS, format_report, run_benchmark, speed_limits
from factorlab.factorize import build_moe, make_partition
from factorlab.models import model_info
from factorlab.moe import factorized_layers

SPEEDUPS = {"ffn_speedup", "prefill_speedup", "forward_speedup", "decode_speedup", "batched_prefill_speedup"}


def test_run_benchmark_returns_documented_shape(tiny_model):
    moe = build_moe(tiny_model, make_partition(tiny_model, 4, "random", layers=[1]), top_k=3)
    steps = []
    result = run_benchmark(tiny_model, moe, [1, 2], prefill=12, decode=3, batch=2, repeats=2, progress=steps.append)
    assert set(result) >= {"k", "raw", "settings", "machine", "limits", "load", "speedup_of_min"}
    assert set(result["k"]) == {"1", "2"}
    for speed in result["k"].values():
        assert set(speed) == SPEEDUPS and all(v > 0 for v in speed.values())
    assert set(result["raw"]) == {"ffn", "prefill", "forward", "decode", "batched_prefill"}
    for phase, entries in result["raw"].items():
        assert set(entries) == {"dense", "1", "2"}
        for e in entries.values():
            assert len(e["times_s"]) == (20 if phase == "ffn" else 2)
            assert 0 < e["min_s"] <= e["median_s"] <= e["max_s"]
    assert result["raw"]["decode"]["1"]["tokens_per_s"] == pytest.approx(3 / result["raw"]["decode"]["1"]["median_s"])
    assert result["settings"]["factorized_layers"] == [1] and result["settings"]["ffn_layer"] == 1
    assert result["machine"]["threads"] >= 1 and result["machine"]["torch"]
    assert sum(result["load"]["2"]["share"]) == pytest.approx(1.0)
    assert [s["step"] for s in steps] == list(range(1, 11)) and steps[-1]["total"] == 10
    assert factorized_layers(moe)[1].top_k == 3  # K restored
    json.dumps(result)  # storable as-is in metrics.json
    assert "decode" in format_report(result)


def test_zero_decode_and_batch_are_skipped(tiny_model):
    moe = build_moe(tiny_model, make_partition(tiny_model, 4), top_k=1)
    result = run_benchmark(tiny_model, moe, [4], prefill=8, decode=0, batch=0, repeats=1)
    assert set(result["raw"]) == {"ffn", "prefill", "forward"}
    assert result["k"]["4"]["decode_speedup"] is None and result["k"]["4"]["batched_prefill_speedup"] is None
    with pytest.raises(ValueError, match="K must be in 1..4|every K"):
        run_benchmark(tiny_model, moe, [5], prefill=8, decode=0, batch=0, repeats=1)
    with pytest.raises(ValueError, match="no FactorizedMLP"):
        run_benchmark(tiny_model, tiny_model, [1], prefill=8, repeats=1)


def test_speed_limits_follow_the_ffn_share(tiny_model):
    info = model_info(tiny_model)
    lim = speed_limits(info, 4, 1, [0, 1], 0, prefill=64, decode_context=40, ffn_layer=0)
    assert 3.5 < lim["ffn"] < 4.0  # N/K less the router's multiply-adds
    full = speed_limits(info, 4, 4, [0, 1], 0, prefill=64, decode_context=40, ffn_layer=0)
    assert all(v < 1.0 for k, v in full.items() if k != "ffn_share_dense")  # K=N only adds the router
    share = lim["ffn_share_dense"]
    assert lim["forward"] == pytest.approx(1 / (1 - share * 0.75), rel=0.02)


def test_per_token_k_limits_are_at_the_active_share_measured_on_the_benchmark_tokens(tiny_model):
    moe = build_moe(tiny_model, make_partition(tiny_model, 4, "random", layers=[1]), top_k=2)
    factorized_layers(moe)[1].set_thresholds(torch.tensor([0.99, 0.5, 0.3, 0.0]))
    result = run_benchmark(tiny_model, moe, [2], prefill=12, decode=3, batch=2, repeats=1)
    means = result["mean_k"]["2"]
    assert set(means) == {"prefill", "batched_prefill", "decode"} and all(1 <= v <= 4 for v in means.values())
    shape = (model_info(tiny_model), 4, 2, [1], 0, 12, DECODE_PROMPT_TOKENS + 1, 1)
    one_layer = {phase: {1: k} for phase, k in means.items()}  # one factorized layer: its mean is the mean
    assert result["limits_measured"]["2"] == pytest.approx(speed_limits(*shape, mean_k=one_layer))
    assert result["limits"]["2"] == pytest.approx(speed_limits(*shape))  # the nominal K stays beside it
    at_4 = speed_limits(*shape, mean_k={p: {1: 4.0} for p in ("prefill", "decode", "batched_prefill")})
    assert at_4 == pytest.approx(speed_limits(*shape[:2], 4, *shape[3:]))  # a measured K is used as K
    assert "|" in format_report(result) and "per-token" in format_report(result)
    top_k = run_benchmark(tiny_model, build_moe(tiny_model, make_partition(tiny_model, 4), top_k=2), [2],
                          prefill=8, decode=2, batch=0, repeats=1)
    assert "limits_measured" not in top_k and "mean_k" not in top_k  # top-K runs its K on every token


@pytest.mark.slow
def test_cli_bench_fresh_split(embedded, capsys):
    from factorlab.cli import main

    threads = torch.get_num_threads()
    try:  # one thread: tiny ops stay quick on a shared, busy machine
        assert main(["bench", "--experts", "4", "--k", "1", "--prefill", "16", "--decode", "2", "--batch", "0",
                     "--repeats", "1", "--threads", "1", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    assert out["run"] is None and out["settings"]["num_experts"] == 4
    assert len(out["settings"]["factorized_layers"]) == 30
    assert out["k"]["1"]["prefill_speedup"] > 0
