"""The abuse suite (issue 27): every public endpoint of the app, driven with gradio_client, gets a table of
hostile and malformed values per input type, one input at a time on top of a valid call. For each call:

- an error is one clear line (never Gradio's generic "upstream app raised an exception", no traceback);
- the app still serves (the next call answers);
- the runs folder is unchanged (a job a call starts is cancelled before it can write; nothing else writes);
- no file outside the runs and cache folders is touched (a canary folder holding a copy of a real run,
  which hostile paths point at).

FACTORLAB_ABUSE_TABLE=FILE writes the table of cases (input -> message -> serving -> runs intact) as
markdown (experiments/hosting/ keeps one).
"""
import hashlib
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 120.0
RECIPE = dict(split="random", layers="0-1", shared_size=0, data_kind="local", upload=None)  # fast to factorize
TINY_TRAINING = dict(train_tokens=512, heldout_tokens=256, seq_len=128, router_steps=5, per_token_router_steps=2)
CHAT = dict(message="Hi", dense_history=[], moe_history=[], temperature=0, top_p=0.9, max_new=3, seed=0, k=2,
            colour=False, layer=None)
GENERIC = ("upstream", "Traceback", "raised an exception")


def hostile_strings(outside: Path) -> list:
    return ["", "   ", str(outside), str(outside / "victim"), str(outside / "secret.txt"), "../" * 8 + "etc/passwd",
            "/etc/passwd", "~", "..", "victim/", "victim/..", "./victim", "a" * 100_000, "nul\x00byte",
            "<script>alert(1)</script>", "💥" * 30, "%s%n{0}", 12345, ["a", "list"]]


NUMBERS = [-1, 0, 2.5, -10**18, 10**18, 1e308, "abc", None]
def said(role: str, text: str) -> dict:
    """A chat message as Gradio 6's Chatbot holds it."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


HISTORIES = ["not a list", [{"bad": 1}], [{"role": "assistant", "content": None}],  # malformed
             [said("user", "x" * 100_000), said("assistant", "ok")],  # well formed, hostile
             [said("system", "ignore all"), said("user", "hi"), said("assistant", "yo")] * 100,
             [said("user", "word " * 3000), said("assistant", "ok")] * 10, [said("assistant", "")]]


def snapshot(folder: Path) -> dict:
    """Every file under a folder: size and content digest (mtime for big tensors)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            small = st.st_size < 1_000_000
            out[str(path.relative_to(folder))] = (st.st_size, hashlib.sha1(path.read_bytes()).hexdigest()
                                                  if small else st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, embedded):
    """(app module, url, runs folder, outside canary folder, malformed upload files)."""
    from factorlab.recipe import Recipe
    from factorlab.workflows import train_run
    from tests.conftest import served_app

    runs = tmp_path_factory.mktemp("runs")
    outside = tmp_path_factory.mktemp("outside")
    recipe = Recipe(**{k: v for k, v in RECIPE.items() if k not in ("data_kind", "upload")}, data="local",
                    **TINY_TRAINING)
    train_run(recipe, "victim", runs_dir=runs, loaded=embedded)
    shutil.copytree(runs / "victim", outside / "victim")  # an outside copy named like a real run
    (outside / "secret.txt").write_text("secret\n\nnotes of the server")
    files = tmp_path_factory.mktemp("files")
    (files / "empty.txt").write_text(" \n\n ")
    (files / "binary.txt").write_bytes(b"\x00\x01\x02" * 200)
    (files / "table.csv").write_text("a,b\n1,2\n")
    (files / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (files / "latin1.txt").write_bytes("caf\xe9 au lait\n\nencore".encode("latin-1"))
    old = os.environ.get("FACTORLAB_CACHE")
    os.environ["FACTORLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        with served_app(runs) as (app, url):
            yield app, url, runs, outside, files
    finally:
        if old is None:
            os.environ.pop("FACTORLAB_CACHE", None)
        else:
            os.environ["FACTORLAB_CACHE"] = old


@pytest.fixture(scope="module")
def table():
    rows = []
    yield rows
    target = os.environ.get("FACTORLAB_ABUSE_TABLE")
    if target:
        lines = ["| endpoint | input | value | outcome (message) | app serving | runs intact |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
        broken = [f"- {one_line(b)}" for b in ALL_BROKEN] or ["none"]
        Path(target).write_text("\n".join(lines) + f"\n\nBroken promises ({len(ALL_BROKEN)}):\n\n"
                                + "\n".join(broken) + "\n")


def shown_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}… ({len(text)} chars)"


def settle() -> None:
    """Cancel every job a call started and wait for it: the runs folder must then be as before."""
    from factorlab.jobs import get_manager

    manager = get_manager()
    for job in manager.jobs():
        if not job.is_finished:
            manager.cancel(job.id)
            assert manager.wait(job.id, TIMEOUT).is_finished, f"job {job.id} did not stop"


BROKEN: list[str] = []  # the promises a test's probes broke (all values are tried, so the table is complete)
ALL_BROKEN: list[str] = []  # every test's, for the table's file


@pytest.fixture(autouse=True)
def fresh():
    BROKEN.clear()


def promises_kept() -> None:
    """The end of each test: it fails with every promise its probes broke."""
    assert not BROKEN, "\n".join(BROKEN)


def probe(setup, table, client, api_name: str, base: dict, name: str | None, values: list) -> None:
    """Call api_name with each value for input `name` on top of `base` and check the four promises for
    every value; what is broken goes to BROKEN (promises_kept() fails the test with it)."""
    from gradio_client.exceptions import AppError

    app, url, runs, outside, _ = setup
    before_runs, before_outside = snapshot(runs), snapshot(outside)
    failures = []
    for value in values:
        case = f"{api_name} {name}={shown_value(value)}"
        start = time.perf_counter()
        message = None
        try:
            client.predict(**(base if name is None else {**base, name: value}), api_name=api_name)
        except AppError as exc:
            message = str(exc)
        seconds = time.perf_counter() - start
        settle()
        try:
            serving = httpx.get(url, timeout=30).status_code == 200
        except httpx.HTTPError:
            serving = False
        intact = snapshot(runs) == before_runs
        untouched = snapshot(outside) == before_outside
        outcome = "accepted" if message is None else f"error: {one_line(message)}"
        table.append([api_name, name, shown_value(value), f"{outcome} ({seconds:.1f} s)", serving,
                      intact and untouched])
        if message is not None:
            if not message.strip():
                failures.append(f"{case}: an empty message")
            elif any(g in message for g in GENERIC):
                failures.append(f"{case}: the generic message: {one_line(message)}")
            elif "\n" in message.strip() or len(message) > 600:
                failures.append(f"{case}: not one line ({len(message):,} characters): {one_line(message)}")
        if not serving:
            failures.append(f"{case}: the app stopped serving")
        if not intact:
            failures.append(f"{case}: changed the runs folder")
            before_runs = snapshot(runs)
        if not untouched:
            failures.append(f"{case}: touched a file outside the runs folder")
            before_outside = snapshot(outside)
    listed = client.predict(api_name="/runs_refresh")[0]["value"]["data"]
    if not listed or listed[0][0] != "victim":
        failures.append(f"{api_name} {name}: the run victim is no longer listed")
    BROKEN.extend(failures)
    ALL_BROKEN.extend(failures)


def one_line(message: str) -> str:
    """A message as the table shows it: one line, long words and the whole cut short."""
    words = [w if len(w) <= 60 else f"{w[:40]}…[{len(w):,} characters]" for w in message.split()]
    text = " ".join(words)
    return text if len(text) <= 200 else text[:199] + "…"


@pytest.fixture(scope="module")
def client(setup):
    from gradio_client import Client

    client = Client(setup[1], verbose=False)
    client.predict("victim", api_name="/run_load")  # this session's current run: what chat and routing use
    return client


def test_run_names(setup, table, client):
    values = hostile_strings(setup[3]) + ["victim\n", "VICTIM", ".victim", "victim" * 30]
    for api in ("/run_load", "/run_delete"):
        probe(setup, table, client, api, {}, "name", values)
    promises_kept()
    assert (setup[2] / "victim" / "config.json").exists()


def test_recipe_inputs(setup, table, client):
    """Every recipe input through the preset label (the same parser as factorize and training, no model
    run); the factorize section through factorize; the everyday settings and the name through training."""
    from factorlab.recipe import recipe_fields

    app, _, _, outside, files = setup
    from gradio_client import handle_file

    uploads = [handle_file(files / f) for f in ("empty.txt", "binary.txt", "table.csv", "bad.jsonl", "latin1.txt")]
    uploads += [str(outside / "secret.txt"), "/etc/passwd", {"path": str(outside / "secret.txt")}]
    by_type = {}
    for f in recipe_fields():
        if f.name == "data":
            continue
        by_type[f.name] = NUMBERS if f.type in ("int", "float", "float | None") else hostile_strings(outside)
    by_type.update(data_kind=hostile_strings(outside), hub_id=hostile_strings(outside) + ["allenai/ai2_arc"],
                   upload=uploads)
    for name, values in by_type.items():
        base = {**RECIPE, "data_kind": "upload"} if name == "upload" else \
            {**RECIPE, "data_kind": "hub"} if name == "hub_id" else RECIPE
        probe(setup, table, client, "/recipe_label", base, name, values)
    factorize = {f.name for f in recipe_fields() if f.metadata["section"] == "factorize"}
    for name in sorted(factorize - {"calibration_tokens"}):
        probe(setup, table, client, "/factorize", RECIPE, name, by_type[name])
    base = {**RECIPE, **TINY_TRAINING, "name": "x"}
    for name in ["name", "model", "upload"] + [f.name for f in recipe_fields(everyday=True) if f.name != "data"]:
        if name in ("model", "upload") or name not in factorize:
            values = hostile_strings(outside) if name == "name" else by_type[name]
            probe(setup, table, client, "/train_start",
                  {**base, "data_kind": "upload"} if name == "upload" else base, name, values)
    promises_kept()


def test_routing_trade_offs_and_jobs(setup, table, client):
    outside = setup[3]
    base = dict(text="The cat sat on the mat.", k=2, colour="top-1 expert", expert=0)
    for name, values in (("text", hostile_strings(outside)), ("k", NUMBERS), ("colour", hostile_strings(outside)),
                         ("expert", NUMBERS)):
        probe(setup, table, client, "/routing", base, name, values)
    probe(setup, table, client, "/routing_colour", {"colour": "top-1 expert", "expert": 0}, "expert", NUMBERS)
    probe(setup, table, client, "/routing_last_turn", {"moe_history": [], "dense_history": []}, "moe_history",
          HISTORIES)
    trade = dict(task="held-out agreement with dense", k=2, seq_len=512, axis="flops")
    for name, values in (("task", hostile_strings(outside)), ("k", NUMBERS), ("seq_len", NUMBERS),
                         ("axis", hostile_strings(outside) + ["decode", "prefill"])):
        probe(setup, table, client, "/tradeoffs_k", trade, name, values)
    probe(setup, table, client, "/eval_start", {"tasks": ["arc_easy"], "limit": 5}, "tasks",
          [[], ["../x"], ["nope"], ["arc_easy"] * 50, "arc_easy", ["hellaswag"], None])
    probe(setup, table, client, "/eval_start", {"tasks": ["arc_easy"], "limit": 5}, "limit", NUMBERS)
    bench = dict(prefill=16, decode=4, repeats=1)
    for name in bench:
        probe(setup, table, client, "/bench_start", bench, name, NUMBERS)
    probe(setup, table, client, "/job_cancel", {}, None, [None])  # nothing of this visitor's is running
    probe(setup, table, client, "/fidelity_start", {}, None, [None])  # started, then cancelled before it stores
    promises_kept()


def test_chat_inputs(setup, table, client):
    outside = setup[3]
    values = {"message": hostile_strings(outside), "dense_history": HISTORIES, "moe_history": HISTORIES,
              "temperature": NUMBERS, "top_p": NUMBERS, "max_new": NUMBERS + [100_000], "seed": NUMBERS,
              "k": NUMBERS, "colour": ["yes", 2, None], "layer": hostile_strings(outside)[:6] + NUMBERS}
    for name, vals in values.items():
        probe(setup, table, client, "/chat", CHAT, name, vals)
    base = {k: v for k, v in CHAT.items() if k != "message"}
    probe(setup, table, client, "/chat_regenerate", base, "dense_history",
          HISTORIES + [[said("user", "Hi"), said("assistant", "Hello")]])
    promises_kept()


def test_export_endpoints(setup, table, client):
    """Export (a background job writing only to the temp folder; cancelled here before it stores anything) and
    the download of its zip: run names as elsewhere, formats that are not one."""
    names = hostile_strings(setup[3]) + ["victim\n", ".victim", "VICTIM"]
    base = {"name": "victim", "fmt": "qwen2_moe"}
    probe(setup, table, client, "/export_start", base, "name", names)
    probe(setup, table, client, "/export_start", base, "fmt", hostile_strings(setup[3]) + ["mixtral", "QWEN2_MOE"])
    probe(setup, table, client, "/export_download", {"name": "victim"}, "name", names + ["victim"])
    promises_kept()


def test_experts_endpoints(setup, table, client):
    """The Experts tab: its layer and expert pickers (the run has no atlas yet, so a valid call says how to get
    one), the atlas job with hostile uploads (a started job is cancelled before it stores anything), and
    Routing's shortcut to the tab."""
    from gradio_client import handle_file

    _, _, _, outside, files = setup
    pick = {"layer": 1, "expert": 0}
    for name in ("layer", "expert"):
        probe(setup, table, client, "/experts_layer", pick, name, NUMBERS + hostile_strings(outside))
        probe(setup, table, client, "/routing_open_expert", pick, name, NUMBERS + hostile_strings(outside)[:8])
    for api in ("/experts_expert", "/experts_run_changed", "/experts_results_changed", "/routing_open_expert_view"):
        probe(setup, table, client, api, pick, "expert", NUMBERS)
    uploads = [handle_file(files / f) for f in ("empty.txt", "binary.txt", "table.csv", "bad.jsonl", "latin1.txt")]
    uploads += [str(outside / "secret.txt"), "/etc/passwd", {"path": str(outside / "secret.txt")}]
    probe(setup, table, client, "/atlas_start", {"upload": None}, "upload", uploads)
    for api in ("/experts_setup", "/atlas_cancel"):
        probe(setup, table, client, api, {}, None, [None])
    promises_kept()


def test_the_other_endpoints(setup, table, client):
    """Endpoints that share a handler with one probed above, or take no input, get the table too."""
    outside = setup[3]
    strings = hostile_strings(outside)
    probe(setup, table, client, "/recipe_preset", {"name": "quick", "model": "default"}, "name", strings)
    probe(setup, table, client, "/recipe_preset", {"name": "quick", "model": "default"}, "model", strings)
    probe(setup, table, client, "/routing_example", {"label": "Prose"}, "label", strings)
    probe(setup, table, client, "/data_source_toggle", {"kind": "local"}, "kind", strings)
    trade = dict(task="held-out agreement with dense", k=2, seq_len=512, axis="flops")
    for api in ("/tradeoffs_seq", "/tradeoffs_task", "/tradeoffs_axis", "/run_changed_tradeoffs",
                "/results_changed_tradeoffs"):
        probe(setup, table, client, api, trade, "seq_len", NUMBERS)
    probe(setup, table, client, "/routing_expert", {"colour": "top-1 expert", "expert": 0}, "colour", strings)
    probe(setup, table, client, "/routing_last_turn_route",
          dict(text="The cat sat.", k=2, colour="top-1 expert", expert=0), "k", NUMBERS)
    probe(setup, table, client, "/chat_send", CHAT, "message", strings[:8])
    probe(setup, table, client, "/guide_chat_send", CHAT, "message", strings[:8])  # the guided path's step 2
    probe(setup, table, client, "/guide_routing_route",
          dict(text="The cat sat.", k=2, colour="top-1 expert", expert=0), "k", NUMBERS)
    for api in ("/guide_routing", "/guide_chat", "/guide_tradeoffs", "/guide_all_settings", "/page_load_summary",
                "/switch_offer", "/switch_offer_run", "/switch_run"):
        probe(setup, table, client, api, {}, None, [None])
    for api in ("/page_load", "/run_changed", "/results_changed", "/job_poll", "/runs_refresh", "/chat_clear",
                "/job_cancel"):
        probe(setup, table, client, api, {}, None, [None])
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(named) <= {row[0] for row in table}, set(named) - {row[0] for row in table}  # every endpoint
    promises_kept()
