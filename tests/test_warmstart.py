"""The warm start (issue 29): a lab that starts with no run trains the quick preset, then the default recipe,
in the background; pages adopt the first run and are offered the second. No model trains here: the job
function is a stand-in that saves a run with a stand-in partition, gated by the test."""
import re
import threading
from pathlib import Path

import pytest
import torch

from factorlab import lab, lab_jobs, runs, warmstart
from factorlab.jobs import JobManager
from factorlab.limits import WARM_START_MODES, WARM_START_VAR, warm_start
from factorlab.recipe import preset
from factorlab.runs import save_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def manager(monkeypatch):
    """A private job manager in place of the process-wide one."""
    m = JobManager()
    monkeypatch.setattr(lab, "get_manager", lambda: m)
    monkeypatch.setattr(lab_jobs, "get_manager", lambda: m)
    monkeypatch.setattr(warmstart, "get_manager", lambda: m)
    return m


def save_fake_run(name: str, recipe_dict: dict, perplexity: float) -> None:
    """A run as a training job saves it, with a stand-in partition (nothing here loads its weights)."""
    config = {"recipe": recipe_dict, "model_source": "embedded", "layers": [0, 1], "expert_size": 2,
              "intermediate_size": 8}
    heldout = {"2": {"perplexity": perplexity, "dense_perplexity": 29.4, "agreement": 0.7, "kl": 0.3, "tokens": 64}}
    save_run(name, config, {"permutation.0": torch.arange(8)}, {"heldout": heldout})


class FakeTraining:
    """A job function standing in for lab_jobs._train_job: reports, waits for the test's go, saves a run."""

    def __init__(self, fail: str | None = None):
        self.go = {warmstart.QUICK_RUN: threading.Event(), warmstart.DEFAULT_RUN: threading.Event()}
        self.trained: list[str] = []
        self.fail = fail

    def __call__(self, ctx) -> dict:
        name = ctx.params["run"]
        ctx.report(message=f"loading for {name}", phase="load")
        while not self.go[name].wait(0.01):
            ctx.check_cancel()
        if self.fail == name:
            raise RuntimeError("out of memory")
        save_fake_run(name, ctx.params["recipe"], 40.0 if name == warmstart.QUICK_RUN else 39.5)
        self.trained.append(name)
        return {"run": name}


def wait_for(predicate, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


def test_the_setting_is_read_in_one_place_with_clear_errors_and_documented(monkeypatch):
    monkeypatch.delenv(WARM_START_VAR, raising=False)
    assert warm_start() == "quick"  # the default: a visitor of a fresh Space sees a model within minutes
    for text, mode in (("off", "off"), (" Default ", "default"), ("QUICK", "quick"), ("", "quick")):
        monkeypatch.setenv(WARM_START_VAR, text)
        assert warm_start() == mode
    for bad in ("fast", "0", "on", "quick,default"):
        monkeypatch.setenv(WARM_START_VAR, bad)
        with pytest.raises(ValueError, match=rf"FACTORLAB_WARM_START='{re.escape(bad)}' is not one of off, quick, "
                                             r"default \(off: nothing.*default: the default recipe only"):
            warm_start()
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"`FACTORLAB_WARM_START` \| `quick` \|", readme), "README's hosting table lacks the warm start"
    for mode in WARM_START_MODES:
        assert f"`{mode}`" in readme.split("`FACTORLAB_WARM_START`")[1].split("\n")[0]


def test_the_plan_of_each_mode():
    assert warmstart.plan("off") == []
    quick, default = warmstart.plan("quick")
    assert (quick.run, quick.label, quick.recipe) == (warmstart.QUICK_RUN, "quick", preset("quick"))
    assert (default.run, default.label, default.recipe) == (warmstart.DEFAULT_RUN, "default", preset("default"))
    assert warmstart.plan("default") == [default]  # skip quick: only the default recipe
    with pytest.raises(ValueError, match="unknown warm start 'fast': choose one of off, quick, default"):
        warmstart.plan("fast")


def test_quick_then_default_pages_adopt_the_first_and_are_offered_the_second(runs_dir, manager):
    fake = FakeTraining()
    ws = warmstart.start("quick", job=fake)
    assert ws is not None
    wait_for(lambda: ws.job_ids)
    assert list(ws.job_ids) == [warmstart.QUICK_RUN]
    quick_job = manager.get(ws.job_ids[warmstart.QUICK_RUN])
    assert quick_job.owner == lab.WARM_START_OWNER and quick_job.params["warm_start"] == "quick"
    assert quick_job.params["recipe"] == preset("quick").to_dict()
    # the banner says what trains and what to do meanwhile; the header says a first model is coming
    note = lab_jobs.job_view(quick_job)["note"]
    assert "training its first model by itself: the quick recipe (a model to look at in 1.5 minutes" in note
    assert "dense side of Chat answers at once" in note
    assert "the lab is training its first model" in lab.describe_run(None)
    assert warmstart.start("quick", job=fake) is None  # one warm start per process
    with pytest.raises(lab.LabError, match="is the lab's warm start .*only the host can stop it"):
        lab_jobs.cancel_job("a-visitor")  # one visitor cannot take the first model away from everyone
    assert warmstart.page_run(None) is None  # nothing to show yet

    fake.go[warmstart.QUICK_RUN].set()
    wait_for(lambda: warmstart.DEFAULT_RUN in ws.job_ids)
    assert fake.trained == [warmstart.QUICK_RUN]
    assert warmstart.page_run(None) == warmstart.QUICK_RUN  # a page with no run adopts it
    assert warmstart.page_run("mine") == "mine"
    assert warmstart.offer(warmstart.QUICK_RUN) is None and warmstart.offer_text(warmstart.QUICK_RUN) == ""
    default_job = manager.get(ws.job_ids[warmstart.DEFAULT_RUN])
    assert default_job.params["recipe"] == preset("default").to_dict()
    assert "now training the default recipe" in lab_jobs.job_view(default_job)["note"]
    assert "offers to switch" in lab_jobs.job_view(default_job)["note"]

    fake.go[warmstart.DEFAULT_RUN].set()
    assert ws.join(10) and ws.state == "done"
    assert fake.trained == [warmstart.QUICK_RUN, warmstart.DEFAULT_RUN]
    assert warmstart.page_run(warmstart.QUICK_RUN) == warmstart.QUICK_RUN  # never yanked away
    assert warmstart.page_run(None) == warmstart.DEFAULT_RUN  # a new page starts on the default recipe
    assert warmstart.offer(warmstart.QUICK_RUN) == warmstart.DEFAULT_RUN
    assert warmstart.offer("mine") is None and warmstart.offer(warmstart.DEFAULT_RUN) is None
    text = warmstart.offer_text(warmstart.QUICK_RUN)
    assert "default recipe is trained" in text and "perplexity is 39.5 against 40.0 for the quick run" in text
    assert lab_jobs.job_view(manager.get(ws.job_ids[warmstart.DEFAULT_RUN]))["note"] is None  # finished: no note


def test_mode_default_trains_only_the_default_recipe(runs_dir, manager):
    fake = FakeTraining()
    fake.go[warmstart.DEFAULT_RUN].set()
    ws = warmstart.start("default", job=fake)
    assert ws.join(10) and ws.state == "done" and fake.trained == [warmstart.DEFAULT_RUN]
    assert warmstart.page_run(None) == warmstart.DEFAULT_RUN and warmstart.offer(warmstart.DEFAULT_RUN) is None


def test_off_or_a_usable_run_means_no_warm_start_and_a_restart_resumes(runs_dir, manager, monkeypatch):
    monkeypatch.setenv(WARM_START_VAR, "off")
    assert warmstart.start() is None and manager.jobs() == []
    monkeypatch.setenv(WARM_START_VAR, "quick")
    save_fake_run("someone-elses", preset("quick").to_dict(), 40.0)
    assert warmstart.start() is None and manager.jobs() == []  # a usable run: the host's runs, nothing trained
    (runs_dir / "someone-elses").rename(runs_dir / warmstart.QUICK_RUN)  # a restart after the quick stage
    fake = FakeTraining()
    fake.go[warmstart.DEFAULT_RUN].set()
    ws = warmstart.start(job=fake)
    assert ws.join(10) and fake.trained == [warmstart.DEFAULT_RUN]
    assert "offers to switch" in manager.jobs()[0].params["note"]  # the quick run is already there to use


def test_a_failed_stage_stops_the_warm_start_and_says_why(runs_dir, manager):
    fake = FakeTraining(fail=warmstart.QUICK_RUN)
    fake.go[warmstart.QUICK_RUN].set()
    ws = warmstart.start("quick", job=fake)
    assert ws.join(10)
    assert ws.state == "quick failed: out of memory" and list(ws.job_ids) == [warmstart.QUICK_RUN]
    assert warmstart.page_run(None) is None


def test_an_unwritable_runs_folder_turns_the_warm_start_off(tmp_path, manager, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FACTORLAB_RUNS", str(blocker / "runs"))
    ws = warmstart.start("quick", job=FakeTraining())
    assert ws.join(10) and ws.state.startswith("off: the runs folder") and manager.jobs() == []


def test_runs_go_to_persistent_storage_when_it_is_writable(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setattr(runs, "PERSISTENT_STORAGE", data)
    monkeypatch.delenv("FACTORLAB_RUNS", raising=False)
    assert runs.runs_root() == Path("runs")  # no /data: ./runs
    data.write_text("")
    assert runs.runs_root() == Path("runs")  # not a folder
    data.unlink()
    data.mkdir()
    assert runs.runs_root() == data / "runs"  # a Space with persistent storage
    monkeypatch.setattr(runs.os, "access", lambda path, mode: False)
    assert runs.runs_root() == Path("runs")  # read-only storage: the warm start covers restarts instead
    monkeypatch.undo()
    monkeypatch.setattr(runs, "PERSISTENT_STORAGE", data)
    monkeypatch.setenv("FACTORLAB_RUNS", str(tmp_path / "mine"))
    assert runs.runs_root() == tmp_path / "mine"  # the variable wins
    assert runs.runs_root(tmp_path / "arg") == tmp_path / "arg"  # and an explicit folder over both
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"`FACTORLAB_RUNS` \| `/data/runs` if `/data` is writable .*else `./runs`", readme)


def test_the_app_starts_the_warm_start_when_it_launches(monkeypatch, tmp_path):
    """app.launch() is where it starts (the page's first visitor should not have to ask), after a bad setting
    has stopped the start with its message."""
    import socket

    monkeypatch.setenv("FACTORLAB_RUNS", str(tmp_path / "runs"))
    import app

    monkeypatch.setenv(WARM_START_VAR, "fast")
    with pytest.raises(ValueError, match="FACTORLAB_WARM_START='fast'"):
        app.launch(prevent_thread_lock=True)
    monkeypatch.setenv(WARM_START_VAR, "quick")
    started = []
    monkeypatch.setattr(warmstart, "start", lambda: started.append(True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(prevent_thread_lock=True, server_port=port, quiet=True)
    try:
        assert started == [True]
    finally:
        app.demo.close()
