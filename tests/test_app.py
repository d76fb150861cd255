"""The Gradio app, launched in-process and driven endpoint by endpoint with gradio_client.

One app for the module, tiny budgets (2 factorized layers, 512 training tokens, a few router
steps) so the file runs in about three minutes on two cores. Endpoints are called with keyword
arguments named as the app's controls (the Recipe's field names for the recipe's settings).
"""
import json
import os
import statistics
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 240.0
# Settings by Recipe field name, as the endpoints take them (keyword arguments; a setting left out keeps
# its control's initial value, the default recipe). `data` is its widgets: data_kind, upload, hub_id.
# 2 factorized layers, no calibration pass; upload: a File has no initial value the client may leave out
TINY = dict(split="random", layers="0-1", shared_size=0, upload=None)
BUDGET = dict(train_tokens=512, heldout_tokens=256, seq_len=128, router_steps=5, per_token_router_steps=2)
LOCAL = dict(data_kind="local")  # local prose: the fastest built-in text
TRAIN = {**TINY, **BUDGET, **LOCAL}
# chat: greedy sampling (the same reply every time); layer: where tokens are coloured when colour is on
GREEDY = dict(temperature=0, top_p=0.9, seed=0, layer=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(app module, base url) with a private runs folder."""
    from tests.conftest import served_app

    with served_app(tmp_path_factory.mktemp("runs")) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[1], verbose=False)


def new_client(served):
    from gradio_client import Client

    return Client(served[1], verbose=False)


def endpoint_outputs(app, api_name: str) -> list[str]:
    """The names of the settings an endpoint returns, in the order the app wired them."""
    names = {component._id: name for name, component in app.SETTINGS.items()}
    dependency = next(d for d in app.demo.config["dependencies"] if d["api_name"] == api_name)
    return [names[i] for i in dependency["outputs"]]


def preset_controls(served, client, name: str, **inputs) -> dict:
    """The settings the page shows after choosing a preset, by name."""
    values = client.predict(name=name, **inputs, api_name="/recipe_preset")
    return dict(zip(endpoint_outputs(served[0], "recipe_preset"), values))


def poll_until(client, predicate, timeout: float = TIMEOUT) -> str:
    """Call the timer's endpoint until the job HTML satisfies predicate; returns that HTML."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        out = client.predict(api_name="/job_poll")
        if isinstance(out[0], str):
            last = out[0]
            if predicate(last):
                return last
        time.sleep(0.3)
    raise AssertionError(f"job did not reach the expected state in {timeout} s; last view: {last}")


def user_error(client, api_name: str, *args, **kwargs) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(*args, **kwargs, api_name=api_name)
    return str(info.value)


def run_row(runs: dict, name: str) -> dict:
    """A run's row of the runs table, by column name."""
    headers = runs["value"]["headers"]
    return next(dict(zip(headers, r)) for r in runs["value"]["data"] if r[0] == name)


@pytest.fixture(scope="module")
def trained(served, client):
    """A tiny run trained through the page: the quick preset, then smaller budgets. Returns (run name,
    seconds from Start to first progress, the settings the page showed)."""
    from factorlab.jobs import get_manager

    shown = {**preset_controls(served, client, "quick"), **TRAIN}
    start = time.perf_counter()
    html, message = client.predict(name="tiny", **shown, api_name="/train_start")
    first_progress = time.perf_counter() - start
    assert "tiny" in html and "Queued training job" in message
    job = get_manager().jobs()[0]
    assert job.history, "the job reported nothing before Start returned"
    poll_until(client, lambda h: "tiny" in h and "done" in h)
    info = get_manager().get(job.id)
    assert info.state == "done", info.error
    first_step = next(r["time"] for r in info.history if r["phase"] == "train")
    print(f"Start -> first progress record {1000 * first_progress:.0f} ms (round trip); job start -> first "
          f"training step {first_step:.1f} s; whole job {info.finished - info.started:.1f} s")
    client.predict("tiny", api_name="/run_load")
    summary, route_k, expert, trade_k, layer, chat_k, task, loss = client.predict(api_name="/run_changed")
    assert "Current run: `tiny`" in summary and task["value"] == "held-out agreement with dense"
    traces = {t["name"] for t in json.loads(loss["plot"])["data"]}
    assert {"router loss (PAR)", "balance loss", "distillation MSE (after refit)"} <= traces
    assert route_k["maximum"] == 4 and route_k["value"] == 2 and [c[1] for c in layer["choices"]] == [0, 1]
    return "tiny", first_progress, shown


def test_page_load_says_offline_and_lists_runs(client):
    hub, runs, picker = client.predict(api_name="/page_load")
    assert "Offline" in hub
    assert runs["value"]["headers"][0] == "run"


def test_the_page_starts_at_the_default_recipe(served, client):
    from factorlab.lab import DATA_CONTROLS, recipe_from_controls
    from factorlab.recipe import Recipe, recipe_fields

    app = served[0]
    assert set(app.RECIPE_CONTROLS) == {f.name for f in recipe_fields()} - {"data"}
    assert set(app.DATA_CONTROLS) == set(DATA_CONTROLS)
    assert recipe_from_controls({name: c.value for name, c in app.SETTINGS.items()}) == Recipe()
    # what an API client gets when it leaves a setting out: the same initial values
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/train_start"]["parameters"]
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params if p["parameter_name"] in app.SETTINGS}
    assert set(defaults) == set(app.SETTINGS) and recipe_from_controls(defaults) == Recipe()
    assert app.preset_pick.value == "default"
    for f in recipe_fields():
        if f.name == "data":
            continue
        control = app.RECIPE_CONTROLS[f.name]
        assert control.label == f.metadata["label"] and control.info == f.metadata["help"]
        parents = []
        while control is not None:
            parents.append(type(control).__name__)
            control = control.parent
        assert ("Accordion" in parents) == (not f.metadata["everyday"]), f.name  # the rest under Advanced


def test_the_preset_selector_sets_every_control(served, client):
    from factorlab.lab import control_values, recipe_from_controls
    from factorlab.recipe import PRESETS, preset

    assert set(endpoint_outputs(served[0], "recipe_preset")) == set(served[0].SETTINGS)
    for name in PRESETS:
        shown = preset_controls(served, client, name)
        assert recipe_from_controls(shown) == preset(name), name
        assert shown == control_values(preset(name)), name
    other = "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert preset_controls(served, client, "paper", model=other)["model"] == other  # the model stays
    assert "not in the list of choices" in user_error(client, "/recipe_preset", name="best")  # Gradio's own check


def test_the_preset_selector_says_custom_once_a_setting_is_changed(served, client):
    """After a user edits a control, the selector names the preset the controls still show, or `custom`;
    choosing `custom` changes nothing."""
    from factorlab.lab import control_values
    from factorlab.recipe import preset

    quick = control_values(preset("quick"))
    assert client.predict(**quick, api_name="/recipe_label") == "quick"
    assert client.predict(**{**quick, "model": "HuggingFaceTB/SmolLM2-360M-Instruct"},
                          api_name="/recipe_label") == "quick"  # presets are about the method
    assert client.predict(**{**quick, "seed": 1}, api_name="/recipe_label") == "custom"
    assert client.predict(**{**quick, "num_experts": 2.5}, api_name="/recipe_label") == "custom"  # half-typed
    assert client.predict(**{**quick, "data_kind": "hub", "hub_id": "x/y"}, api_name="/recipe_label") == "custom"
    assert client.predict(**control_values(preset("default")), api_name="/recipe_label") == "default"
    updates = served[0].apply_preset("custom", "default")
    assert set(updates) == set(served[0].SETTINGS.values())
    assert all(update == {"__type__": "update"} for update in updates.values())  # gr.skip(): nothing changes


def test_factorize_shows_exactness_and_flops_per_k(client):
    text, table = client.predict(**TINY, api_name="/factorize")
    diff = float(text.split("= **")[1].split("**")[0])
    assert diff < 1e-3 and "random split of 2 layer(s) into 4 experts of 384 neurons" in text
    rows = table["value"]["data"]
    assert [r[0] for r in rows] == ["dense", "K=1", "K=2", "K=3", "K=4"]
    ffn = [r[1] for r in rows]
    assert ffn[1] < ffn[2] < ffn[3] < ffn[4] == pytest.approx(ffn[0], rel=1e-3)


def test_bad_factorize_inputs_are_messages(client, tmp_path, monkeypatch):
    assert "do not divide" in user_error(client, "/factorize", **{**TINY, "num_experts": 5})
    assert "K (top_k) must be in 1..4" in user_error(client, "/factorize", **{**TINY, "top_k": 6})
    assert "cannot be reached" in user_error(client, "/factorize", **{**TINY, "model": "someone/some-model"})
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    monkeypatch.setenv("FACTORLAB_MODELS", str(tmp_path))  # the page loads local folders from there, by name
    assert "not supported" in user_error(client, "/factorize", **{**TINY, "model": "gpt2"})
    assert "other paths are refused" in user_error(client, "/factorize", **{**TINY, "model": str(tmp_path / "gpt2")})
    assert "out of range" in user_error(client, "/factorize", **{**TINY, "layers": "0-99"})
    assert "write 'all'" in user_error(client, "/factorize", **{**TINY, "layers": "0:3"})


def test_bad_training_inputs_are_messages_and_start_nothing(client, tmp_path, monkeypatch):
    from factorlab import data
    from factorlab.jobs import get_manager

    before = len(get_manager().jobs())
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\x00\x01\x02" * 100)
    big = tmp_path / "big.txt"
    big.write_text("word " * 5000)
    wrong = tmp_path / "table.csv"
    wrong.write_text("a,b\n1,2\n")
    from gradio_client import handle_file

    def train_error(**changes) -> str:
        return user_error(client, "/train_start", name="x", **{**TRAIN, **changes})

    def with_file(path) -> str:
        return train_error(data_kind="upload", upload=handle_file(path))

    assert "no text" in with_file(empty)
    assert "binary" in with_file(binary)
    assert "Invalid file type" in with_file(wrong)  # Gradio's own check
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 10_000)
    assert "limit" in with_file(big)
    assert "choose a .txt" in train_error(data_kind="upload")
    assert "unreachable" in train_error(data_kind="hub", hub_id="nobody/nothing")
    assert "evaluation benchmark" in train_error(data_kind="hub", hub_id="allenai/ai2_arc")
    assert "do not divide" in train_error(num_experts=5)
    assert "cannot be reached" in train_error(model="someone/model")
    assert "at least one row" in train_error(train_tokens=64)
    assert "per-token K" in train_error(num_experts=16, top_k=2)  # 2^N expert sets: at most 8 experts
    assert len(get_manager().jobs()) == before


def test_read_only_runs_folder_is_a_message(client, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FACTORLAB_RUNS", str(blocker / "runs"))
    assert "not writable" in user_error(client, "/train_start", name="x", **TRAIN)
    hub, runs, picker = client.predict(api_name="/page_load")  # the app keeps serving
    assert runs["value"]["data"] == []


def test_training_job_saves_a_run_with_heldout_metrics(client, trained):
    name, first_progress, shown = trained
    assert first_progress < 5.0
    runs, _ = client.predict(api_name="/runs_refresh")
    row = run_row(runs, name)
    assert row["N"] == 4 and row["K"] == 2 and row["training"] == "experts" and row["recipe"] == "custom"
    assert float(row["dense ppl"]) > 1  # dense and per-K held-out metrics
    assert "K=2: " in row["held-out by K: perplexity (agreement)"] and "%)" in row["held-out by K: perplexity (agreement)"]
    metrics = json.loads((Path(os.environ["FACTORLAB_RUNS"]) / name / "metrics.json").read_text())
    assert metrics["train"]["device"] == "cpu"  # where the run trained: its seconds depend on it
    html, loss, jobs_df, *_ = client.predict(api_name="/job_poll")
    assert "duplicate" not in str(html)
    assert "exists" in user_error(client, "/train_start", name=name, **shown)


def test_training_saves_the_recipe_the_page_showed(trained):
    from factorlab.lab import recipe_from_controls
    from factorlab.recipe import preset
    from factorlab.runs import load_run

    name, _, shown = trained
    recipe = load_run(name).recipe
    assert recipe == recipe_from_controls(shown) == preset("quick", split="random", layers="0-1", shared_size=0, **BUDGET,
                                                                       data="local")
    assert set(recipe.differences(preset("quick"))) == {"split", "layers", "shared_size", *BUDGET, "data"}


def test_routing_heatmap_loads_and_par_vs_no_par(client, trained):
    heatmap, load, entropy, note = client.predict(text="The cat sat on the mat. def f(x): return x", k=2,
                                                  colour="top-1 expert", expert=0, api_name="/routing")
    fig = json.loads(heatmap["plot"])
    z = fig["data"][0]["z"]
    # 2 layers, top-1 expert ids (per-token K, the default: None where a token ran no routed expert)
    assert len(z) == 2 and all(e is None or 0 <= e < 4 for row in z for e in row)
    assert sum(e is not None for row in z for e in row) > len(z[0])
    assert "layer" in fig["data"][0]["customdata"][0][0] and "chosen experts" in fig["data"][0]["customdata"][0][0]
    assert sum(1 for t in fig["data"] if t.get("name", "").startswith("expert")) == 4  # a legend entry per expert
    names = [t["name"] for t in json.loads(entropy["plot"])["data"]]
    assert any("PAR" in n for n in names) and any("no PAR" in n for n in names)
    shares = [t["y"] for t in json.loads(load["plot"])["data"]]
    assert [sum(col) for col in zip(*shares)] == pytest.approx([1.0, 1.0])
    prob = json.loads(client.predict(colour="router probability of one expert", expert=1,
                                     api_name="/routing_colour")["plot"])
    assert all(0 <= p <= 1 for row in prob["data"][0]["z"] for p in row)
    assert client.predict("Code", api_name="/routing_example").startswith("def fibonacci")
    assert "type some text" in user_error(client, "/routing", text="  ")


def test_tradeoffs_redraw_from_stored_results_is_fast(client, trained):
    timings, server = [], []
    for k in (1, 2, 3, 1, 2):
        start = time.perf_counter()
        plot, table, flops, bench_md, bench, timing = client.predict(task="held-out agreement with dense", k=k,
                                                                     seq_len=512, api_name="/tradeoffs_k")
        timings.append(time.perf_counter() - start)
        server.append(float(timing.split(" in ")[1].split(" ms")[0]))
    assert "No benchmark yet" in bench_md
    rows = table["value"]["data"]
    assert rows[0][0] == "dense" and [r[1] for r in rows].count("◀ current") == 1
    assert "ms" in timing
    flops_fig = json.loads(flops["plot"])
    assert {t["name"] for t in flops_fig["data"]} >= {"FFN (experts)", "attention scores", "router", "lm_head"}
    print(f"trade-off redraw: round trip median {1000 * statistics.median(timings):.0f} ms, handler median "
          f"{statistics.median(server):.0f} ms, over {len(timings)} redraws")
    assert statistics.median(timings) < 1.0


def test_experts_tab_starts_cancels_and_draws_the_stored_atlas(client, trained):
    """The Experts tab: no atlas yet says how to get one; the atlas job starts and cancels; a (small) atlas
    stored with the run draws every view from the file, and the Routing tab opens an expert there."""
    from factorlab.atlas import AtlasSettings
    from factorlab.jobs import get_manager
    from factorlab.workflows import atlas_run

    layer, expert, route_layer = client.predict(api_name="/experts_setup")
    assert [c[1] for c in layer["choices"]] == [0, 1] and expert["maximum"] == 3
    assert "no atlas for this run yet" in client.predict(layer=1, expert=0, api_name="/experts_layer")[0]
    assert "Queued atlas job" in client.predict(upload=None, api_name="/atlas_start")
    assert "Cancel requested for atlas job" in client.predict(api_name="/atlas_cancel")
    job = next(j for j in get_manager().jobs() if j.kind == "atlas")
    assert get_manager().wait(job.id, TIMEOUT).state == "cancelled"
    atlas_run("tiny", settings=AtlasSettings(seq_len=32, stats_tokens=64, ablation_rows=1, ablation_len=16,
                                             bootstrap=20), domains={"code/docs": "local", "numbers": "numbers"})
    server = []
    for e in (0, 1, 2, 3, 0):
        out = client.predict(layer=1, expert=e, api_name="/experts_expert")
        server.append(float(out[-1].split(" in ")[-1].split(" ms")[0]))
    summary, overview, expert_md, domains, vocab, lens, contexts, ablation, pair, ranking, spec, share, timing = \
        client.predict(layer=1, expert=2, api_name="/experts_layer")
    assert "Atlas of `tiny`" in summary and "code/docs" in summary and "Layer 1, expert 2" in expert_md
    names = {t["name"] for t in json.loads(ablation["plot"])["data"]}
    assert names == {"code/docs", "numbers"}
    assert len(ranking["value"]["data"]) == 8 and ranking["value"]["headers"][0] == "rank"  # 2 layers x 4 experts
    assert {t["name"] for t in json.loads(overview["plot"])["data"]} <= {"code/docs", "numbers"}
    assert "logit lens" in timing and len(json.loads(pair["plot"])["data"]) == 2
    print(f"Experts tab redraw, handler: median {statistics.median(server):.0f} ms over {len(server)} redraws")
    assert statistics.median(server) < 200
    assert "maximum value 3" in user_error(client, "/experts_expert", layer=1, expert=7)  # the slider's own check
    assert "5" in user_error(client, "/experts_layer", layer=5, expert=0)  # not a factorized layer
    assert tuple(client.predict(layer=1, expert=3, api_name="/routing_open_expert")[-2:]) == (1, 3)  # (and the tab)
    assert "Layer 1, expert 3" in client.predict(layer=1, expert=3, api_name="/routing_open_expert_view")[2]


def test_eval_and_benchmark_jobs_fill_the_tradeoffs(client, trained):
    from factorlab.jobs import get_manager

    assert "Queued evaluation" in client.predict(tasks=["arc_easy"], limit=4, api_name="/eval_start")
    poll_until(client, lambda h: "eval" in h and ("done" in h or "failed" in h))
    job = next(j for j in get_manager().jobs() if j.kind == "eval")
    assert job.state == "done", job.error
    assert "already measured" in user_error(client, "/eval_start", tasks=["arc_easy"], limit=4)
    assert "Queued benchmark" in client.predict(prefill=16, decode=2, repeats=1, api_name="/bench_start")
    poll_until(client, lambda h: "bench" in h and ("done" in h or "failed" in h))
    job = next(j for j in get_manager().jobs() if j.kind == "bench")
    assert job.state == "done", job.error
    assert client.predict(api_name="/results_changed") is not None
    plot, table, flops, bench_md, bench, timing = client.predict(task="arc_easy", k=2, seq_len=256, api_name="/tradeoffs_task")
    assert [r[0] for r in table["value"]["data"]] == ["dense", "K=1", "K=2", "K=3", "K=4"]
    assert "Measured speed" in bench_md and len(bench["value"]["data"]) == 4
    plot, *_, timing = client.predict(task="arc_easy", k=2, seq_len=256, axis="decode", api_name="/tradeoffs_axis")
    figure = json.loads(plot["plot"])
    assert "decode ms per generated token (measured)" in json.dumps(figure["layout"]["xaxis"])
    assert any(t.get("name") == "limit (FLOPs bound)" for t in figure["data"]) and "2 greedy tokens" in timing
    plot, table, *_ = client.predict(task="mean relative maintenance (capped at 100%)", k=2, seq_len=256,
                                     api_name="/run_changed_tradeoffs")
    assert table["value"]["data"][0][0] == "dense"


def test_chat_fidelity_job_fills_the_chat_and_the_tradeoffs(client, trained, tmp_path, monkeypatch):
    """Issue 30: the chat-fidelity job measures every K; the chat shows it at the current K, Trade-offs plots it."""
    from factorlab import fidelity, tradeoff_views
    from factorlab.jobs import get_manager

    prompts = tmp_path / "prompts.jsonl"  # a small prompt set and short replies keep the job to seconds
    prompts.write_text("".join(json.dumps({"category": "question", "prompt": p}) + "\n"
                               for p in ("What is the capital of France?", "Say hi.", "Name a colour.")))
    monkeypatch.setattr(fidelity, "CHAT_PROMPTS", prompts)
    monkeypatch.setattr(fidelity, "REPLY_TOKENS", 4)
    _, *_, stats_moe, _ = client.predict(message="Hi", max_new=1, k=2, **GREEDY, api_name="/chat")
    assert "chat fidelity at K=2 not measured yet" in stats_moe
    assert "Queued chat-fidelity" in client.predict(api_name="/fidelity_start")
    poll_until(client, lambda h: "fidelity" in h and ("done" in h or "failed" in h))
    job = next(j for j in get_manager().jobs() if j.kind == "fidelity")
    assert job.state == "done", job.error
    assert "already measured at every K" in user_error(client, "/fidelity_start")
    _, *_, stats_moe, _ = client.predict(message="Hi", max_new=1, k=2, **GREEDY, api_name="/chat")
    assert "chat fidelity at K=2 (3 shipped prompts, greedy): top-1 agreement" in stats_moe
    assert "the <i>chat</i> preset trains closer chat" in stats_moe  # this run was not trained on its own chat
    plot, table, *_ = client.predict(task=tradeoff_views.CHAT_TASK, k=2, seq_len=256, api_name="/tradeoffs_task")
    assert [r[0] for r in table["value"]["data"]] == ["dense", "K=1", "K=2", "K=3", "K=4"]
    assert table["value"]["data"][4][5] == "100.0%"  # K = N is the dense model: identical for 8 tokens
    figure = json.loads(plot["plot"])
    assert "chat: top-1 agreement" in json.dumps(figure["layout"]["yaxis"])


def test_the_dense_side_answers_from_the_first_second_without_a_run(served):
    """Issue 29: a page with no run (a fresh Space before its first model is trained) chats with the dense model;
    the factorized side says why it is empty, naming the warm start's job while it trains."""
    from factorlab import lab
    from factorlab.jobs import JobManager

    fresh = new_client(served)  # a new session: no current run
    _, dense, moe, stats_dense, stats_moe, _ = fresh.predict(message="What is the capital of France?", max_new=4,
                                                             **GREEDY, api_name="/chat")
    assert dense[-1]["role"] == "assistant" and dense[-1]["content"][0]["text"].strip()
    assert "tokens/s" in stats_dense and stats_moe == ""
    assert "No run loaded" in moe[-1]["content"][0]["text"]
    manager, gate = JobManager(), threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lab, "get_manager", lambda: manager)
        manager.submit("train", "warm-quick", lambda ctx: gate.wait(10) and {}, owner=lab.WARM_START_OWNER)
        _, dense, moe, *_ = fresh.predict(message="Hi", max_new=2, **GREEDY, api_name="/chat")
        gate.set()
    assert dense[-1]["content"][0]["text"].strip()
    assert "training its first model (`warm-quick`" in moe[-1]["content"][0]["text"]


def test_chat_streams_both_sides_and_regenerates(client, trained):
    # K=4 of 4: the tiny run's greedy reply has tokens to colour (at K=2 it now ends its turn at once)
    job = client.submit(message="What is the capital of France?", max_new=8, k=4, colour=True, **GREEDY,
                        api_name="/chat")
    outputs = list(job)
    assert len(outputs) > 3  # streamed: one update per token
    _, dense, moe, stats_dense, stats_moe, tokens = job.outputs()[-1]
    assert dense[-1]["role"] == "assistant" and dense[-1]["content"][0]["text"]
    assert moe[-1]["content"][0]["text"]
    assert "tokens/s" in stats_dense and "GFLOPs/token" in stats_moe and "K=4 of 4" in stats_moe
    assert "fl-tok" in tokens and "layer 1" in tokens
    again = client.predict(dense_history=dense, moe_history=moe, max_new=8, k=2, **GREEDY, api_name="/chat_regenerate")
    assert again[1][-1]["content"] == dense[-1]["content"]  # greedy: the same reply again
    assert len(again[1]) == 2 and again[-1] == 1  # the seed moved on, for a new sample when sampling
    sent = client.predict(message="Say hi.", dense_history=again[1], moe_history=again[2], max_new=4, k=1, **GREEDY,
                          api_name="/chat_send")
    assert len(sent[1]) == 4 and "K=1 of 4" in sent[4]
    route_text = client.predict(sent[2], sent[1], api_name="/routing_last_turn")
    assert "Say hi." in route_text
    heatmap, *_ = client.predict(text=route_text, k=2, api_name="/routing_last_turn_route")
    assert client.predict(api_name="/chat_clear")[0] == []
    assert "type a message" in user_error(client, "/chat", message=" ", **GREEDY)
    assert "less than minimum" in user_error(client, "/chat", message="hi", **{**GREEDY, "top_p": 0})


def test_two_clients_chat_while_a_job_trains_then_cancel(served, client, trained):
    from factorlab.jobs import get_manager

    client.predict(name="long", **{**TRAIN, "layers": "all", "router_steps": 3000, "train_tokens": 1024},
                   api_name="/train_start")
    job = get_manager().jobs()[0]
    poll_until(client, lambda h: "long" in h and "train" in h and "step" in h)
    assert "long" in new_client(served).predict(api_name="/job_poll")[0]  # a second browser sees the same job
    results, errors = {}, []

    def talk(k: int) -> None:
        try:
            other = new_client(served)
            other.predict(trained[0], api_name="/run_load")
            results[k] = other.predict(message="Name a colour.", max_new=6, k=k, colour=True, **GREEDY,
                                       api_name="/chat")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    # K=2 (trained) and K=3: the fixture's run factorizes layer 0 on 512 tokens, and at K=1 its greedy
    # reply can be whitespace only
    threads = [threading.Thread(target=talk, args=(k,)) for k in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors
    assert get_manager().get(job.id).state == "running"  # the job kept training meanwhile
    for k, out in results.items():
        assert out[2][-1]["content"][0]["text"] and f"K={k} of 4" in out[4]
    # the same prompt, greedy, at K=2 and K=3 concurrently: each got its own K (replies need not match)
    assert "started by another visitor" in user_error(new_client(served), "/job_cancel")
    message = client.predict(api_name="/job_cancel")
    assert "Cancel requested" in message
    poll_until(client, lambda h: "long" in h and "cancelled" in h)
    assert not (served[0].lab.runs_root() / "long").exists()  # a cancelled job writes nothing
    assert "no job is queued" in user_error(client, "/job_cancel")


def test_uploaded_jsonl_trains_and_the_run_can_be_deleted(client, trained, tmp_path):
    from gradio_client import handle_file

    lines = [json.dumps({"text": f"Note {i}: the river rose after {i} days of rain, and the bridge held."})
             for i in range(120)]
    (tmp_path / "notes.jsonl").write_text("\n".join(lines))
    client.predict(name="to-delete", **{**TRAIN, "mode": "none", "router_steps": 1, "heldout_tokens": 0,
                                        "data_kind": "upload", "upload": handle_file(tmp_path / "notes.jsonl")},
                   api_name="/train_start")
    poll_until(client, lambda h: "to-delete" in h and "done" in h)
    runs, picker, message = client.predict("to-delete", api_name="/run_delete")
    assert "Deleted" in message and all(r[0] != "to-delete" for r in runs["value"]["data"])
    assert "no run named" in user_error(client, "/run_delete", "to-delete")
    assert "choose a run" in user_error(client, "/run_load", None)
