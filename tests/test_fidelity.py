"""Chat fidelity: replies, teacher-forced positions, the three measures, intervals, and the stored result."""
import json

import pytest
import torch

from conftest import CharTokenizer, tiny_llama
from factorlab.factorize import build_moe, make_partition
from factorlab.fidelity import (CHAT_PROMPTS, PREFIXES, chat_fidelity, common_prefix, greedy_replies,
                                load_chat_prompts, paired_difference, teacher_forced)
from factorlab.moe import set_top_k


PROMPTS = [{"category": "question", "prompt": p} for p in ("Hi!", "What is two and two?", "A poem, please",
                                                           "Why?", "Tell me a story about a cat")]


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORLAB_CACHE", str(tmp_path / "cache"))
    dense = tiny_llama(layers=2, vocab=128)
    dense.generation_config.eos_token_id = 0
    with torch.no_grad():  # random FFNs barely move a random model's logits: make them matter
        for layer in dense.model.layers:
            layer.mlp.up_proj.weight.mul_(4)
            layer.mlp.down_proj.weight.mul_(40)
    moe = build_moe(dense, make_partition(dense, 4, "contiguous"), top_k=1)
    return dense, moe, CharTokenizer()


def test_the_shipped_prompts_are_varied_and_not_training_prompts():
    prompts = load_chat_prompts()
    assert len(prompts) >= 60
    assert {r["category"] for r in prompts} == {"question", "instruction", "writing", "code", "smalltalk"}
    training = {json.loads(line)["prompt"].lower() for line in
                (CHAT_PROMPTS.parent / "prompts.jsonl").read_text().splitlines()}
    assert not training & {r["prompt"].lower() for r in prompts}


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2  # one reply ended (its stop token differs from the other's)
    assert common_prefix([5], [6]) == 0
    assert common_prefix([1, 2, 0], [1, 2, 0]) >= 1 << 20  # a whole identical reply is identical at any length


def test_teacher_forcing_reads_the_positions_that_predict_the_reply(models):
    dense, _, tok = models
    ids = [tok(f"<user>{p['prompt']}<assistant>").input_ids for p in PROMPTS]
    replies = greedy_replies(dense, tok, ids, max_new_tokens=12, batch_size=2)
    assert all(1 <= len(r) <= 12 for r in replies)
    forced = teacher_forced(dense, dense, ids, replies)
    # the dense model's greedy reply is its own argmax at every position, so it agrees with itself everywhere
    assert forced["agree"] == forced["count"] == [float(len(r)) for r in replies]
    assert max(abs(k) for k in forced["kl"]) < 1e-4
    # and each reply token is what the model predicts next, read back unpadded one prompt at a time
    for p, r in zip(ids, replies):
        with torch.no_grad():
            logits = dense(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
        assert logits.argmax(-1).tolist() == r


def test_at_k_equal_n_the_factorized_model_chats_exactly_like_dense(models):
    dense, moe, tok = models
    result = chat_fidelity(dense, moe, tok, [4, 1], prompts=PROMPTS, max_new_tokens=10, batch_size=3, resamples=200)
    same = result["by_k"]["4"]
    assert same["agreement"] == 1.0 and abs(same["kl"]) < 1e-4 and abs(same["nll_gap"]) < 1e-4
    assert all(v == 1.0 for v in same["identical"].values()) and set(same["identical"]) == {str(p) for p in PREFIXES}
    one = result["by_k"]["1"]  # an untrained router over a quarter of the neurons: measurably different
    assert one["agreement"] < 1.0 and one["kl"] > 0.01
    lo, hi = one["agreement_ci"]
    assert lo <= one["agreement"] <= hi
    assert result["settings"]["prompts"] == len(PROMPTS) and len(result["replies"]["1"]) == len(PROMPTS)
    assert {m.top_k for m in __import__("factorlab.moe", fromlist=["x"]).factorized_layers(moe).values()} == {1}
    diff = paired_difference(result, result, "1")
    assert diff["difference"] == 0.0 and diff["ci"] == [0.0, 0.0]
    against = paired_difference({**result, "per_prompt": {"1": result["per_prompt"]["4"]}}, result, "1")
    assert against["difference"] == pytest.approx(1.0 - one["agreement"]) and against["ahead"] > 0.5


def test_the_dense_replies_are_cached(models, tmp_path):
    dense, moe, tok = models
    chat_fidelity(dense, moe, tok, [1], prompts=PROMPTS, max_new_tokens=6, resamples=50)
    cached = list((tmp_path / "cache" / "chat_fidelity").glob("*.json"))
    assert len(cached) == 1
    set_top_k(moe, 2)
    again = chat_fidelity(dense, moe, tok, [2], prompts=PROMPTS, max_new_tokens=6, resamples=50)
    assert again["dense"]["tokens"] == sum(len(r) for r in json.loads(cached[0].read_text()))
