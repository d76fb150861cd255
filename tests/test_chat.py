"""Streaming generation: Gradio history handling, sampling, KV-cache decoding and per-stream K under a lock."""
import threading

import pytest
import torch

from conftest import CharTokenizer, tiny_llama
from factorlab.chat import (ModelHandle, Sampling, Step, flatten_content, prompt_ids, sample_next, side_by_side,
                            stream_reply, to_messages)
from factorlab.factorize import build_moe, make_partition


@pytest.fixture
def tiny():
    model = tiny_llama(layers=2, vocab=128)
    model.generation_config.eos_token_id = None  # the random model must not stop early
    return model


def test_flatten_handles_gradio_normalised_history():
    blocks = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    history = [{"role": "user", "metadata": None, "content": blocks},
               {"role": "assistant", "content": "Hello"}, {"role": "tool", "content": "ignored"}]
    assert to_messages(history) == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    assert flatten_content(None) == "" and flatten_content({"type": "text", "text": "x"}) == "x"


def test_sampling_settings_are_validated():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(max_new_tokens=5000)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_sample_next_greedy_nucleus_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    assert sample_next(logits, Sampling(temperature=0), torch.Generator()) == 1
    tight = Sampling(temperature=1.0, top_p=0.01)
    assert {sample_next(logits, tight, torch.Generator().manual_seed(s)) for s in range(20)} == {1}
    loose = Sampling(temperature=1.0, top_p=0.9)  # p = .51, .46, .03, .0002: the nucleus is {1, 2}
    draws = [sample_next(logits, loose, torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {1, 2}  # the nucleus: the two likely tokens, never the unlikely ones
    again = [sample_next(logits, loose, torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == again


def test_greedy_stream_matches_generate_and_streams_every_token(tiny):
    tok = CharTokenizer()
    messages = [{"role": "user", "content": "hello"}]
    steps = [(s.text, s.done) for s in stream_reply(ModelHandle(tiny, tok), messages, Sampling(temperature=0,
                                                                                               max_new_tokens=6))]
    assert len(steps) == 7 and steps[-1][1] and not any(done for _, done in steps[:-1])
    ids = prompt_ids(tok, messages)
    expected = tiny.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert steps[-1][0] == tok.decode(expected.tolist())


def test_concurrent_streams_each_keep_their_own_k(tiny):
    """Two threads stream from one shared factorized model at K=1 and K=3: each equals its solo run."""
    tok = CharTokenizer()
    partition = make_partition(tiny, 4, "random", seed=0)
    moe = build_moe(tiny, partition, top_k=2)
    handle = ModelHandle(moe, tok, threading.Lock())
    messages = [{"role": "user", "content": "the quick brown fox"}]
    sampling = Sampling(temperature=0, max_new_tokens=12)

    def reply(k):
        return list(stream_reply(handle, messages, sampling, top_k=k, trace=True))[-1]

    solo = {k: reply(k) for k in (1, 3)}
    together, barrier = {}, threading.Barrier(2)

    def run(k):
        barrier.wait()
        together[k] = reply(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in (1, 3):  # every forward of each stream ran at its own K: same routing and text as alone
        assert together[k].text == solo[k].text and together[k].experts == solo[k].experts
        assert all(len(experts) == k for token in together[k].experts for experts in token.values())
    assert len(solo[1].experts) == solo[1].new_tokens  # every reply token has its routing


def test_tokens_per_second_counts_decode_forwards_only(tiny):
    step = list(stream_reply(ModelHandle(tiny, CharTokenizer()), [{"role": "user", "content": "hi"}],
                             Sampling(temperature=0, max_new_tokens=5)))[-1]
    assert step.decode_forwards == 4 and step.prefill_s > 0
    assert step.tokens_per_s == pytest.approx(4 / step.decode_s)


def test_side_by_side_alternates_until_both_end():
    def stream(n):
        step = Step()
        for i in range(n):
            step.pieces.append(str(i))
            step.text += str(i)
            yield step
        step.done = True
        yield step

    pairs = [(a.text, b.text) for a, b in side_by_side(stream(2), stream(4))]
    assert pairs[0] == ("0", "0") and pairs[-1] == ("01", "0123")
    last_a, last_b = list(side_by_side(stream(1), iter(())))[-1]
    assert last_a.done and last_b.done and last_b.text == ""


def test_an_empty_reply_is_shown_as_such_and_never_sent_back():
    from factorlab.chat import EMPTY_REPLY, shown_text

    assert shown_text(Step(text="", done=False)) == ""  # still generating: nothing yet
    assert shown_text(Step(text="", done=True)) == EMPTY_REPLY  # finished with no token
    assert shown_text(Step(text="Hi", done=True)) == "Hi"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": EMPTY_REPLY}]
    assert to_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
