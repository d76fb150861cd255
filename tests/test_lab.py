"""The app's logic without the page: the recipe on the page, validation messages, routing statistics,
stored-result views."""
import json
import math

import pytest

from factorlab import lab, lab_jobs, tradeoff_views
from factorlab.recipe import PRESETS, Recipe, layers_text, preset
from factorlab.runs import save_run


def test_load_entropy_is_one_when_even_and_zero_when_collapsed():
    even = lab.Routing(["a"] * 4, [0], {0: [[0], [1], [2], [3]]}, {0: []}, 4)
    collapsed = lab.Routing(["a"] * 4, [0], {0: [[2], [2], [2], [2]]}, {0: []}, 4)
    assert even.load_entropy() == pytest.approx([1.0])
    assert collapsed.load_entropy() == pytest.approx([0.0])
    half = lab.Routing(["a"] * 2, [3], {3: [[0, 1], [0, 1]]}, {3: []}, 4)
    assert half.loads() == {3: [0.5, 0.5, 0.0, 0.0]} and half.load_entropy() == pytest.approx([0.5])


def test_whole_numbers_and_layer_ranges():
    assert lab._int(4.0, "N") == 4 and lab._int("8", "N") == 8
    for bad in ("four", 2.5, math.inf, None):
        with pytest.raises(lab.LabError, match="whole number"):
            lab._int(bad, "N")
    assert layers_text([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_the_page_shows_every_recipe_and_reads_it_back():
    for name in PRESETS:
        assert lab.recipe_from_controls(lab.control_values(preset(name))) == preset(name)
    shown = lab.control_values(Recipe())
    assert shown["data_kind"] == "builtin" == Recipe().data and list(lab.DATA_SOURCES)[0] == "builtin"
    assert shown["minutes"] == 0 and "data" not in shown  # no limit shows as 0; `data` as its three widgets
    hub = Recipe(data="hub:someone/texts", minutes=2.5)
    assert lab.control_values(hub)["hub_id"] == "someone/texts" and lab.control_values(hub)["minutes"] == 2.5
    assert lab.recipe_from_controls({}) == Recipe()  # a setting left out keeps its default
    assert lab.control_values(preset("chat"))["data_kind"] == "everyday+selfgen"  # the chat preset's mix
    with pytest.raises(lab.LabError, match="cannot show"):
        lab.control_values(Recipe(data="everyday+local"))


def test_controls_are_converted_and_errors_name_the_setting():
    recipe = lab.recipe_from_controls({"num_experts": 8.0, "top_k": "3", "router_lr": "0.02", "minutes": 0,
                                       "layers": " 0-3 ", "data_kind": "local", "upload": None, "hub_id": ""})
    assert recipe == Recipe(num_experts=8, top_k=3, router_lr=0.02, layers="0-3", data="local")
    assert lab.recipe_from_controls({"minutes": None}).minutes is None
    assert lab.recipe_from_controls({"minutes": 5}).minutes == 5.0
    for values, message in (({"num_experts": 2.5}, r"N experts \(num_experts\) must be a whole number"),
                            ({"seed": None}, r"Seed \(seed\) must be a whole number"),
                            ({"router_lr": "fast"}, r"\(router_lr\) must be a number"),
                            ({"top_k": 5}, r"K \(top_k\) must be in 1..4"),
                            ({"minutes": -1}, "minutes must be positive"),
                            ({"split": "coverage"}, "not a choice: use one of contiguous, random, cluster"),
                            ({"shared_choice": "frequency"}, "unknown settings shared_choice"),
                            ({"data_kind": "upload"}, "choose a .txt")):
        with pytest.raises(lab.LabError, match=message):
            lab.recipe_from_controls(values)


def test_data_source_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    uploads = tmp_path / "gradio" / "abc"
    uploads.mkdir(parents=True)
    assert lab.data_source("local", None, None) == "local" and lab.data_source("builtin", None, None) == "builtin"
    with pytest.raises(lab.LabError, match="choose a .txt"):
        lab.data_source("upload", None, None)
    text = uploads / "notes.txt"
    text.write_text("First paragraph.\n\nSecond paragraph.")
    assert lab.data_source("upload", str(text), None) == str(text)  # checked, not copied yet
    assert not (tmp_path / "cache").exists()
    kept = lab.keep_upload(Recipe(data=str(text)))  # a training job keeps a copy by content
    assert kept.data.startswith(str(tmp_path / "cache" / "uploads")) and open(kept.data).read() == text.read_text()
    assert lab.keep_upload(kept) == kept and lab.data_source("upload", kept.data, None) == kept.data
    outside = tmp_path / "server.txt"  # a path on the server that was never uploaded
    outside.write_text("secret\n\nnotes")
    with pytest.raises(lab.LabError, match="server paths are refused"):
        lab.data_source("upload", str(outside), None)
    with pytest.raises(lab.LabError, match="server paths are refused"):
        lab.data_source("upload", str(uploads / ".." / ".." / "server.txt"), None)
    csv = uploads / "a.csv"
    csv.write_text("x")
    with pytest.raises(lab.LabError, match="unsupported file type"):
        lab.data_source("upload", str(csv), None)
    with pytest.raises(ValueError, match="binary"):
        (uploads / "b.txt").write_bytes(b"\x00\x01")
        lab.data_source("upload", str(uploads / "b.txt"), None)
    assert not csv.exists() and not (uploads / "b.txt").exists()  # rejected uploads are removed
    assert outside.exists()
    with pytest.raises(ValueError, match="unreachable"):
        lab.data_source("hub", None, "someone/dataset")
    with pytest.raises(lab.LabError, match="dataset id"):
        lab.data_source("hub", None, " ")


def test_unwritable_runs_folder_is_reported_with_the_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FACTORLAB_RUNS", str(blocker / "runs"))
    with pytest.raises(lab.LabError, match="not writable.*FACTORLAB_RUNS"):
        lab.check_writable()
    assert lab.run_rows() == []


FAKE = Recipe(num_experts=4, top_k=2, split="random", layers="0-1", shared_size=0, per_token_rounds=0)


def fake_run(runs_dir, metrics: dict, recipe: Recipe = FAKE, name: str = "fake") -> str:
    """A run as workflows.run_config stores it, with a stand-in partition (views never load the weights)."""
    import torch

    config = {"recipe": recipe.to_dict(), "model_source": "embedded", "layers": [0, 1], "expert_size": 2,
              "intermediate_size": 8}
    save_run(name, config, {"permutation.0": torch.arange(8)}, metrics, root=runs_dir)
    return name


HELDOUT = {str(k): {"perplexity": 30.0 / k, "dense_perplexity": 20.0, "agreement": 0.5 + 0.1 * k, "kl": 1.0 / k,
                    "tokens": 100} for k in (1, 2, 3)}


def test_run_rows_and_description_show_the_recipe_and_heldout_metrics_per_k(runs_dir):
    fake_run(runs_dir, {"heldout": HELDOUT})
    row = dict(zip(lab.RUN_COLUMNS, lab.run_rows()[0]))
    assert row["run"] == "fake" and row["recipe"] == "custom" and row["N"] == 4 and row["layers"] == "0-1"
    assert row["dense ppl"] == "20.00"
    assert row["held-out by K: perplexity (agreement)"].startswith("K=1: 30.0 (60.0%) · K=2: 15.0 (70.0%)")
    text = lab.describe_run("fake")
    assert "perplexity 10.00 (dense 20.00)" in text and "no longer has" not in text
    assert "recipe **custom**: `split=random`, `layers=0-1`, `shared_size=0`, `per_token_rounds=0`" in text
    fake_run(runs_dir, {}, preset("quick"), "quick-run")
    assert "recipe **quick** (preset)" in lab.describe_run("quick-run")
    assert dict(zip(lab.RUN_COLUMNS, lab.run_rows()[0]))["recipe"] == "quick"
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "config.json").write_text("{not json")
    assert any(r[0] == "broken" and r[1] == "corrupt" and "corrupt" in r[2] for r in lab.run_rows())


@pytest.mark.parametrize("config, metrics, reason", [
    ([1, 2, 3], {}, "must hold JSON objects"),
    (None, {"eval": [1, 2]}, 'holds a list as "eval"'),
    (None, {"heldout": {"2": 39.0}}, 'holds a float as "heldout" at K=2'),
    (None, {"eval": {"tasks": {"piqa": {"k": []}}}}, 'malformed "eval.tasks.piqa"'),
    ({}, {}, "its settings cannot be read"),
])
def test_one_malformed_run_is_listed_as_corrupt_and_breaks_nothing(runs_dir, config, metrics, reason):
    """Issue 27, case 1: a malformed config.json or metrics.json marks that run corrupt (with the reason);
    the runs table, the run list and the CLI's `runs` keep working for every other run."""
    import subprocess
    import sys

    fake_run(runs_dir, {"heldout": HELDOUT})
    fake_run(runs_dir, {}, name="bad")
    if config is not None:
        (runs_dir / "bad" / "config.json").write_text(json.dumps(config))
    (runs_dir / "bad" / "metrics.json").write_text(json.dumps(metrics))
    rows = {r[0]: r for r in lab.run_rows()}
    assert rows["bad"][1] == "corrupt" and reason in rows["bad"][2] and rows["fake"][1] == "custom"
    assert lab.run_names() == ["fake"]
    out = subprocess.run([sys.executable, "-m", "factorlab", "runs"], capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "bad" in out.stdout and "CORRUPT" in out.stdout and reason in out.stdout


def test_the_page_reaches_runs_by_name_only(runs_dir, tmp_path):
    """Issue 27, case 2: a path typed into the Run field (another folder holding a run, or the runs
    folder's own run by a path) is refused, so a visitor learns nothing of the server's folders and a
    result is never stored on a run it was not loaded from."""
    import shutil

    fake_run(runs_dir, {"heldout": HELDOUT})
    outside = tmp_path / "elsewhere" / "fake"
    shutil.copytree(runs_dir / "fake", outside)
    for typed in (str(outside), str(runs_dir / "fake"), "../runs/fake", "fake/", "", None, 7):
        for action in (lab.describe_run, lab.run_shape, lambda n: lab_jobs.start_bench(n, 8, 0, 1),
                       lambda n: lab_jobs.start_eval(n, ["piqa"], 5), lab.delete):
            if typed in ("", None) and action in (lab.describe_run, lab.delete):
                continue  # an empty field has its own message
            with pytest.raises(lab.LabError, match="no run named .* in the runs folder|load a run first"):
                action(typed)
    assert (runs_dir / "fake").is_dir() and outside.is_dir()  # nothing was deleted
    assert "Current run: `fake`" in lab.describe_run("fake")
    with pytest.raises(lab.LabError, match="no run named"):  # a name is exact: ' fake ' or 'fake\n' is not 'fake'
        lab.describe_run(" fake ")


def test_a_run_in_use_cannot_be_deleted_under_another_spelling(runs_dir, monkeypatch):
    """Issue 27, case 3: the in-use check and the delete look at the same name."""
    from types import SimpleNamespace

    fake_run(runs_dir, {"heldout": HELDOUT}, name="twoA")
    job = SimpleNamespace(is_finished=False, params={"run": "twoA"}, kind="bench")
    monkeypatch.setattr(lab, "get_manager", lambda: SimpleNamespace(jobs=lambda: [job]))
    with pytest.raises(lab.LabError, match="in use by a bench job"):
        lab.delete("twoA")
    for spelling in ("twoA/", " twoA ", "twoA\n"):
        with pytest.raises(lab.LabError, match="no run named"):
            lab.delete(spelling)
    assert (runs_dir / "twoA").is_dir()


def test_an_old_run_shows_its_recipe_and_the_settings_that_were_removed(runs_dir):
    import torch

    old = {"model": "default", "num_experts": 4, "top_k": 2, "split": "cluster", "layers": [1, 2], "mode": "experts",
           "output_mode": "scaled", "seed": 0, "train": {"router_steps": 600, "gate_up_steps": 30},
           "partition": {"num_experts": 4, "strategy": "cluster", "seed": 0, "intermediate_size": 8,
                         "shared_size": 4, "layers": [1, 2], "shared_choice": "frequency"}}
    save_run("old", old, {"permutation.1": torch.arange(8)}, {}, root=runs_dir)
    text = lab.describe_run("old")
    assert "no longer has" in text and "`shared_choice=frequency`" in text and "`gate_up_steps=30`" in text
    assert lab.run_shape("old")["layers"] == [1, 2]
    assert lab_jobs.missing_evals("old", ["piqa"], 10) == {"piqa": [1, 2, 3, 4]}


def test_tradeoff_view_reads_stored_results(runs_dir, monkeypatch):
    info = {"hidden_size": 8, "intermediate_size": 8, "num_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 16}
    monkeypatch.setattr(lab, "dense_info", lambda spec: info)
    stderr = {"acc": 0.05, "acc_norm": 0.05}
    entry = {"n": 40, "limit": 40, "seed": 0, "chance": 0.25, "main_metric": "acc_norm",
             "dense": {"acc": 0.6, "acc_norm": 0.62, "n": 40, "stderr": stderr, "correct": "1" * 25 + "0" * 15},
             "k": {str(k): {"acc": 0.4 + 0.05 * k, "acc_norm": 0.42 + 0.05 * k, "n": 40, "stderr": stderr,
                            "relative": (0.42 + 0.05 * k) / 0.62, "above_chance": 0.5,
                            "correct": "1" * (17 + 2 * k) + "0" * (23 - 2 * k)} for k in (1, 2, 4)}}
    from factorlab.evaluate import summarize

    fake_run(runs_dir, {"heldout": HELDOUT, "eval": {"tasks": {"arc_easy": entry},
                                                     "summary": summarize({"arc_easy": entry})}})
    assert tradeoff_views.tradeoff_tasks("fake") == [tradeoff_views.HELDOUT_TASK, tradeoff_views.MEAN_TASK, "arc_easy"]
    view = tradeoff_views.tradeoff_view("fake", "arc_easy", 2, 128)
    assert [p["k"] for p in view["points"]] == [None, 1, 2, 4]
    assert [p["score"] for p in view["points"]] == pytest.approx([0.62, 0.47, 0.52, 0.62])
    gflops = [p["gflops"] for p in view["points"]]
    assert gflops[1] < gflops[2] < gflops[3] and gflops[3] > gflops[0]  # K=N pays the router on top of dense
    assert [r[1] for r in view["rows"]] == ["", "", "◀ current", ""]
    assert view["bench"] is None and set(view["flops"]) == {"dense", "K=2"}
    assert lab_jobs.missing_evals("fake", ["arc_easy", "piqa"], 40) == {"arc_easy": [3], "piqa": [1, 2, 3, 4]}
    assert lab_jobs.missing_evals("fake", ["arc_easy"], 100) == {"arc_easy": [1, 2, 3, 4]}  # other items: all again
    held = tradeoff_views.tradeoff_view("fake", tradeoff_views.HELDOUT_TASK, 1, 128)
    assert [p["score"] for p in held["points"]] == pytest.approx([1.0, 0.6, 0.7, 0.8])
    mean = tradeoff_views.tradeoff_view("fake", tradeoff_views.MEAN_TASK, 1, 128)
    assert mean["points"][0]["score"] == 1.0 and len(mean["points"]) == 4
    assert all("95% CI" in row[2] and "95% CI" in row[4] for row in mean["rows"][1:])  # paired bootstrap intervals
    json.dumps(view["rows"])  # plain values, ready for a Dataframe


def test_tradeoff_view_on_measured_time(runs_dir, monkeypatch):
    """The measured axes place dense and each benchmarked K at ms per token, each K with its limit."""
    info = {"hidden_size": 8, "intermediate_size": 8, "num_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 16}
    monkeypatch.setattr(lab, "dense_info", lambda spec: info)
    raw = {"prefill": {"dense": {"median_s": 0.512}, "1": {"median_s": 0.256}, "2": {"median_s": 0.384}},
           "decode": {"dense": {"median_s": 3.2, "tokens_per_s": 20.0}, "1": {"median_s": 2.0, "tokens_per_s": 32.0},
                      "2": {"median_s": 2.4, "tokens_per_s": 26.7}}}
    bench = {"k": {"1": {}, "2": {}}, "raw": raw, "settings": {"prefill": 512, "decode": 64, "repeats": 5},
             "limits": {"1": {"prefill": 2.0, "decode": 1.6}, "2": {"prefill": 1.6, "decode": 1.25}},
             "machine": {"threads": 2, "cpu": "test cpu"}}
    fake_run(runs_dir, {"heldout": HELDOUT, "bench": bench})
    view = tradeoff_views.tradeoff_view("fake", tradeoff_views.HELDOUT_TASK, 2, 128, axis="decode")
    assert [p["k"] for p in view["points"]] == [None, 1, 2]  # K=4 was not benchmarked: left out
    assert [p["x"] for p in view["points"]] == pytest.approx([50.0, 31.25, 37.5])  # ms per generated token
    assert [p.get("limit") for p in view["points"]] == pytest.approx([None, 31.25, 40.0])
    assert "measured" in view["x_title"] and "2 threads" in view["axis_note"]
    prefill = tradeoff_views.tradeoff_view("fake", tradeoff_views.HELDOUT_TASK, 2, 128, axis="prefill")
    assert [p["x"] for p in prefill["points"]] == pytest.approx([1.0, 0.5, 0.75])
    flops = tradeoff_views.tradeoff_view("fake", tradeoff_views.HELDOUT_TASK, 2, 128)
    assert [p["x"] for p in flops["points"]] == [p["gflops"] for p in flops["points"]] and flops["axis_note"] is None
    fake_run(runs_dir, {"heldout": HELDOUT}, name="bare")
    bare = tradeoff_views.tradeoff_view("bare", tradeoff_views.HELDOUT_TASK, 2, 128, axis="decode")
    assert bare["points"] == [] and "run the benchmark" in bare["axis_note"]
    with pytest.raises(lab.LabError, match="compute axis"):
        tradeoff_views.tradeoff_view("fake", tradeoff_views.HELDOUT_TASK, 2, 128, axis="seconds")
    bench["limits_measured"] = {"2": {"prefill": 1.6, "decode": 1.0}}  # K=2 ran more experts than its nominal 2
    fake_run(runs_dir, {"heldout": HELDOUT, "bench": bench}, name="measured")
    view = tradeoff_views.tradeoff_view("measured", tradeoff_views.HELDOUT_TASK, 2, 128, axis="decode")
    assert [p.get("limit") for p in view["points"]] == pytest.approx([None, 31.25, 50.0])
    assert "experts it ran" in view["axis_note"]


def test_bench_rows_from_stored_benchmark():
    bench = {"k": {"1": {"prefill_speedup": 1.5, "decode_speedup": 1.2, "ffn_speedup": 2.5},
                   "2": {"prefill_speedup": 1.2, "decode_speedup": 1.1, "ffn_speedup": 1.8}},
             "limits": {"1": {"prefill": 1.8, "decode": 1.6}, "2": {"prefill": 1.4, "decode": 1.3}},
             "raw": {"decode": {"dense": {"tokens_per_s": 20.0}, "1": {"tokens_per_s": 24.0},
                                "2": {"tokens_per_s": 22.0}}}}
    rows = tradeoff_views.bench_rows({"bench": bench}, 2)
    assert rows[0] == ["K=1", "1.50×", "1.80×", "1.20×", "1.60×", "2.50×", "24.0 vs 20.0"]
    assert rows[1][0] == "K=2 ◀"
    assert tradeoff_views.bench_rows({}, 2) is None
    # per-token K: the limits at the experts it ran on the benchmark's tokens replace the nominal K's
    measured = {**bench, "limits_measured": {"2": {"prefill": 1.35, "decode": 1.26}},
                "mean_k": {"2": {"prefill": 1.97, "decode": 2.26}},
                "settings": {"prefill": 512, "decode": 64, "repeats": 5}, "machine": {"threads": 1, "cpu": "c"}}
    rows = tradeoff_views.bench_rows({"bench": measured}, 2)
    assert rows[1][2:5] == ["1.35×", "1.10×", "1.26×"] and rows[0][2] == "1.80×"
    assert "(prefill / decode): K=2 1.97 / 2.26; its limits" in tradeoff_views.bench_note({"bench": measured})
