"""Safe to host (issue 27): quotas, job ownership, path probing, leftovers, messages. Each test is fast
(tiny random models or no model); the whole-app abuse table is tests/test_abuse.py."""
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from factorlab import lab, lab_jobs
from factorlab.jobs import JobManager
from factorlab.limits import QUOTAS, Limits, QuotaError, check_recipe, limits
from factorlab.recipe import MAX_SEED, PRESETS, Recipe, preset
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def manager(monkeypatch):
    """A private job manager in place of the process-wide one."""
    m = JobManager()
    monkeypatch.setattr(lab, "get_manager", lambda: m)
    monkeypatch.setattr(lab_jobs, "get_manager", lambda: m)
    return m


def test_quotas_have_safe_defaults_that_every_preset_fits_and_are_documented(monkeypatch):
    for var in QUOTAS:
        monkeypatch.delenv(var, raising=False)
    q = limits()
    assert q == Limits(**{f.removeprefix("FACTORLAB_MAX_").lower(): d for f, (d, _) in QUOTAS.items()})
    for name in PRESETS:
        check_recipe(preset(name))  # none is refused
    readme = (ROOT / "README.md").read_text()
    for var, (default, _) in QUOTAS.items():
        assert re.search(rf"`{var}` \| `{default}`", readme), f"README's hosting table lacks {var}"
    monkeypatch.setenv("FACTORLAB_MAX_TRAIN_TOKENS", "10000")
    with pytest.raises(QuotaError, match=r"45,056, above this server's limit of 10,000 \(FACTORLAB_MAX_TRAIN_TOKENS"):
        check_recipe(Recipe())
    monkeypatch.setenv("FACTORLAB_MAX_TRAIN_TOKENS", "0")  # 0 lifts a quota
    check_recipe(Recipe(train_tokens=10**7))
    with pytest.raises(QuotaError, match="FACTORLAB_MAX_STEPS"):
        check_recipe(Recipe(router_steps=10**6))
    with pytest.raises(QuotaError, match="seq_len=100,000 is above"):
        check_recipe(Recipe(seq_len=100_000, train_tokens=100_000, heldout_tokens=0))
    monkeypatch.setenv("FACTORLAB_MAX_QUEUE", "lots")
    with pytest.raises(QuotaError, match="FACTORLAB_MAX_QUEUE='lots' is not a whole number"):
        limits()


def test_jobs_are_bounded_per_visitor_and_in_total_and_only_their_owner_cancels_them(manager, monkeypatch):
    gate = threading.Event()
    monkeypatch.setenv("FACTORLAB_MAX_JOBS_PER_SESSION", "2")
    monkeypatch.setenv("FACTORLAB_MAX_QUEUE", "3")

    def job(ctx):
        while not gate.wait(0.01):
            ctx.check_cancel()
        return {}

    first = lab_jobs._submit("eval", "a", job, {"run": "a"}, "alice")
    lab_jobs._submit("eval", "b", job, {"run": "b"}, "alice")
    with pytest.raises(QuotaError, match="you already have 2 job"):
        lab_jobs._submit("eval", "c", job, {"run": "c"}, "alice")
    lab_jobs._submit("eval", "c", job, {"run": "c"}, "bob")
    with pytest.raises(QuotaError, match="3 jobs are queued or running.*FACTORLAB_MAX_QUEUE"):
        lab_jobs._submit("eval", "d", job, {"run": "d"}, "carol")
    with pytest.raises(lab.LabError, match="started by another visitor: only they can cancel it"):
        lab_jobs.cancel_job("carol")
    assert lab_jobs.cancel_job("bob").name == "c"  # bob's queued job, not alice's running one
    assert lab_jobs.cancel_job("alice").id == first  # the running one first
    assert manager.wait(first, 5).state == "cancelled"
    gate.set()
    for j in manager.jobs():
        manager.wait(j.id, 10)
    assert [j.state for j in manager.jobs()] == ["cancelled", "done", "cancelled"]
    with pytest.raises(lab.LabError, match="no job is queued or running"):
        lab_jobs.cancel_job("alice")


def test_two_visitors_starting_the_same_run_name_at_once_get_one_job(manager, runs_dir, monkeypatch):
    monkeypatch.setattr(lab, "dense_info", lambda spec: {"intermediate_size": 1536, "num_layers": 30})
    gate = threading.Event()
    monkeypatch.setattr(lab_jobs, "_train_job", lambda ctx: gate.wait(10) and {})
    barrier = threading.Barrier(2)
    outcomes = []

    def start(owner):
        barrier.wait()
        try:
            outcomes.append(lab_jobs.start_training(Recipe(), name="same", owner=owner))
        except lab.LabError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start, args=(who,)) for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gate.set()
    assert sum("already making the run 'same'" in str(o) for o in outcomes) == 1
    assert len(manager.jobs()) == 1


def test_a_deleted_run_is_never_recreated_by_a_job_finishing_later(runs_dir):
    from factorlab.runs import RunError, delete_run, save_run, update_metrics

    save_run("r", {"recipe": Recipe(model="tiny").to_dict()}, {"x": torch.zeros(1)})
    delete_run("r")
    with pytest.raises(RunError, match="no longer exists"):
        update_metrics("r", {"eval": {}})
    assert not (runs_dir / "r").exists()


def test_the_page_reveals_no_server_path_through_the_model_field(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "config.json").write_text("{}")
    monkeypatch.setenv("FACTORLAB_MODELS", str(models))
    assert lab.page_model("default") == "default" and lab.page_model(" ") == "default"
    assert lab.page_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lab.page_model("mine") == str((models / "mine").resolve())
    messages = set()
    for spec in (str(tmp_path), str(tmp_path / "nothing-here"), "/etc", "/no/such/folder", "~", "~/x", "../models",
                 "./mine", "a/../../etc", "mine/../..", "a/b/c", ".hidden", "C:\\x", "a" * 300):
        with pytest.raises(lab.LabError) as info:
            lab.page_model(spec)
        messages.add(str(info.value).split(": the page", 1)[1])
    assert len(messages) == 1, messages  # the same words whether the path exists or not
    with pytest.raises(lab.LabError, match="other paths are refused"):
        lab.recipe_from_controls({"model": str(tmp_path)})


def test_model_folders_load_only_safetensors_and_bad_ones_say_why(tmp_path):
    from factorlab.models import ModelLoadError, load_model

    model = tiny_llama()
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a pickle checkpoint
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_model(str(folder), reuse=False)
    empty = tmp_path / "empty-config"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="Could not read the config"):
        load_model(str(empty), reuse=False)


def _tiny_run(name: str, experts: int = 4, recipe_experts: int | None = None):
    """A factorize-only run of the tiny model, saved as workflows saves it (its recipe may claim another N)."""
    from factorlab.factorize import build_moe, make_partition
    from factorlab.runs import moe_tensors, save_run

    dense = tiny_llama()
    part = make_partition(dense, experts, "contiguous")
    config = {"recipe": Recipe(model="tiny", num_experts=recipe_experts or experts, top_k=1, split="contiguous",
                               layers="all", shared_size=0, mode="none").to_dict(), "layers": part.layers,
              "expert_size": part.expert_size, "intermediate_size": part.intermediate_size}
    return save_run(name, config, moe_tensors(build_moe(dense, part, top_k=1), part))


def test_a_run_whose_tensors_do_not_fit_its_recipe_is_a_clear_error(runs_dir):
    from factorlab.runs import RunError, load_moe, load_run

    _tiny_run("eight", experts=4, recipe_experts=8)  # four experts saved under a recipe that says eight
    with pytest.raises(RunError, match="'eight' does not fit its recipe or model"):
        load_moe(load_run("eight"), tiny_llama())


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(runs_dir):
    from factorlab.runs import clean_leftovers, list_runs

    _tiny_run("kept")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftovers = [runs_dir / f".big.tmp{pid}.abc", runs_dir / "kept" / f".metrics.json.tmp{pid}.x.tmp",
                 runs_dir / f".old-run.deleted{pid}", runs_dir / f".kept.old{pid}"]
    live = runs_dir / f".writing.tmp{os.getpid()}.xyz"
    for path in leftovers[:1] + leftovers[2:] + [live]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"0" * 1000)
    leftovers[1].write_text("{}")
    assert sorted(clean_leftovers()) == sorted(str(p.relative_to(runs_dir)) for p in leftovers)
    assert live.exists() and not any(p.exists() for p in leftovers)
    assert [r.name for r in list_runs()] == ["kept"] and list_runs()[0].ok
    # killed between the two renames of an overwrite: the run moved aside is its only copy and comes back
    (runs_dir / "kept").rename(runs_dir / f".kept.old{pid}")
    assert clean_leftovers() == [f".kept.old{pid} (restored as kept)"]
    assert [r.name for r in list_runs()] == ["kept"] and list_runs()[0].ok


def test_chat_prompts_drop_whole_old_turns_and_a_too_long_message_is_refused():
    from transformers import PreTrainedTokenizerFast

    from factorlab.chat import Sampling, prompt_ids
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|", "|>", "system", "user", "assistant", "be", "brief", "hello", "hi", "last", "question"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}<|assistant|>"
    turns = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        turns += [{"role": "user", "content": "hello " * 10}, {"role": "assistant", "content": "hi " * 10}]
    turns.append({"role": "user", "content": "last question"})
    full = prompt_ids(tok, turns).shape[1]
    cut = prompt_ids(tok, turns, max_tokens=full - 20)
    assert cut.shape[1] <= full - 20
    text = tok.decode(cut[0])
    assert text.startswith("<| system |> be brief <| user |> hello")  # the template's start is kept
    assert text.endswith("<| user |> last question <| assistant |>") and "hi hi" in text
    with pytest.raises(ValueError, match="shorten it"):
        prompt_ids(tok, [{"role": "user", "content": "word " * 500}], max_tokens=100)
    with pytest.raises(ValueError, match="seed must be in"):
        Sampling(seed=MAX_SEED + 1)


def test_huge_numbers_and_bad_text_are_one_line_messages(manager, runs_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"seed must be in 0..4294967295"):
        Recipe(seed=10**30)
    with pytest.raises(ValueError, match="out of range"):
        Recipe(layers="0-100000000")
    for bad in ("1-2-3", "-1", "x", "1,,2", "1--"):
        with pytest.raises(ValueError) as info:
            Recipe(layers=bad)
        assert "\n" not in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(ValueError, match="num_experts must be at least 1"):
        Recipe(num_experts=0)
    for value in ("nan", "inf", float("nan")):
        with pytest.raises(lab.LabError, match="finite"):
            lab.recipe_from_controls({"route_weight": value})
    monkeypatch.setenv("FACTORLAB_MAX_BENCH_TOKENS", "2048")
    monkeypatch.setattr(lab, "load_run", lambda name: type("R", (), {"name": name})())
    with pytest.raises(QuotaError, match="prefill \\+ decode tokens is 1,000,064"):
        lab_jobs.start_bench("r", 10**6, 64, 1)
    with pytest.raises(QuotaError, match="repeats is 1,000"):
        lab_jobs.start_bench("r", 16, 16, 1000)
    with pytest.raises(QuotaError, match="hellaswag: all items is 10,042"):
        lab_jobs.start_eval("r", ["hellaswag"], 0)
    with pytest.raises(lab.LabError, match="at least 1"):
        lab_jobs.start_eval("r", ["arc_easy"], -5)
