"""Fault injection for the run store: kill -9 in the middle of a save, a training, a metrics or log write and
a delete; a full disk; races between jobs, starts and deletes.

After each fault and a "restart" (runs.clean_leftovers, as the app calls it at launch) the store must hold
every earlier run, listed ok and unchanged to the byte (its factorized model gives the same logits), no
half-written run (no new entry, no corrupt entry) and no hidden temporaries, in the runs folder or in a run.
The kill -9 cases run the writer in a child process that stops itself at the chosen point and waits there.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from factorlab import runs
from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from factorlab.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = dict(split="random", layers="0-1", shared_size=0, data="local", train_tokens=512, heldout_tokens=256,
                   seq_len=128, router_steps=50, per_token_router_steps=2)
TINY, TINY_B, TRAINED = "tiny-a", "tiny-b", "trained"  # earlier runs: two of a tiny random Llama, one trained on
# the embedded model (only the tests marked slow, which use that model anyway, check the last one)
EMBEDDED_TEXT = "The history of science is full of surprises. def add(a, b): return a + b"


# ---------------------------------------------------------------- the earlier runs, made once per module
@dataclass
class Baseline:
    root: Path
    files: dict[str, dict[str, str]]  # run -> {file: sha256}
    logits: dict[str, torch.Tensor]
    ids: dict[str, torch.Tensor]
    dense: dict  # run -> callable giving the dense model its factorized model is rebuilt on

    @property
    def names(self) -> set[str]:
        return set(self.files)


def _tiny_config(part) -> dict:
    r = Recipe(model="tiny", num_experts=part.num_experts, top_k=2, split=part.strategy, layers="all",
               shared_size=part.shared_size, output_mode="gated", seed=part.seed, per_token_rounds=0)
    return {"recipe": r.to_dict(), "layers": part.layers, "expert_size": part.expert_size,
            "intermediate_size": part.intermediate_size}


def _logits(moe, ids) -> torch.Tensor:
    with torch.no_grad():
        return moe(ids).logits


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _save_tiny_run(root: Path, name: str, split: str, seed: int, tuned: bool) -> None:
    model = tiny_llama()
    part = make_partition(model, 4, split, seed=seed)
    moe = build_moe(model, part, top_k=2, output_mode="gated")
    with torch.no_grad():
        for mlp in factorized_layers(moe).values():
            mlp.router.linear.weight.normal_()
            if tuned:
                mlp.down.mul_(1.5)  # a "tuned" expert, stored in the run
    runs.save_run(name, _tiny_config(part), runs.moe_tensors(moe, part, tuned=tuned), {"note": name}, root=root)
    runs.write_log(name, [{"step": 1, "losses": {"route": 0.5}}], root=root)


def _baseline(root: Path, dense: dict, ids: dict) -> Baseline:
    assert not list(root.rglob(".*"))
    logits = {name: _logits(runs.load_moe(runs.load_run(name, root), dense[name]()), ids[name]) for name in dense}
    return Baseline(root, {name: _hashes(root / name) for name in dense}, logits, ids, dense)


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory) -> Baseline:
    """Two runs of a tiny random Llama (milliseconds)."""
    root = tmp_path_factory.mktemp("faults-tiny") / "runs"
    _save_tiny_run(root, TINY, "random", seed=1, tuned=True)
    _save_tiny_run(root, TINY_B, "contiguous", seed=2, tuned=False)
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    return _baseline(root, {TINY: tiny_llama, TINY_B: tiny_llama}, {TINY: ids, TINY_B: ids})


@pytest.fixture(scope="module")
def full_baseline(tmp_path_factory, tiny_baseline, embedded) -> Baseline:
    """The tiny runs and a run trained on the embedded model with a tiny recipe (seconds)."""
    from factorlab import workflows

    root = tmp_path_factory.mktemp("faults-full") / "runs"
    shutil.copytree(tiny_baseline.root, root)
    workflows.train_run(Recipe(**TINY_RECIPE), TRAINED, runs_dir=root, loaded=embedded)
    ids = {**tiny_baseline.ids, TRAINED: embedded.tokenizer(EMBEDDED_TEXT, return_tensors="pt").input_ids}
    return _baseline(root, {**tiny_baseline.dense, TRAINED: lambda: embedded.model}, ids)


@pytest.fixture
def base(request) -> Baseline:
    """The earlier runs a test checks: the tiny ones, and in the tests marked slow (which load the embedded model
    anyway) the trained one too."""
    slow = request.node.get_closest_marker("slow") is not None
    return request.getfixturevalue("full_baseline" if slow else "tiny_baseline")


@pytest.fixture
def store(base, runs_dir) -> Path:
    """A private copy of the earlier runs in this test's runs folder (FACTORLAB_RUNS)."""
    shutil.copytree(base.root, runs_dir)
    return runs_dir


def hidden(root: Path) -> list[str]:
    """Hidden entries (temporaries) in the runs folder or anywhere inside a run."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def check_store(root: Path, base: Baseline, names: set[str] | None = None) -> None:
    """Exactly `names` (default: every earlier run) are listed, all readable, unchanged to the byte, with the
    same logits as before; no hidden temporary is left anywhere."""
    names = base.names if names is None else names
    listed = runs.list_runs(root)
    assert sorted(r.name for r in listed) == sorted(names), "a half-written run is listed or an earlier one is lost"
    assert all(r.ok for r in listed), [(r.name, r.error) for r in listed if not r.ok]
    assert sorted(p.name for p in root.iterdir()) == sorted(names)
    assert hidden(root) == []
    for name in names:
        assert _hashes(root / name) == base.files[name], f"run {name!r} changed"
        run = runs.load_run(name, root)
        moe = runs.load_moe(run, base.dense[name]())
        diff = (_logits(moe, base.ids[name]) - base.logits[name]).abs().max().item()
        assert diff <= 1e-6, f"run {name!r} gives other logits than before the fault ({diff})"


# ---------------------------------------------------------------- a writer in a child process, killed with -9
PRELUDE = """
import os, sys, time
from pathlib import Path

MARKER = Path(os.environ["FAULT_MARKER"])


def signal_parent(info=""):
    part = MARKER.with_name(MARKER.name + ".part")
    part.write_text(info)
    os.rename(part, MARKER)  # os.replace may be the patched one


def hang(info=""):
    signal_parent(info)
    time.sleep(120)
    os._exit(3)  # never reached: the parent kills this process
"""


class Child:
    def __init__(self, proc: subprocess.Popen, marker: Path, log: Path):
        self.proc, self.marker, self.log = proc, marker, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_marker(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the child exited ({self.proc.returncode}) before its fault point:\n"
                            f"{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child did not reach its fault point in {timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        return self.marker.read_text()

    def kill9(self) -> None:
        assert self.proc.poll() is None, "the child finished before it could be killed"
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL


@contextmanager
def child(script: str, root: Path, tmp_path: Path, **values):
    """Run `script` (after PRELUDE; `values` as globals) in a fresh Python with FACTORLAB_RUNS=root."""
    marker, log = tmp_path / "fault-point", tmp_path / "child.log"
    code = PRELUDE + "".join(f"{k} = {v!r}\n" for k, v in values.items()) + textwrap.dedent(script)
    env = {**os.environ, "FACTORLAB_RUNS": str(root), "FAULT_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Child(proc, marker, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def temps_of(folder: Path, pid: int, prefix: str) -> list[Path]:
    """The hidden temporaries of writer `pid` in `folder` whose name starts with `prefix` (e.g. '.tiny-a')."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(?:tmp|old|deleted){pid}(?:\.|$)")
    return sorted(p for p in folder.iterdir() if pattern.match(p.name))


# ---------------------------------------------------------------- 1. kill -9 during a save
SAVE_SCRIPT = """
import torch
import factorlab.runs as runs

real_save_file = runs.save_file


def stuck_save_file(tensors, filename, *args, **kwargs):
    real_save_file(tensors, filename, *args, **kwargs)  # the tensors are written (to a temporary) ...
    hang(filename)  # ... and the process dies before the file is renamed into place


runs.save_file = stuck_save_file
earlier = runs.load_run(SOURCE)
tensors = {k: v * 2 if k.startswith("router.") else v for k, v in earlier.tensors().items()}
runs.save_run(NAME, dict(earlier.config, created=None), tensors, {"version": 2}, overwrite=OVERWRITE)
print("SAVED")
"""


@pytest.mark.slow
@pytest.mark.parametrize("name, overwrite", [("victim", False), (TINY, True)], ids=["new-run", "overwrite"])
def test_kill9_during_save_leaves_no_half_written_run(store, base, tmp_path, name, overwrite):
    with child(SAVE_SCRIPT, store, tmp_path, SOURCE=TINY, NAME=name, OVERWRITE=overwrite) as writer:
        tensors_tmp = Path(writer.wait_for_marker(timeout=60))
        [temp] = temps_of(store, writer.pid, f".{name}")  # the run being built, in a hidden folder
        assert temp.is_dir() and (temp / runs.CONFIG).is_file()
        assert tensors_tmp.parent == temp and tensors_tmp.stat().st_size > 0
        assert not (temp / runs.TENSORS).exists()
        # the app starting meanwhile must not touch a live writer's temporaries, nor list its run
        assert runs.clean_leftovers(store) == [] and temp.is_dir() and tensors_tmp.exists()
        assert sorted(r.name for r in runs.list_runs(store)) == sorted(base.names)
        writer.kill9()
    assert temp.is_dir(), "the temporary folder exists until a restart cleans it"
    assert [r.name for r in runs.list_runs(store) if not r.ok] == []
    removed = runs.clean_leftovers(store)
    assert removed == [temp.name]
    check_store(store, base)


OVERWRITE_SCRIPT = """
import os
import factorlab.runs as runs

real_replace = os.replace


def replace(src, dst):
    if Path(dst).name == NAME and Path(src).name.startswith("." + NAME + ".tmp"):
        hang(str(src))  # the old run was moved aside; the new one is not in place yet
    return real_replace(src, dst)


os.replace = replace
earlier = runs.load_run(NAME)
runs.save_run(NAME, dict(earlier.config, created=None), earlier.tensors(), {"version": 2}, overwrite=True)
print("SAVED")
"""


@pytest.mark.slow
def test_kill9_between_the_renames_of_an_overwrite_keeps_the_run(store, base, tmp_path):
    with child(OVERWRITE_SCRIPT, store, tmp_path, NAME=TINY) as writer:
        writer.wait_for_marker(timeout=60)
        writer.kill9()
    runs.clean_leftovers(store)
    listed = {r.name: r for r in runs.list_runs(store)}
    assert TINY in listed and listed[TINY].ok, "the run that was being overwritten is gone"
    assert hidden(store) == []
    assert listed[TINY].metrics in ({"note": TINY}, {"version": 2})  # the old version, or the new one whole
    moe = runs.load_moe(runs.load_run(TINY, store), tiny_llama())
    assert (_logits(moe, base.ids[TINY]) - base.logits[TINY]).abs().max().item() <= 1e-6


def test_clean_leftovers_spares_live_writers_and_removes_dead_ones(store, base):
    """The pid in a temporary's name decides: this process's (alive) are kept, a finished process's are
    removed, and one older than LEFTOVER_MAX_AGE_S goes even if its pid is alive (a reused pid)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(done.stdout)
    mine = os.getpid()
    live_folder = store / f".new-run.tmp{mine}.abc123"
    live_file = store / TINY / f".metrics.json.tmp{mine}.xyz.tmp"
    dead_folder = store / f".other.tmp{dead}.abc123"
    dead_file = store / TINY_B / f".train_log.jsonl.tmp{dead}.xyz.tmp"
    dead_old = store / f".{TINY}.old{dead}"
    dead_trash = store / f".gone.deleted{dead}"
    stale = store / f".ancient.tmp{mine}.q1w2e3"
    for folder in (live_folder, dead_folder, dead_old, dead_trash, stale):
        folder.mkdir()
        (folder / runs.CONFIG).write_text("{}")
    live_file.write_text("{}")
    dead_file.write_text("{}")
    old = time.time() - runs.LEFTOVER_MAX_AGE_S - 60
    os.utime(stale, (old, old))

    removed = runs.clean_leftovers(store)
    assert sorted(removed) == sorted(str(p.relative_to(store)) for p in
                                     (dead_folder, dead_file, dead_old, dead_trash, stale))
    assert live_folder.is_dir() and live_file.is_file()
    assert runs.clean_leftovers(store) == []  # nothing else to do
    shutil.rmtree(live_folder)
    live_file.unlink()
    check_store(store, base)


# ---------------------------------------------------------------- 2. kill -9 during a training
TRAIN_SCRIPT = """
from factorlab import workflows
from factorlab.models import load_model
from factorlab.recipe import Recipe

loaded = load_model("default")


def progress(rec):
    if "step" in rec and not MARKER.exists():
        signal_parent(repr(rec))  # training has started: the parent kills this process now


workflows.train_run(Recipe(**RECIPE), NAME, loaded=loaded, progress=progress)
print("TRAINED")
"""


@pytest.mark.slow
def test_kill9_during_training_writes_nothing(store, base, tmp_path):
    with child(TRAIN_SCRIPT, store, tmp_path, RECIPE=TINY_RECIPE, NAME="killed") as trainer:
        trainer.wait_for_marker(timeout=120)
        trainer.kill9()
    assert "TRAINED" not in trainer.log.read_text()
    assert not (store / "killed").exists() and hidden(store) == []  # nothing was written before the save
    assert runs.clean_leftovers(store) == []
    check_store(store, base)
    with pytest.raises(runs.RunError, match="no run"):
        runs.load_run("killed", store)


# ---------------------------------------------------------------- 3. kill -9 during a metrics or log write
WRITE_SCRIPT = """
import os
import factorlab.runs as runs

real_replace = os.replace


def replace(src, dst):
    if Path(dst).name == FILE:
        hang(str(src))  # the new content is whole in the temporary; it is never renamed into place
    return real_replace(src, dst)


os.replace = replace
if FILE == runs.METRICS:
    runs.update_metrics(NAME, NEW)
else:
    runs.write_log(NAME, NEW)
print("WRITTEN")
"""


@pytest.mark.slow
@pytest.mark.parametrize("file, new", [
    (runs.METRICS, {"eval": {"tasks": {}, "summary": {}}, "note": "overwritten"}),
    (runs.LOG, [{"step": 99, "losses": {"route": 9.0}}]),
], ids=["metrics", "train-log"])
def test_kill9_during_a_metrics_or_log_write_keeps_the_old_file(store, base, tmp_path, file, new):
    before = (store / TINY / file).read_bytes()
    with child(WRITE_SCRIPT, store, tmp_path, FILE=file, NAME=TINY, NEW=new) as writer:
        temp = Path(writer.wait_for_marker(timeout=60))
        assert re.fullmatch(rf"\.{re.escape(file)}\.tmp{writer.pid}\..+\.tmp", temp.name), temp.name
        assert temp.parent == store / TINY and temps_of(store / TINY, writer.pid, f".{file}") == [temp]
        if file == runs.METRICS:
            assert json.loads(temp.read_text()) == {"note": TINY, **new}  # written whole, not yet in place
        assert runs.clean_leftovers(store) == [] and temp.exists()  # a live writer's temporary is kept
        writer.kill9()
    assert (store / TINY / file).read_bytes() == before
    assert temp.exists(), "the temporary is there until a restart cleans it"
    assert [r.name for r in runs.list_runs(store) if not r.ok] == []
    assert runs.clean_leftovers(store) == [f"{TINY}/{temp.name}"]
    check_store(store, base)


DELETE_SCRIPT = """
import factorlab.runs as runs

real_rmtree = runs.shutil.rmtree


def rmtree(path, *args, **kwargs):
    if Path(path).name.startswith("." + NAME + ".deleted"):
        for p in sorted(Path(path).iterdir())[:1]:
            p.unlink()  # part of the run is removed ...
        hang(str(path))  # ... and the process dies in the middle of removing the rest
    return real_rmtree(path, *args, **kwargs)


runs.shutil.rmtree = rmtree
runs.delete_run(NAME)
print("DELETED")
"""


@pytest.mark.slow
def test_kill9_during_a_delete_removes_the_run_whole(store, base, tmp_path):
    with child(DELETE_SCRIPT, store, tmp_path, NAME=TINY) as deleter:
        trash = Path(deleter.wait_for_marker(timeout=60))
        deleter.kill9()
    assert trash.is_dir() and trash.parent == store
    assert sorted(r.name for r in runs.list_runs(store)) == sorted(base.names - {TINY})  # gone from listings at once
    assert runs.clean_leftovers(store) == [trash.name]
    check_store(store, base, names=base.names - {TINY})


# ---------------------------------------------------------------- 4. a full disk
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_then_full(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\0" * 1000)  # the disk fills up half-way through the file
    _disk_full()


@pytest.mark.parametrize("fault", [_disk_full, _half_then_full], ids=["at-once", "half-way"])
def test_full_disk_on_save_leaves_nothing_behind(store, base, monkeypatch, fault):
    earlier = runs.load_run(TINY, store)
    monkeypatch.setattr(runs, "save_file", fault)
    for name, overwrite in (("new-run", False), (TINY, True)):
        with pytest.raises(OSError) as caught:
            runs.save_run(name, dict(earlier.config, created=None), earlier.tensors(), {"v": 2}, root=store,
                          overwrite=overwrite)
        assert caught.value.errno == errno.ENOSPC
        assert hidden(store) == []  # cleaned up by the failing writer itself, no restart needed
    check_store(store, base)


def test_full_disk_on_a_metrics_or_log_write_keeps_the_old_files(store, base, monkeypatch):
    real_write_text = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        _disk_full()

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            runs.update_metrics(TINY, {"eval": {"tasks": {}, "summary": {}}}, store)
        with pytest.raises(OSError, match="No space left"):
            runs.write_log(TINY, [{"step": 2}], store)
    check_store(store, base)


def test_full_disk_through_the_lab_names_the_runs_folder(store, base, monkeypatch):
    from factorlab import lab, lab_jobs

    earlier = runs.load_run(TINY, store)
    monkeypatch.setattr(runs, "save_file", _disk_full)
    with pytest.raises(lab.LabError) as caught:
        with lab_jobs._storing():
            runs.save_run("new-run", dict(earlier.config, created=None), earlier.tensors())
    message = str(caught.value)
    assert "No space left" in message and str(store.resolve()) in message
    assert "No space left" in lab.user_message(caught.value)  # what the page shows
    check_store(store, base)


@pytest.mark.slow
def test_full_disk_fails_a_training_job_with_the_message(store, base, monkeypatch):
    """A training job of the page whose save hits a full disk fails with the lab's message, saving nothing."""
    from factorlab import lab_jobs
    from factorlab.jobs import get_manager

    monkeypatch.setattr(runs, "save_file", _disk_full)
    recipe = Recipe(**{**TINY_RECIPE, "layers": "1", "router_steps": 5, "per_token_rounds": 0, "heldout_tokens": 0})
    job_id = lab_jobs.start_training(recipe, name="full-disk")
    job = get_manager().wait(job_id, timeout=120)
    assert job.state == "failed", (job.state, job.error)
    assert "No space left" in job.error and str(store.resolve()) in job.error
    check_store(store, base)


# ---------------------------------------------------------------- 5. races
@pytest.fixture
def blocking_job():
    """A job function that runs until `release` is set (or it is cancelled); every job it ran is waited for."""
    from factorlab.jobs import get_manager

    release, ids = threading.Event(), []

    def fn(ctx):
        while not release.wait(0.02):
            ctx.check_cancel()
        return {}

    yield SimpleNamespace(fn=fn, release=release, ids=ids)
    release.set()
    for job_id in ids:
        assert get_manager().wait(job_id, timeout=30).is_finished


@pytest.mark.slow  # the start checks the recipe on the embedded model
def test_two_starts_of_the_same_name_queue_one_job(store, base, monkeypatch, embedded, blocking_job):
    from factorlab import lab, lab_jobs
    from factorlab.jobs import get_manager

    monkeypatch.setattr(lab_jobs, "_train_job", blocking_job.fn)
    real_keep = lab.keep_upload

    def slow_keep_upload(recipe):  # widens the window between the name check and the queueing
        time.sleep(0.3)
        return real_keep(recipe)

    monkeypatch.setattr(lab, "keep_upload", slow_keep_upload)
    recipe, barrier, outcomes = Recipe(**TINY_RECIPE), threading.Barrier(2), []

    def start():
        barrier.wait()
        try:
            outcomes.append(("queued", lab_jobs.start_training(recipe, name="same")))
        except lab.LabError as exc:
            outcomes.append(("refused", str(exc)))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    blocking_job.ids.extend(v for kind, v in outcomes if kind == "queued")
    assert sorted(kind for kind, _ in outcomes) == ["queued", "refused"], outcomes
    assert "already" in next(v for kind, v in outcomes if kind == "refused")
    [job_id] = blocking_job.ids
    assert get_manager().get(job_id).params["run"] == "same"
    assert get_manager().cancel(job_id)
    assert get_manager().wait(job_id, timeout=30).state == "cancelled"
    check_store(store, base)  # the write check left nothing; no run "same"


def test_a_metrics_update_after_a_delete_does_not_recreate_the_run(store, base):
    runs.delete_run(TINY, store)
    with pytest.raises(runs.RunError, match="no longer exists"):
        runs.update_metrics(TINY, {"eval": {"tasks": {}, "summary": {}}}, store)
    assert not (store / TINY).exists()
    check_store(store, base, names=base.names - {TINY})


def test_a_log_write_after_a_delete_does_not_recreate_the_run(store, base):
    runs.delete_run(TINY, store)
    try:
        runs.write_log(TINY, [{"step": 1}], store)
    except (runs.RunError, OSError):
        pass
    assert not (store / TINY).exists()
    check_store(store, base, names=base.names - {TINY})


def test_a_delete_during_a_metrics_update_does_not_recreate_the_run(store, base, monkeypatch):
    checked, go_on = threading.Event(), threading.Event()
    real_json = runs.json

    def loads(text, *args, **kwargs):  # update_metrics reads the current metrics after its existence check
        if threading.current_thread().name == "updater" and not checked.is_set():
            checked.set()
            go_on.wait(10)
        return real_json.loads(text, *args, **kwargs)

    monkeypatch.setattr(runs, "json", SimpleNamespace(loads=loads, dumps=real_json.dumps,
                                                      JSONDecodeError=real_json.JSONDecodeError))
    errors = []

    def update():
        try:
            runs.update_metrics(TINY, {"eval": {"tasks": {}, "summary": {}}}, store)
        except (runs.RunError, OSError) as exc:
            errors.append(exc)

    updater = threading.Thread(target=update, name="updater")
    updater.start()
    assert checked.wait(10)
    runs.delete_run(TINY, store)  # the run is deleted while the update is under way
    go_on.set()
    updater.join(10)
    monkeypatch.undo()
    assert not (store / TINY).exists(), f"the deleted run's folder was recreated: {os.listdir(store / TINY)}"
    check_store(store, base, names=base.names - {TINY})


def test_the_lab_refuses_to_delete_a_run_a_job_uses(store, base, blocking_job):
    from factorlab import lab
    from factorlab.jobs import get_manager

    manager = get_manager()
    running = manager.submit("eval", TINY, blocking_job.fn, {"run": TINY})
    queued = manager.submit("bench", TINY_B, blocking_job.fn, {"run": TINY_B})
    blocking_job.ids.extend([running, queued])
    with pytest.raises(lab.LabError, match=f"run '{TINY}' is in use by a eval job"):
        lab.delete(TINY)
    with pytest.raises(lab.LabError, match=f"run '{TINY_B}' is in use by a bench job"):
        lab.delete(TINY_B)  # a queued job counts as much as a running one
    check_store(store, base)
    blocking_job.release.set()
    for job_id in (running, queued):
        assert manager.wait(job_id, timeout=30).state == "done"
    lab.delete(TINY)
    check_store(store, base, names=base.names - {TINY})


def test_a_run_deleted_while_a_job_is_being_started_gets_no_job(store, base, monkeypatch, blocking_job):
    """start_bench checks the run, then (after the write check) queues its job: a delete in between wins, and
    the start is refused under the lock instead of queueing a job for a run that is gone."""
    from factorlab import lab, lab_jobs
    from factorlab.jobs import get_manager

    monkeypatch.setattr(lab_jobs, "_bench_job", blocking_job.fn)
    real_check, in_check, deleted = lab.check_writable, threading.Event(), threading.Event()

    def slow_check():
        in_check.set()
        deleted.wait(10)
        real_check()

    monkeypatch.setattr(lab, "check_writable", slow_check)
    before = {j.id for j in get_manager().jobs()}
    outcome = []

    def start():
        try:
            outcome.append(lab_jobs.start_bench(TINY, 8, 0, 1))
        except (lab.LabError, runs.RunError) as exc:
            outcome.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    assert in_check.wait(10)
    lab.delete(TINY)  # no job yet: the delete goes through
    deleted.set()
    starter.join(10)
    blocking_job.ids.extend(j.id for j in get_manager().jobs() if j.id not in before)
    [result] = outcome
    assert isinstance(result, runs.RunError) and "no run" in str(result), result
    assert blocking_job.ids == []  # no job was queued for the deleted run
    check_store(store, base, names=base.names - {TINY})
