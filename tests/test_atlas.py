"""The expert atlas: ablations that remove exactly what they say, lift ranking, statistics, views."""
import json
import time

import numpy as np
import pytest
import torch

from factorlab import atlas_views
from factorlab.atlas import (AtlasSettings, Domain, ablated, compute_atlas, diverse_contexts, lift_table,
                             mutual_information, specialisation, token_losses)
from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers, record_routing
from tests.conftest import tiny_llama


def tiny_moe(top_k: int = 2, shared_size: int = 32, strategy: str = "random"):
    dense = tiny_llama()
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    partition = make_partition(dense, 4, strategy, seed=0, shared_size=shared_size, calibration_ids=calib)
    return dense, build_moe(dense, partition, top_k)


def ids(rows: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False).logits


def test_ablating_an_expert_no_token_uses_changes_nothing():
    _, moe = tiny_moe(top_k=1)
    mlp = factorized_layers(moe)[1]
    with torch.no_grad():  # expert 3 scores the mean of experts 0 and 1: never strictly the best at K = 1
        w = mlp.router.linear.weight
        w[3] = (w[0] + w[1]) / 2
    x = ids()
    with torch.inference_mode(), record_routing(moe) as trace:
        before = moe(input_ids=x, use_cache=False).logits
    assert 3 not in trace.stacked()[0][1].flatten().tolist()  # the premise: no token runs expert 3 of layer 1
    with ablated(moe, 1, (3,)):
        assert torch.equal(logits(moe, x), before)
    with ablated(moe, 1, (0,)):  # and one it does use changes the logits
        assert not torch.allclose(logits(moe, x), before)


def test_ablating_all_routed_experts_equals_the_shared_only_model():
    _, moe = tiny_moe(top_k=2)
    layers = factorized_layers(moe)
    x = ids()
    with ablated(moe, 0, (0, 1, 2, 3)), ablated(moe, 1, (0, 1, 2, 3)):
        without = logits(moe, x)

    def shared_only(mlp, args, out):
        return mlp.shared_output(args[0].reshape(-1, mlp.hidden_size)).view(out.shape)
    handles = [m.register_forward_hook(shared_only) for m in layers.values()]
    try:
        reference = logits(moe, x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(without, reference, atol=1e-5, rtol=1e-5)


def test_ablation_restores_the_weights_and_the_cached_start_equals_a_full_pass():
    _, moe = tiny_moe()
    mlp = factorized_layers(moe)[1]
    down, shared = mlp.down.detach().clone(), mlp.shared_down.detach().clone()
    x = ids()
    with torch.inference_mode():
        hidden = moe.model(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
        with ablated(moe, 1, (2,), shared=True):
            full = token_losses(moe, x)
            from_layer = token_losses(moe, x, hidden[1], 1)
    torch.testing.assert_close(from_layer, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(mlp.down, down) and torch.equal(mlp.shared_down, shared)
    assert len(moe.model.layers) == 2  # the layer list is back


def test_lift_ranks_tokens_by_over_representation_not_by_count():
    # expert 0 runs on half the tokens: every 7, half the 5s, one 9 (not ranked: min_count 2)
    tokens = torch.tensor([5] * 8 + [7] * 4 + [9] * 4)  # 16 tokens
    runs = torch.zeros(16, 2, dtype=torch.bool)
    runs[[0, 1, 2, 3, 8, 9, 10, 11, 12], 0] = True  # four 5s, all four 7s, one 9
    runs[:, 1] = ~runs[:, 0]
    table = lift_table(tokens, runs, top=5, min_count=2)
    first = table[0]
    assert [r["id"] for r in first] == [7, 5]  # 7 (4 of 4) above the more frequent 5 (4 of 8)
    assert first[0] == {"id": 7, "count": 4, "total": 4, "lift": round(1.0 / (9 / 16), 3)}
    assert first[1]["lift"] == round(0.5 / (9 / 16), 3)
    assert [r["id"] for r in table[1]] == [9, 5]  # 3 of 4 nines, 4 of 8 fives; the 7s never run expert 1


def test_contexts_are_diverse():
    tokens = torch.tensor([1, 1, 1, 2, 3, 3, 4, 4])
    row = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    domain = ["a", "a", "a", "a", "b", "b", "b", "b"]
    runs = torch.ones(8, dtype=torch.bool)
    score = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.6, 0.5, 0.4, 0.3])
    chosen = diverse_contexts(score, runs, tokens, row, domain, 4)
    assert chosen[:2] == [0, 4]  # the best of each domain first
    assert len({int(tokens[p]) for p in chosen}) == len(chosen) and len({int(row[p]) for p in chosen}) == len(chosen)


def test_mutual_information_and_specialisation():
    assert mutual_information(np.array([[10.0, 0], [0, 10]])) == pytest.approx(1.0)
    assert mutual_information(np.array([[5.0, 5], [5, 5]])) == pytest.approx(0.0)
    # two layers, eight rows (four per domain), two experts: a specialised router and an indifferent one
    domain = ["a"] * 4 + ["b"] * 4
    sharp = np.zeros((2, 8, 2))
    sharp[:, :4, 0], sharp[:, 4:, 1] = 10, 10
    flat = np.full((2, 8, 2), 5.0)
    spec = specialisation({"trained": sharp, "untrained": flat}, domain, draws=50, seed=0)
    assert spec["trained"]["mi_bits"] == pytest.approx(1.0) and spec["untrained"]["mi_bits"] == pytest.approx(0.0)
    assert spec["difference"]["mi_ci95"][0] > 0.5
    assert spec["trained"]["mi_null_bits"] < 0.6  # shuffling the domains between rows destroys it


def test_atlas_of_a_tiny_model_is_json_and_every_view_draws_fast():
    dense, moe = tiny_moe()
    untrained = {i: torch.randn(4, 64) for i in factorized_layers(moe)}
    corpus = [Domain("first", "test", ids(4, 32, 1)), Domain("second", "test", ids(4, 32, 2))]
    settings = AtlasSettings(seq_len=32, stats_tokens=128, ablation_rows=2, ablation_len=16, bootstrap=20)
    seen = []
    atlas = compute_atlas(moe, dense, _Tokenizer(), untrained, corpus, settings, progress=seen.append)
    atlas["run"] = "tiny"
    atlas = json.loads(json.dumps(atlas))  # JSON-able, as stored
    assert atlas["layers"] == [0, 1] and len(atlas["ranking"]) == 2 * 5  # 4 experts + the shared block per layer
    assert {p["phase"] for p in seen} >= {"routing statistics", "ablation"}
    e = atlas["layers_data"]["1"]["experts"][0]
    assert set(e["domains"]) == {"first", "second"} and 0 <= e["share"] <= 1
    assert atlas["layers_data"]["1"]["coactivation"][0][0] in (0.0, 1.0)
    for layer, expert in ((0, 0), (1, 3), (1, 3)):  # the first draw pays plotly's one-time imports
        start = time.perf_counter()
        atlas_views.overview_figure(atlas), atlas_views.domain_figure(atlas, layer, expert)
        atlas_views.ablation_figure(atlas, layer), atlas_views.pair_figure(atlas, layer)
        atlas_views.specialisation_figure(atlas), atlas_views.share_cost_figure(atlas)
        atlas_views.vocab_rows(atlas, layer, expert), atlas_views.lens_rows(atlas, layer, expert)
        atlas_views.contexts_html(atlas, layer, expert), atlas_views.expert_markdown(atlas, layer, expert)
        atlas_views.ranking_rows(atlas), atlas_views.atlas_markdown({**atlas, "run": "tiny"})
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ValueError, match="choose one of 0, 1"):
        atlas_views.expert_entry(atlas, 7, 0)
    with pytest.raises(ValueError, match="experts 0..3"):
        atlas_views.expert_entry(atlas, 1, 9)


def test_cancel_stops_the_atlas():
    from factorlab.atlas import AtlasCancelled

    dense, moe = tiny_moe()
    corpus = [Domain("only", "test", ids(2, 32))]
    with pytest.raises(AtlasCancelled):
        compute_atlas(moe, dense, _Tokenizer(), {i: torch.randn(4, 64) for i in factorized_layers(moe)}, corpus,
                      AtlasSettings(seq_len=32, stats_tokens=64, ablation_rows=1, ablation_len=16, bootstrap=10),
                      should_stop=lambda: True)


class _Tokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.slow
def test_the_embedded_model_numbers_domain_and_an_atlas_of_two_layers(embedded, tmp_path):
    from factorlab.atlas import arithmetic_docs, domain_rows

    docs = arithmetic_docs()
    assert docs[0].startswith("Calculate ") and " = " in docs[0] and docs[0].splitlines()[0].endswith(".")
    settings = AtlasSettings(seq_len=32, stats_tokens=64, ablation_rows=1, ablation_len=16, bootstrap=10)
    rows = domain_rows("numbers", embedded, settings)
    assert rows.shape == (2, 32)
    upload = tmp_path / "mine.txt"  # an uploaded text becomes one more domain
    upload.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(20)))
    from factorlab.atlas import build_corpus

    mine = build_corpus(embedded, settings, upload=str(upload), domains={})
    assert [d.name for d in mine] == ["uploaded"] and mine[0].ids.shape == (2, 32)
    moe = build_moe(embedded.model, make_partition(embedded.model, 4, "contiguous", [3, 20]), 2)
    corpus = [Domain("numbers", "numbers", rows), Domain("local", "local", domain_rows("local", embedded, settings))]
    atlas = compute_atlas(moe, embedded.model, embedded.tokenizer,
                          {i: m.router.linear.weight for i, m in factorized_layers(moe).items()}, corpus, settings)
    assert atlas["layers"] == [3, 20] and atlas["layers_data"]["3"]["dense_ffn_all"] > 0
    digits = [v["token"] for e in atlas["layers_data"]["20"]["experts"] for v in e["vocab"]]
    assert digits  # the vocabulary tables hold decoded tokens


def test_forwards_of_the_shared_dense_model_in_other_threads_are_not_recorded():
    """The app's chat runs the process's dense model while an atlas job records it."""
    import threading

    from factorlab.atlas import _Recorder

    dense, moe = tiny_moe()
    rec = _Recorder(moe, {i: torch.randn(4, 64) for i in factorized_layers(moe)})
    handles = [dense.model.layers[i].mlp.register_forward_hook(rec.dense_hook(i)) for i in (0, 1)]
    try:
        worker = threading.Thread(target=lambda: logits(dense, ids()))
        worker.start()
        worker.join()
        assert rec.dense[0] == []
        logits(dense, ids(1, 8))
        assert [t.shape for t in rec.dense[0]] == [torch.Size([8])]
    finally:
        for h in handles:
            h.remove()
