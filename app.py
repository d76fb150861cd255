"""factorlab lab: factorize an LM's FFNs into experts, train the router with PAR, and look inside.

Layout and wiring only; everything shown comes from factorlab (lab, viz, chat). Run:
    python app.py            # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override)
"""
from __future__ import annotations

import functools
import inspect
import itertools
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

from factorlab import atlas_views, chat_views, lab, lab_jobs, tradeoff_views, viz, warmstart
from factorlab.chat import to_messages
from factorlab.export import FORMATS as EXPORT_FORMATS
from factorlab.headline import headline_markdown
from factorlab.jobs import get_manager
from factorlab.limits import warm_start
from factorlab.models import hub_reachable
from factorlab.recipe import PRESETS, Recipe, field_type, preset, recipe_fields
from factorlab.runs import clean_leftovers
from factorlab.tasks import TASK_NAMES
from factorlab.workflows import FLOPS_SEQ_LEN

ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = json.loads((ASSETS / "examples.json").read_text())
ROUTING_EXAMPLES = {e["label"]: e["text"] for e in EXAMPLES["routing"]}
POLL_SECONDS = float(os.environ.get("FACTORLAB_POLL_SECONDS", "1.0"))
CHAT_CONCURRENCY = int(os.environ.get("FACTORLAB_CHAT_CONCURRENCY", "4"))
THEME = gr.themes.Soft(primary_hue="orange", secondary_hue="blue")
JOB_COLUMNS = ["job", "kind", "name", "state", "progress", "elapsed", "error"]
CSS = (ASSETS / "style.css").read_text()
INITIAL = lab.control_values(Recipe())  # what the recipe controls show on a fresh page


def gpu(fn):
    """@spaces.GPU on Hugging Face ZeroGPU Spaces only (SPACES_ZERO_GPU set); a no-op elsewhere."""
    if not lab.env_flag("SPACES_ZERO_GPU"):
        return fn
    import spaces

    return spaces.GPU(fn)


def shown(fn):
    """Every error becomes one line in the page (gr.Error), never Gradio's generic one: what the user can fix
    says how; anything else (a bug) says so and is logged with its traceback under a reference."""
    def convert(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        message = lab.user_message(exc)
        if message is None:
            ref = uuid.uuid4().hex[:8]
            logging.getLogger(__name__).error("unexpected error %s in %s", ref, fn.__name__, exc_info=exc)
            message = (f"Unexpected error ({type(exc).__name__}) in {fn.__name__.replace('_', ' ')}: a bug in "
                       f"factorlab, logged on the server as {ref}. Nothing was changed; other actions still work.")
        return gr.Error(message, print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised, as a message when it is the user's to fix
                raise convert(exc) from exc
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised, as a message when it is the user's to fix
            raise convert(exc) from exc
    return call


# ---------------------------------------------------------------- handlers: page, runs, jobs
def page_load(run):
    """A fresh page: the newest run becomes current; say whether the Hub is reachable."""
    run = run or lab.newest_run()
    hub = ("Hub reachable: Hub ids download on first use." if hub_reachable() else
           "Offline: the Hub cannot be reached, so use the embedded default model or a local folder.")
    names = lab.run_names()
    return run, hub, gr.Dataframe(value=lab.run_rows(), headers=lab.RUN_COLUMNS), \
        gr.Dropdown(choices=names, value=run if run in names else None)


def current_summary(run):
    """The header's summary of the page's current run (or what a page without one can do)."""
    return lab.describe_run(run)


def switch_offer(run):
    """Offer the warm start's default-recipe run to a page still on its quick run (never switched for them)."""
    text = warmstart.offer_text(run)
    return gr.Row(visible=bool(text)), text


def switch_run(run):
    """Make the offered run this page's current run."""
    target = warmstart.offer(run)
    if target is None:
        raise lab.LabError("nothing to switch to: the default recipe's run is not ready (or already current)")
    return target


def run_changed(run):
    """Point every tab at the current run: sliders sized to its N and layers, task list, summary."""
    title, records = lab_jobs.loss_records(run)
    loss = viz.loss_figure(records, title)
    if not run:
        return (lab.describe_run(None), k_slider(2, 1), gr.Slider(minimum=0, maximum=1, value=0), k_slider(2, 1),
                gr.Dropdown(choices=[], value=None), k_slider(2, 1), gr.Dropdown(choices=[], value=None), loss)
    shape = lab.run_shape(run)
    n, k, layers = shape["num_experts"], shape["top_k"], shape["layers"]
    tasks = tradeoff_views.tradeoff_tasks(run)
    return (lab.describe_run(run), k_slider(n, k), gr.Slider(minimum=0, maximum=max(1, n - 1), value=0, step=1),
            k_slider(n, k), gr.Dropdown(choices=layers, value=layers[len(layers) // 2]), k_slider(n, k),
            gr.Dropdown(choices=tasks, value=tasks[0] if tasks else None), loss)


def k_slider(n: int, k: int):
    """A K slider over 1..N (Gradio needs minimum < maximum, hence at least 1..2)."""
    return gr.Slider(minimum=1, maximum=max(2, n), value=k, step=1)


def load_run(name):
    """Make a run on disk the current run of this page."""
    if not name:
        raise lab.LabError("choose a run in the list first")
    lab.run_shape(name)  # a missing or corrupt run fails here, with its reason
    return name, f"Loaded `{name}`: the Routing, Trade-offs and Chat tabs now use it."


def delete_run(name, run):
    """Delete a run; if it was this page's current run, the page has none."""
    lab.delete(name)
    names = lab.run_names()
    current = None if run == name else run
    return (gr.Dataframe(value=lab.run_rows(), headers=lab.RUN_COLUMNS), gr.Dropdown(choices=names, value=None),
            current, f"Deleted `{name}`.")


def start_export(name, fmt, request: gr.Request = None):
    """Queue an export of the chosen run as a standard transformers MoE checkpoint (a background job)."""
    job_id = lab_jobs.start_export(name, fmt, owner=_session(request))
    return f"Queued export job `{job_id}` of `{name}`: press *Get the export* when the jobs table says done."


def get_export(name):
    """The chosen run's finished export as a zip to download, and what it is."""
    return lab_jobs.export_file(name)


def refresh_runs():
    """Re-read the runs folder."""
    return gr.Dataframe(value=lab.run_rows(), headers=lab.RUN_COLUMNS), gr.Dropdown(choices=lab.run_names())


def apply_preset(name, model):
    """Set every recipe control to a named preset (the model stays: presets are about the method)."""
    if name == lab.CUSTOM:  # nothing to apply: the controls already show the user's own recipe
        return {control: gr.skip() for control in SETTINGS.values()}
    values = lab.control_values(preset(name, model=model or "default"))
    return {SETTINGS[key]: value for key, value in values.items()}


def preset_label(**settings):
    """After a user edits a setting: the preset the controls now show, or custom."""
    return lab.preset_label(settings)


def factorize(**settings):
    """Factorize the recipe the controls show, without saving: K=N exactness check and FLOPs per K."""
    text, rows = lab.quick_factorize(lab.recipe_from_controls(settings))
    return text, gr.Dataframe(value=rows, headers=["model", "FFN GFLOPs/token", "total GFLOPs/token", "FFN vs dense",
                                                   "total vs dense"])


# Training jobs each page started, by Gradio session, kept on the server: the page's poll state is
# also written by timer ticks, and a tick that began before Start returned would drop the new job id.
_STARTED: dict[str, set[str]] = {}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def start_training(poll, name, request: gr.Request = None, **settings):
    """Queue a training job of the recipe the controls show."""
    job_id = lab_jobs.start_training(lab.recipe_from_controls(settings), name=name, owner=_session(request))
    _STARTED.setdefault(_session(request), set()).add(job_id)
    poll = {**(poll or {}), "started": [*(poll or {}).get("started", []), job_id], "key": None}
    view = lab_jobs.job_view(get_manager().get(job_id))
    return poll, viz.progress_html(view), f"Queued training job `{job_id}` → run `{view['name']}`."


def cancel_job(request: gr.Request = None):
    """Cancel this page's running (else newest queued) job; other visitors' jobs are theirs."""
    job = lab_jobs.cancel_job(_session(request))
    return f"Cancel requested for {job.kind} job `{job.id}`: it stops within one step; no run is half-written."


def poll_jobs(poll, run, version, request: gr.Request = None):
    """Timer tick: redraw job views only when something changed; adopt a run this page trained."""
    manager = get_manager()
    jobs = manager.jobs()
    active = manager.active()
    train = next((j for j in jobs if j.kind == "train"), None)
    finished = [j.id for j in jobs if j.is_finished]
    key = [getattr(active, "id", None), getattr(active, "state", None), len(getattr(active, "history", [])),
           getattr(train, "id", None), len(getattr(train, "history", [])), finished]
    poll = dict(poll or {})
    if poll.get("key") == key:
        return (gr.skip(),) * 8
    started = set(poll.get("started", [])) | _STARTED.get(_session(request), set())
    for job in jobs:
        if job.id in started and job.kind == "train" and job.state == "done" \
                and job.id not in poll.get("adopted", []):
            run = job.result["run"]
            poll["adopted"] = [*poll.get("adopted", []), job.id]
    runs_changed = finished != poll.get("finished")
    if runs_changed:  # a page without a run adopts the warm start's first model when it is ready
        run = warmstart.page_run(run)
    poll.update(key=key, finished=finished)
    title, records = lab_jobs.loss_records(run)
    loss = viz.loss_figure(records, title)
    jobs_df = gr.Dataframe(value=lab_jobs.job_rows(), headers=JOB_COLUMNS)
    if not runs_changed:
        return poll, run, viz.progress_html(lab_jobs.job_view(active)), loss, jobs_df, gr.skip(), gr.skip(), gr.skip()
    return (poll, run, viz.progress_html(lab_jobs.job_view(active)), loss, jobs_df,
            gr.Dataframe(value=lab.run_rows(), headers=lab.RUN_COLUMNS), gr.Dropdown(choices=lab.run_names()),
            (version or 0) + 1)


# ---------------------------------------------------------------- handlers: routing
@gpu
def route(run, text, k, colour, expert):
    """Route a text through the current run (and its untrained twin) and draw the routing."""
    trained = lab.route(run, text, k, trained=True)
    untrained = lab.route(run, text, k, trained=False)
    mode = lab.run_shape(run)["mode"]
    label = "PAR-trained router" if mode != "none" else "this run's router (untrained: mode none)"
    no_par = "no PAR (untrained router, same partition)"
    entropy = viz.entropy_figure(trained.layers, {label: trained.load_entropy(), no_par: untrained.load_entropy()})
    n = trained.num_experts
    note = (f"{len(trained.tokens)} tokens × {len(trained.layers)} factorized layers at K={int(k)} of {n} "
            f"(texts are cut at {lab.MAX_ROUTE_TOKENS} tokens). Mean load entropy: "
            f"{sum(trained.load_entropy()) / len(trained.layers):.3f} ({label}) vs "
            f"{sum(untrained.load_entropy()) / len(untrained.layers):.3f} (no PAR); 1 = even, 0 = collapsed.")
    return (trained, heatmap(trained, colour, expert), viz.load_figure(trained.loads(), n, f"expert load — {label}"),
            entropy, note)


def heatmap(routing, colour, expert):
    """Redraw the heatmap of the last routed text (no model run)."""
    if routing is None:
        return viz.empty_figure("route a text to see its heatmap")
    chosen = None if colour == "top-1 expert" else min(int(expert), routing.num_experts - 1)
    return viz.routing_heatmap(routing.tokens, routing.layers, routing.top_k_index, routing.probs,
                               routing.num_experts, chosen)


def last_turn(moe_history, dense_history):
    """The last user message and reply of the chat, as text to route."""
    messages = to_messages(moe_history) or to_messages(dense_history)
    if not messages:
        raise lab.LabError("the chat is empty: send a message in the Chat tab first")
    return "\n".join(m["content"] for m in messages[-2:])


# ---------------------------------------------------------------- handlers: trade-offs
def tradeoffs(run, task, k, seq_len, axis):
    """Redraw from stored results only (no model runs here)."""
    start = time.perf_counter()
    if not run:
        empty = viz.empty_figure("load a run first")
        return empty, gr.Dataframe(value=[]), empty, "", gr.Dataframe(value=[]), ""
    view = tradeoff_views.tradeoff_view(run, task, int(k), int(seq_len), axis or "flops")
    plot = viz.tradeoff_figure(view["points"], int(k), view["metric"], f"{task or 'no results yet'}",
                               view["x_title"])
    flops = viz.flops_figure(view["flops"], int(seq_len))
    if view["bench"] is None:
        bench_md = "**No benchmark yet: run one** (button below) to measure prefill and decode speed on this machine."
        bench = gr.Dataframe(value=[])
    else:
        bench_md = ("**Measured speed**: wall-clock ratios dense / factorized on this machine (limit = the FLOPs "
                    f"bound); {view['bench_note']}. Few repeats on a busy machine are noisy.")
        bench = gr.Dataframe(value=view["bench"], headers=tradeoff_views.BENCH_COLUMNS)
    ms = 1000 * (time.perf_counter() - start)
    axis_note = f"Plot: {view['axis_note']}. " if view["axis_note"] else ""
    return (plot, gr.Dataframe(value=view["rows"], headers=view["headers"]), flops, bench_md, bench,
            f"{axis_note}Redrawn from stored results in {ms:.0f} ms (server side).")


def tradeoff_choices(run):
    """The tasks with stored results for the current run."""
    tasks = tradeoff_views.tradeoff_tasks(run)
    return gr.Dropdown(choices=tasks, value=tasks[0] if tasks else None)


def start_eval(run, tasks, limit, request: gr.Request = None):
    """Queue the current run's missing evaluations as a background job."""
    job_id = lab_jobs.start_eval(run, tasks, limit, owner=_session(request))
    return f"Queued evaluation job `{job_id}`; the plot updates when it finishes."


def start_fidelity(run, request: gr.Request = None):
    """Queue the chat-fidelity measurement of the current run as a background job."""
    job_id = lab_jobs.start_fidelity(run, owner=_session(request))
    return f"Queued chat-fidelity job `{job_id}`; pick the task '{tradeoff_views.CHAT_TASK}' when it finishes."


def start_bench(run, prefill, decode, repeats, request: gr.Request = None):
    """Queue a speed benchmark of the current run as a background job."""
    job_id = lab_jobs.start_bench(run, prefill, decode, repeats, owner=_session(request))
    return f"Queued benchmark job `{job_id}`; the speed table updates when it finishes."


# ---------------------------------------------------------------- handlers: experts (the atlas)
def experts_view(run, layer, expert):
    """Redraw the Experts tab from the run's stored atlas (no model runs here)."""
    start = time.perf_counter()
    layer = None if layer in (None, "") else lab._int(layer, "layer")
    expert = 0 if expert in (None, "") else lab._int(expert, "expert")
    atlas = lab_jobs.stored_atlas(run) if run else None
    if atlas is None:
        note = ("load a run first" if not run else "no atlas for this run yet: press Compute the atlas (a background "
                "job: about 3 minutes on 2 idle CPU cores, several times that on a busy machine)")
        empty, table = viz.empty_figure(note), gr.Dataframe(value=[])
        return (f"**{note}**", empty, "", empty, table, table, "", empty, empty, table, empty, empty, "")
    layers = atlas["layers"]
    layer = layers[len(layers) // 2] if layer is None else layer
    atlas_views.expert_entry(atlas, layer, expert)  # a layer or expert this run lacks: one line naming the choices
    out = (atlas_views.atlas_markdown(atlas), atlas_views.overview_figure(atlas),
           atlas_views.expert_markdown(atlas, layer, expert), atlas_views.domain_figure(atlas, layer, expert),
           gr.Dataframe(value=atlas_views.vocab_rows(atlas, layer, expert), headers=atlas_views.VOCAB_COLUMNS),
           gr.Dataframe(value=atlas_views.lens_rows(atlas, layer, expert), headers=atlas_views.LENS_COLUMNS),
           atlas_views.contexts_html(atlas, layer, expert), atlas_views.ablation_figure(atlas, layer),
           atlas_views.pair_figure(atlas, layer),
           gr.Dataframe(value=atlas_views.ranking_rows(atlas), headers=atlas_views.RANKING_COLUMNS),
           atlas_views.specialisation_figure(atlas), atlas_views.share_cost_figure(atlas))
    ms = 1000 * (time.perf_counter() - start)
    return (*out, f"{atlas['caveats']['lens']}\n\nRedrawn from the stored atlas in {ms:.0f} ms (server side).")


def experts_setup(run):
    """The layer and expert pickers sized to the current run (Experts tab, and Routing's shortcut to it)."""
    if not run:
        return gr.Dropdown(choices=[], value=None), gr.Slider(minimum=0, maximum=1, value=0), \
            gr.Dropdown(choices=[], value=None)
    shape = lab.run_shape(run)
    layers = shape["layers"]
    middle = layers[len(layers) // 2]
    return (gr.Dropdown(choices=layers, value=middle),
            gr.Slider(minimum=0, maximum=max(1, shape["num_experts"] - 1), value=0, step=1),
            gr.Dropdown(choices=layers, value=middle))


def open_in_experts(run, layer, expert):
    """Routing -> Experts: open the chosen layer and expert (gr.Plot has no click event in Gradio 6)."""
    if not run:
        raise lab.LabError("load a run first")
    return gr.Tabs(selected="experts"), lab._int(layer, "layer"), lab._int(expert, "expert")


def start_atlas(run, upload, request: gr.Request = None):
    """Queue the atlas of the current run as a background job."""
    job_id = lab_jobs.start_atlas(run, upload, owner=_session(request))
    return f"Queued atlas job `{job_id}`; this tab redraws when it finishes (progress in the bar above)."


# ---------------------------------------------------------------- handlers: chat
@gpu
def chat(message, dense_history, moe_history, **settings):
    """Send one message to both models and stream both replies."""
    message = (message or "").strip()
    if not message:
        raise lab.LabError("type a message first")
    yield from chat_views.stream_both(dense_history or [], moe_history or [], message, settings)


@gpu
def regenerate(dense_history, moe_history, **settings):
    """Answer the last message again with the next seed."""
    dense_history, moe_history = list(dense_history or []), list(moe_history or [])
    i = chat_views.last_user(dense_history)
    if i is None:
        raise lab.LabError("nothing to regenerate: send a message first")
    message = to_messages([dense_history[i]])[0]["content"]
    j = chat_views.last_user(moe_history)
    seed = lab._int(settings["seed"], "seed") + 1  # a new sample (greedy decoding gives the same reply again)
    for outputs in chat_views.stream_both(dense_history[:i], moe_history[:j] if j is not None else [], message,
                           {**settings, "seed": seed}):
        yield *outputs, seed


def clear_chat():
    """Empty both conversations."""
    return [], [], "", "", ""


# ---------------------------------------------------------------- handlers: the guided first path
def guide_routing(run):
    """Step 1: open Routing (the example text is then routed); it needs a run."""
    if not run:
        raise lab.LabError(lab.no_run_note())
    return gr.Tabs(selected="routing")


def guide_chat():
    """Step 2: open Chat with an example question (then sent); the dense side needs no run."""
    return gr.Tabs(selected="chat"), EXAMPLES["chat"][0]


def guide_tradeoffs(run):
    """Step 3: open Trade-offs, where K is moved; it needs a run."""
    if not run:
        raise lab.LabError(lab.no_run_note())
    return gr.Tabs(selected="tradeoffs")


GUIDE = """### Three steps to see what cutting a model's FFNs into experts does
The header shows the **current run**: the embedded SmolLM2-135M with each feed-forward layer cut into experts and
a router per layer trained to pick them. On a fresh server the lab trains a first run by itself (the bar above says
what is training); the chat's dense side works before that."""
GUIDE_STEPS = (
    ("1 · Look at the routing", "Route an example", "guide-route",
     "Which expert does each token go to, at each layer? Every token is coloured by the expert the current run's "
     "router picks first. *Where the numbers come from:* the run's routers on this text, computed now on this "
     "server; beside it, the load entropy of the same experts under an untrained router (1 = even, 0 = collapsed)."),
    ("2 · Chat side by side", "Ask both models", "guide-chat",
     "One question to the dense model (left) and the factorized one (right), same sampling and seed. *Where the "
     "numbers come from:* tokens/s measured now on this machine (both share its cores); active FFN GFLOPs per token "
     "counted from the model's shapes; agreement with dense measured on held-out text when the run was saved."),
    ("3 · Move K, watch accuracy and FLOPs", "Open the trade-off", "guide-k",
     "Move the K slider: fewer experts per token cost fewer FLOPs and keep less of the dense model. *Where the "
     "numbers come from:* held-out agreement and perplexity per K, measured on text never used in training when "
     "the run was saved; GFLOPs per token analytic, from the real shapes; benchmark accuracy once you run "
     "evaluations there (scored as lm-evaluation-harness does)."),
)


ABOUT = (ASSETS / "about.md").read_text()  # the About tab; {diagram} and {headline} are filled in there


# ---------------------------------------------------------------- recipe controls
def recipe_control(f) -> gr.components.Component:
    """The control of one Recipe field, from its metadata: choices -> Radio, numbers -> Number, text -> Textbox
    (the model: a Dropdown that suggests the supported Hub models and takes any id or folder)."""
    shown_as = {"label": f.metadata["label"], "info": f.metadata["help"], "value": INITIAL[f.name],
                "elem_id": f.name.replace("_", "-")}
    if f.name == "model":
        return gr.Dropdown(list(lab.MODEL_CHOICES), allow_custom_value=True, **shown_as)
    if f.metadata["choices"]:
        return gr.Radio(list(f.metadata["choices"]), **shown_as)
    if field_type(f) is str:
        return gr.Textbox(**shown_as)
    return gr.Number(precision=0 if field_type(f) is int else None, **shown_as)


def data_controls(f) -> dict[str, gr.components.Component]:
    """The `data` field as three widgets: a choice of source, a file upload and a Hub dataset id."""
    kind = gr.Radio([(label, value) for value, label in lab.DATA_SOURCES.items()], value=INITIAL["data_kind"],
                    label=f.metadata["label"], elem_id="data-kind")
    upload = gr.File(INITIAL["upload"], label="Upload .txt / .jsonl", file_types=list(lab.UPLOAD_SUFFIXES),
                     type="filepath", height=120, visible=INITIAL["data_kind"] == "upload")
    hub_id = gr.Textbox(INITIAL["hub_id"], label="Hub dataset", placeholder="HuggingFaceFW/fineweb-edu:sample-10BT",
                        visible=INITIAL["data_kind"] == "hub")
    return {"data_kind": kind, "upload": upload, "hub_id": hub_id}


def recipe_controls(fields: list) -> dict[str, gr.components.Component]:
    """Lay out the controls of these Recipe fields in order, consecutive number boxes three to a row;
    returns them by field name (`data` as its lab.DATA_CONTROLS widgets)."""
    controls: dict[str, gr.components.Component] = {}
    for numeric, group in itertools.groupby(fields, key=lambda f: field_type(f) is not str):
        group = list(group)
        if not numeric:
            for f in group:
                controls |= data_controls(f) if f.name == "data" else {f.name: recipe_control(f)}
            continue
        for row in range(0, len(group), 3):
            with gr.Row():
                controls |= {f.name: recipe_control(f) for f in group[row:row + 3]}
    return controls


# ---------------------------------------------------------------- layout
class LabBlocks(gr.Blocks):
    """gr.Blocks whose message for a value Gradio cannot read (a client sent text to a number box, ...) is
    one line naming the input, like every other message of the lab (Gradio's own spans many lines)."""

    @staticmethod
    def _format_processing_error(block_fn, index, block, value, is_input, original_error) -> str:
        if not is_input:  # a value a handler returned: a bug, said so
            return f"Unexpected error: the page could not show a result of {block_fn.name} (a bug in factorlab)."
        what = getattr(block, "label", None) or block.get_block_name()
        return lab.one_line(f"{what}: {value!r} ({type(value).__name__}) is not a value of this "
                            f"{block.get_block_name()}: send what the page's control would send")

    async def preprocess_data(self, *args, **kwargs):
        try:
            return await super().preprocess_data(*args, **kwargs)
        except gr.Error as exc:  # a component's own check (a value not among a Radio's choices, ...)
            exc.message = lab.one_line(exc.message)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a file input that is a bare server path, not an upload
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]
            raise gr.Error(lab.one_line(f"an input could not be read ({type(exc).__name__}: {' '.join(lines)})"),
                           print_exception=False) from exc


# Gradio's copies of uploads (and files it serves) are removed an hour after they were made, and all of them
# when the server restarts; a training job keeps its own copy of an uploaded text (lab.keep_upload).
with LabBlocks(title="factorlab — FactorLLM lab", delete_cache=(900, 3600)) as demo:
    run_state = gr.State(None)  # this page's current run
    poll_state = gr.State({})  # what this page last drew, and the jobs it started
    runs_version = gr.State(0)  # bumped when a job finishes: stored results may have changed
    routing_state = gr.State(None)  # the last routed text, to recolour without running the model
    timer = gr.Timer(POLL_SECONDS)

    with gr.Column(elem_classes="fl-header"):
        gr.Markdown("# factorlab — turn a language model's FFNs into experts\n"
                    "Cut each feed-forward layer into **N experts**, let a router pick **K** per token, train it "
                    "with PAR, and see what it does to routing, accuracy, speed and chat. New here? Read **About**.")
        current_md = gr.Markdown(lab.describe_run(None), elem_id="current-run")
        job_html = gr.HTML(viz.progress_html(None), elem_id="job")
        with gr.Row(visible=False, elem_id="switch-offer") as offer_row:
            offer_md = gr.Markdown()
            switch_btn = gr.Button("Switch to the default recipe", variant="primary", elem_id="switch", scale=0)

    with gr.Tabs(selected="start") as tabs:
        with gr.Tab("Start here", id="start"):
            gr.Markdown(GUIDE)
            guide_buttons = []
            with gr.Row(equal_height=True):
                for title, label, elem_id, text in GUIDE_STEPS:
                    with gr.Column(variant="panel"):
                        gr.Markdown(f"#### {title}\n{text}")
                        guide_buttons.append(gr.Button(label, variant="primary", elem_id=elem_id))
            guide_route_btn, guide_chat_btn, guide_k_btn = guide_buttons
            with gr.Row():
                gr.Markdown("Every setting (model, N, K, split, layers, shared neurons, training text, …) and your own "
                            "training runs: **Factorize & train**.")
                all_settings_btn = gr.Button("All settings", elem_id="all-settings", scale=0)

        with gr.Tab("Factorize & train", id="train"):
            with gr.Row():
                with gr.Column(scale=2):
                    preset_pick = gr.Dropdown([(f"{name}: {text}", name) for name, (text, _) in PRESETS.items()]
                                              + [(f"{lab.CUSTOM}: your own changes to a preset", lab.CUSTOM)],
                                              value=Recipe().preset_name(), label="Preset", elem_id="preset",
                                              info="sets every setting below to a named recipe (the model stays); "
                                                   "change any of them after")
                    hub_md = gr.Markdown()
                    controls = recipe_controls(recipe_fields(everyday=True))
                    with gr.Accordion("Advanced", open=False):
                        controls |= recipe_controls(recipe_fields(everyday=False))
                    factorize_btn = gr.Button("Factorize + exactness check", elem_id="factorize")
                    run_name = gr.Textbox(label="Run name", elem_id="run-name",
                                          placeholder="empty: a name from the settings")
                    with gr.Row():
                        start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                        cancel_btn = gr.Button("Cancel", variant="stop")
                with gr.Column(scale=3):
                    train_md = gr.Markdown("Factorize to check exactness and compute, or start a training job.",
                                           elem_id="train-status")
                    flops_df = gr.Dataframe(label=f"FLOPs per token by K (sequence length {FLOPS_SEQ_LEN})", interactive=False,
                                            headers=["model", "FFN GFLOPs/token", "total GFLOPs/token",
                                                     "FFN vs dense", "total vs dense"])
                    loss_plot = gr.Plot(viz.loss_figure([]), label="Training losses")
                    jobs_df = gr.Dataframe(label="Jobs (this process)", interactive=False, headers=JOB_COLUMNS)
            gr.Markdown("### Runs on disk")
            runs_df = gr.Dataframe(label="Runs", interactive=False, wrap=True, headers=lab.RUN_COLUMNS)
            with gr.Row():
                run_pick = gr.Dropdown([], label="Run", scale=3, allow_custom_value=True)
                load_btn = gr.Button("Load (make current)", variant="primary", scale=1)
                delete_btn = gr.Button("Delete", variant="stop", scale=1)
                refresh_btn = gr.Button("Refresh", scale=1)
            with gr.Row():
                export_fmt = gr.Dropdown(list(EXPORT_FORMATS), value=EXPORT_FORMATS[0], label="Export format", scale=2,
                                         info="a transformers MoE class that loads the run without custom code "
                                              "(qwen2_moe keeps dense layers dense)")
                export_btn = gr.Button("Export the run (background)", scale=1, elem_id="export")
                export_get_btn = gr.Button("Get the export (zip)", scale=1, elem_id="export-get")
            export_file = gr.File(label="Export (zip: config, safetensors, tokenizer, README card)", interactive=False)
            runs_md = gr.Markdown()

        with gr.Tab("Routing", id="routing"):
            with gr.Row():
                with gr.Column(scale=3):
                    route_text = gr.Textbox(EXAMPLES["routing"][0]["text"], lines=4, label="Text to route")
                    example = gr.Dropdown(list(ROUTING_EXAMPLES), label="Examples", value=None)
                with gr.Column(scale=2):
                    route_k = gr.Slider(1, 8, value=2, step=1, label="K (experts per token)")
                    colour = gr.Radio(["top-1 expert", "router probability of one expert"], value="top-1 expert",
                                      label="Colour by")
                    expert = gr.Slider(0, 1, value=0, step=1, label="Expert (for the probability view)",
                                       elem_id="routing-expert")
                    with gr.Row():
                        route_btn = gr.Button("Route", variant="primary", elem_id="route")
                        chat_turn_btn = gr.Button("Use the last chat turn")
            heatmap_plot = gr.Plot(viz.empty_figure("route a text to see its heatmap"), label="Routing heatmap",
                                   elem_id="heatmap")
            route_md = gr.Markdown()
            with gr.Row():
                load_plot = gr.Plot(label="Expert load")
                entropy_plot = gr.Plot(label="PAR vs no PAR")
            with gr.Row():
                route_atlas_layer = gr.Dropdown([], label="Layer", scale=1, elem_id="routing-atlas-layer",
                                                info="with the expert above: open it in the Experts tab")
                open_expert_btn = gr.Button("Open this expert in Experts", scale=1, elem_id="open-expert")

        with gr.Tab("Experts", id="experts"):
            gr.Markdown("What does expert *e* of layer *l* handle, is that specialisation real, and what does the model "
                        "lose without it? Every routing statistic here is paired with a causal one (the loss when the "
                        "expert is removed), all read from the run's stored atlas.")
            with gr.Row():
                atlas_layer_pick = gr.Dropdown([], label="Layer", elem_id="atlas-layer")
                atlas_expert = gr.Slider(0, 1, value=0, step=1, label="Expert", elem_id="atlas-expert")
                atlas_upload = gr.File(label="Add your own text as a domain (.txt / .jsonl, optional)",
                                       file_types=[".txt", ".md", ".jsonl"], type="filepath")
                with gr.Column():
                    atlas_btn = gr.Button("Compute the atlas (background)", variant="primary", elem_id="atlas-start")
                    atlas_cancel_btn = gr.Button("Cancel", variant="stop")
            atlas_status = gr.Markdown()
            atlas_md = gr.Markdown(elem_id="atlas-summary")
            overview_plot = gr.Plot(label="Layer overview", elem_id="atlas-overview")
            with gr.Row():
                expert_md = gr.Markdown(elem_id="expert-summary")
                domain_plot = gr.Plot(label="Domains", elem_id="atlas-domains")
            with gr.Row():
                vocab_df = gr.Dataframe(label="Vocabulary: tokens routed here, by lift over their base rate",
                                        interactive=False, elem_id="atlas-vocab")
                lens_df = gr.Dataframe(label="What it writes (logit lens; see the caveat below)", interactive=False,
                                       elem_id="atlas-lens")
            contexts_view = gr.HTML(label="Contexts", elem_id="atlas-contexts")
            with gr.Row():
                ablation_plot = gr.Plot(label="Ablation: this layer", elem_id="atlas-ablation")
                pair_plot = gr.Plot(label="Co-activation and weight similarity", elem_id="atlas-pair")
            ranking_df = gr.Dataframe(label="Which experts matter: the costliest removals across layers",
                                      interactive=False, elem_id="atlas-ranking")
            with gr.Row():
                spec_plot = gr.Plot(label="PAR router vs untrained router", elem_id="atlas-spec")
                share_plot = gr.Plot(label="Share of tokens vs cost", elem_id="atlas-share")
            experts_timing_md = gr.Markdown(elem_id="atlas-timing")

        with gr.Tab("Trade-offs", id="tradeoffs"):
            with gr.Row():
                trade_k = gr.Slider(1, 8, value=2, step=1, label="K (highlighted)", elem_id="trade-k")
                task = gr.Dropdown([], label="Task", allow_custom_value=True)
                trade_seq = gr.Slider(16, 4096, value=512, step=16, label="Sequence length (FLOPs)")
                trade_axis = gr.Radio([(label, key) for key, label in tradeoff_views.COMPUTE_AXES.items()],
                                      value="flops", label="Compute axis", elem_id="trade-axis")
            with gr.Row():
                trade_plot = gr.Plot(label="Accuracy vs compute", elem_id="trade-plot")
                flops_plot = gr.Plot(label="FLOPs by component")
            trade_df = gr.Dataframe(label="Per K", interactive=False, elem_id="trade-table")
            bench_md = gr.Markdown()
            bench_df = gr.Dataframe(label="Speed", interactive=False)
            timing_md = gr.Markdown()
            with gr.Row():
                with gr.Column():
                    eval_tasks = gr.CheckboxGroup(list(TASK_NAMES), value=["arc_easy"], label="Tasks to evaluate")
                    eval_limit = gr.Number(100, precision=0, label="Items per task (seeded subset; 0 = all)")
                    eval_btn = gr.Button("Run missing evaluations (background)")
                with gr.Column():
                    with gr.Row():
                        bench_prefill = gr.Number(256, precision=0, label="Prefill tokens")
                        bench_decode = gr.Number(32, precision=0, label="Decode tokens")
                        bench_repeats = gr.Number(3, precision=0, label="Repeats")
                    bench_btn = gr.Button("Run benchmark (background)")
                with gr.Column():
                    gr.Markdown("**Chat fidelity**: does the run answer the shipped chat prompts like the dense model? "
                                "(greedy replies; ~1 minute per K on 2 cores)")
                    fidelity_btn = gr.Button("Measure chat fidelity (background)")
            trade_status = gr.Markdown()

        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                with gr.Column():
                    chat_dense = gr.Chatbot(label="Dense (original model)", height=420)
                    stats_dense = gr.HTML()
                with gr.Column():
                    chat_moe = gr.Chatbot(label="Factorized (current run)", height=420, elem_id="chat-moe")
                    stats_moe = gr.HTML(elem_id="stats-moe")
                    tokens_view = gr.HTML()
            message = gr.Textbox(label="Message", elem_id="message", placeholder="Ask something; both models answer")
            gr.Examples(EXAMPLES["chat"], inputs=message, label="Try")
            with gr.Row():
                send_btn = gr.Button("Send", variant="primary")
                regen_btn = gr.Button("Regenerate")
                clear_btn = gr.Button("Clear")
            with gr.Row():
                temperature = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                max_new = gr.Slider(1, 512, value=128, step=1, label="Max new tokens", elem_id="max-new")
                chat_seed = gr.Number(0, precision=0, label="Seed")
            with gr.Row():
                chat_k = gr.Slider(1, 8, value=2, step=1, label="K for the next reply")
                colour_tokens = gr.Checkbox(False, label="Colour the factorized reply by expert")
                colour_layer = gr.Dropdown([], label="…at layer", allow_custom_value=True)

        with gr.Tab("About", id="about"):
            intro, rest = ABOUT.split("{diagram}")
            gr.Markdown(intro)
            gr.HTML(f"<div class='fl-diagram'>{(ASSETS / 'diagram.svg').read_text()}</div>")
            gr.Markdown(rest.replace("{headline}", headline_markdown()), elem_id="about-rest")

    # every setting of the recipe by the name lab.recipe_from_controls reads: the Recipe's fields, `data` as
    # its three widgets. Events pass them as keyword arguments (inputs_kwargs): no order anywhere.
    SETTINGS = controls
    RECIPE_CONTROLS = {name: c for name, c in SETTINGS.items() if name not in lab.DATA_CONTROLS}
    DATA_CONTROLS = {name: SETTINGS[name] for name in lab.DATA_CONTROLS}

    # ---------------------------------------------------------------- wiring
    run_outputs = [current_md, route_k, expert, trade_k, colour_layer, chat_k, task, loss_plot]
    trade_inputs = [run_state, task, trade_k, trade_seq, trade_axis]
    trade_outputs = [trade_plot, trade_df, flops_plot, bench_md, bench_df, timing_md]
    chat_settings = {"run": run_state, "temperature": temperature, "top_p": top_p, "max_new": max_new,
                     "seed": chat_seed, "k": chat_k, "colour": colour_tokens, "layer": colour_layer}
    chat_outputs = [message, chat_dense, chat_moe, stats_dense, stats_moe, tokens_view]

    DATA_CONTROLS["data_kind"].change(lambda kind: (gr.File(visible=kind == "upload"), gr.Textbox(visible=kind == "hub")),
                                      DATA_CONTROLS["data_kind"], [DATA_CONTROLS["upload"], DATA_CONTROLS["hub_id"]],
                                      api_name="data_source_toggle")
    demo.load(shown(page_load), run_state, [run_state, hub_md, runs_df, run_pick], api_name="page_load").then(
        shown(current_summary), run_state, current_md, api_name="page_load_summary")
    for trigger, name in ((run_state.change, "switch_offer_run"), (runs_version.change, "switch_offer")):
        trigger(shown(switch_offer), run_state, [offer_row, offer_md], api_name=name, show_progress="hidden")
    switch_btn.click(shown(switch_run), run_state, run_state, api_name="switch_run")
    run_state.change(shown(run_changed), run_state, run_outputs, api_name="run_changed").then(
        shown(tradeoffs), trade_inputs, trade_outputs, api_name="run_changed_tradeoffs")
    runs_version.change(shown(tradeoff_choices), run_state, task, api_name="results_changed").then(
        shown(tradeoffs), trade_inputs, trade_outputs, api_name="results_changed_tradeoffs")
    timer.tick(shown(poll_jobs), [poll_state, run_state, runs_version],
               [poll_state, run_state, job_html, loss_plot, jobs_df, runs_df, run_pick, runs_version],
               api_name="job_poll", show_progress="hidden", concurrency_limit=None)

    preset_pick.input(shown(apply_preset), [preset_pick, RECIPE_CONTROLS["model"]], list(SETTINGS.values()),
                      api_name="recipe_preset")
    gr.on([c.input for c in SETTINGS.values() if hasattr(c, "input")] + [DATA_CONTROLS["upload"].change],
          shown(preset_label), None, preset_pick, inputs_kwargs=SETTINGS, api_name="recipe_label",
          show_progress="hidden", queue=False)
    factorize_btn.click(shown(gpu(factorize)), None, [train_md, flops_df], inputs_kwargs=SETTINGS, api_name="factorize")
    start_btn.click(shown(start_training), [poll_state, run_name], [poll_state, job_html, train_md],
                    inputs_kwargs=SETTINGS, api_name="train_start", concurrency_limit=None)
    cancel_btn.click(shown(cancel_job), None, train_md, api_name="job_cancel", concurrency_limit=None)
    load_btn.click(shown(load_run), run_pick, [run_state, runs_md], api_name="run_load")
    delete_btn.click(shown(delete_run), [run_pick, run_state], [runs_df, run_pick, run_state, runs_md],
                     api_name="run_delete")
    refresh_btn.click(shown(refresh_runs), None, [runs_df, run_pick], api_name="runs_refresh")
    export_btn.click(shown(start_export), [run_pick, export_fmt], runs_md, api_name="export_start")
    export_get_btn.click(shown(get_export), run_pick, [export_file, runs_md], api_name="export_download")

    example.change(lambda label: ROUTING_EXAMPLES.get(label, gr.skip()), example, route_text,
                   api_name="routing_example")
    route_btn.click(shown(route), [run_state, route_text, route_k, colour, expert],
                    [routing_state, heatmap_plot, load_plot, entropy_plot, route_md], api_name="routing",
                    concurrency_limit=CHAT_CONCURRENCY)
    for trigger, name in ((colour.change, "routing_colour"), (expert.release, "routing_expert")):
        trigger(shown(heatmap), [routing_state, colour, expert], heatmap_plot, api_name=name)
    chat_turn_btn.click(shown(last_turn), [chat_moe, chat_dense], route_text, api_name="routing_last_turn").success(
        shown(route), [run_state, route_text, route_k, colour, expert],
        [routing_state, heatmap_plot, load_plot, entropy_plot, route_md], api_name="routing_last_turn_route")

    # redraws only read stored JSON: served outside the queue, so a busy queue never delays a slider
    trade_k.release(shown(tradeoffs), trade_inputs, trade_outputs, api_name="tradeoffs_k", queue=False)
    trade_seq.release(shown(tradeoffs), trade_inputs, trade_outputs, api_name="tradeoffs_seq", queue=False)
    task.input(shown(tradeoffs), trade_inputs, trade_outputs, api_name="tradeoffs_task", queue=False)
    trade_axis.input(shown(tradeoffs), trade_inputs, trade_outputs, api_name="tradeoffs_axis", queue=False)
    eval_btn.click(shown(start_eval), [run_state, eval_tasks, eval_limit], trade_status, api_name="eval_start")
    bench_btn.click(shown(start_bench), [run_state, bench_prefill, bench_decode, bench_repeats], trade_status,
                    api_name="bench_start")
    fidelity_btn.click(shown(start_fidelity), [run_state], trade_status, api_name="fidelity_start")

    experts_inputs = [run_state, atlas_layer_pick, atlas_expert]
    experts_outputs = [atlas_md, overview_plot, expert_md, domain_plot, vocab_df, lens_df, contexts_view,
                       ablation_plot, pair_plot, ranking_df, spec_plot, share_plot, experts_timing_md]
    run_state.change(shown(experts_setup), run_state, [atlas_layer_pick, atlas_expert, route_atlas_layer],
                     api_name="experts_setup").then(shown(experts_view), experts_inputs, experts_outputs,
                                                    api_name="experts_run_changed")
    runs_version.change(shown(experts_view), experts_inputs, experts_outputs, api_name="experts_results_changed",
                        queue=False)
    atlas_layer_pick.input(shown(experts_view), experts_inputs, experts_outputs, api_name="experts_layer", queue=False)
    atlas_expert.release(shown(experts_view), experts_inputs, experts_outputs, api_name="experts_expert", queue=False)
    atlas_btn.click(shown(start_atlas), [run_state, atlas_upload], atlas_status, api_name="atlas_start")
    atlas_cancel_btn.click(shown(cancel_job), None, atlas_status, api_name="atlas_cancel", concurrency_limit=None)
    open_expert_btn.click(shown(open_in_experts), [run_state, route_atlas_layer, expert],
                          [tabs, atlas_layer_pick, atlas_expert], api_name="routing_open_expert").success(
        shown(experts_view), experts_inputs, experts_outputs, api_name="routing_open_expert_view")

    guide_route_btn.click(shown(guide_routing), run_state, tabs, api_name="guide_routing").success(
        shown(route), [run_state, route_text, route_k, colour, expert],
        [routing_state, heatmap_plot, load_plot, entropy_plot, route_md], api_name="guide_routing_route",
        concurrency_limit=CHAT_CONCURRENCY)
    guide_chat_btn.click(guide_chat, None, [tabs, message], api_name="guide_chat").then(
        shown(chat), [message, chat_dense, chat_moe], chat_outputs, inputs_kwargs=chat_settings,
        api_name="guide_chat_send", concurrency_limit=CHAT_CONCURRENCY, concurrency_id="chat")
    guide_k_btn.click(shown(guide_tradeoffs), run_state, tabs, api_name="guide_tradeoffs")
    all_settings_btn.click(lambda: gr.Tabs(selected="train"), None, tabs, api_name="guide_all_settings")

    for trigger, name in ((message.submit, "chat"), (send_btn.click, "chat_send")):
        trigger(shown(chat), [message, chat_dense, chat_moe], chat_outputs, inputs_kwargs=chat_settings, api_name=name,
                concurrency_limit=CHAT_CONCURRENCY, concurrency_id="chat")
    regen_btn.click(shown(regenerate), [chat_dense, chat_moe], [*chat_outputs, chat_seed], inputs_kwargs=chat_settings,
                    api_name="chat_regenerate", concurrency_limit=CHAT_CONCURRENCY, concurrency_id="chat")
    clear_btn.click(clear_chat, None, [chat_dense, chat_moe, stats_dense, stats_moe, tokens_view],
                    api_name="chat_clear")


def launch(**kwargs):
    """Serve the lab (theme and CSS go to launch() in Gradio 6); kwargs override the defaults. First remove
    what crashed saves left in the runs folder, then start the warm start (factorlab.warmstart)."""
    lab.limits()  # a malformed quota variable stops the start, naming the variable
    warm_start()  # so does a malformed FACTORLAB_WARM_START
    removed = clean_leftovers()
    if removed:
        logging.getLogger(__name__).info("removed leftovers of interrupted saves: %s", ", ".join(removed))
    warmstart.start()  # no usable run: train a first one in the background (FACTORLAB_WARM_START)
    options = {"server_name": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
               "server_port": int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
               "theme": THEME, "css": CSS, "max_file_size": "50mb",
               # a value of the wrong type fails in Gradio's own checks, before any handler: show their message
               # (handlers' own errors are already one line, see shown())
               "show_error": True, **kwargs}
    return demo.queue(default_concurrency_limit=2).launch(**options)


def _warm() -> None:
    """Load the default model in the background, so the first click does not wait for it."""
    try:
        lab.dense_info("default")
    except Exception as exc:  # noqa: BLE001 - the page reports it when the user asks for the model
        logging.getLogger(__name__).warning("could not preload the default model: %s", exc)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threading.Thread(target=_warm, daemon=True).start()
    launch()
