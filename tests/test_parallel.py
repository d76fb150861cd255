"""Data parallelism (factorlab.parallel, `train --processes P`) and the memory estimate (factorlab.memory).

The end-to-end test trains one recipe on a tiny random Llama in one process and in two gloo processes
started by `accelerate launch` (through `train --processes 2`), and compares the stored runs.
"""
import json

import pytest
import torch

from conftest import tiny_llama
from factorlab import cli, memory, parallel
from factorlab.recipe import Recipe, preset
from factorlab.runs import load_run
from factorlab.workflows import train_run

# A recipe that touches every data-parallel path: cluster split + shared neurons (gathered calibration),
# PAR router (global batches), refits (summed normal equations), per-token K (gathered thresholds),
# every K's refit, end-to-end distillation (DDP) and held-out metrics (reduced).
TINY = ["--experts", "4", "--k", "2", "--shared", "32", "--layers", "1-", "--tokens", "2048",
        "--set", "heldout_tokens=512", "--set", "seq_len=32", "--set", "calibration_tokens=512",
        "--set", "router_steps=40", "--set", "router_batch=128", "--per-token-rounds", "1",
        "--set", "per_token_router_steps=20", "--set", "e2e_steps=2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with the embedded model's tokenizer (the CLI loads it like any folder)."""
    from transformers import AutoTokenizer

    from factorlab.models import cache_dir

    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(layers=3, hidden=64, intermediate=160, vocab=49152)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct").save_pretrained(folder)
    return folder


def test_two_processes_train_the_one_process_recipe(tiny_folder, tmp_path, capsys):
    runs = tmp_path / "runs"
    common = ["--model", str(tiny_folder), *TINY, "--runs-dir", str(runs)]
    assert cli.main(["train", "one", *common]) == 0
    assert cli.main(["train", "two", *common, "--processes", "2"]) == 0  # accelerate launch, 2 gloo processes
    assert "launching 2 processes" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # one writer, no leftovers
    one, two = load_run("one", runs), load_run("two", runs)
    assert one.metrics["train"]["processes"] == 1 and two.metrics["train"]["processes"] == 2
    assert one.metrics["train"]["tokens"] == two.metrics["train"]["tokens"] == 2048
    a, b = one.tensors(), two.tensors()
    assert sorted(a) == sorted(b)
    for name in a:
        if name.startswith("permutation."):  # identical partitions
            assert torch.equal(a[name], b[name]), name

    def rel(name: str) -> float:
        return (a[name] - b[name]).abs().max().item() / max(a[name].abs().max().item(), 1e-30)

    for name in a:
        if name.startswith(("router.", "thresholds.", "expected_k.")):  # the same routers and thresholds
            assert rel(name) <= 1e-5, name
    refits = {n: rel(n) for n in a if "down" in n}
    assert len(refits) == 12  # down + shared_down of 2 layers at K = 1, 2 (trained), 3
    for name, r in refits.items():  # float rounding: summed in another order, then two Adam steps
        assert r <= 5e-5, (name, r)
    for k, h in one.metrics["heldout"].items():  # the same held-out tokens, all scored
        other = two.metrics["heldout"][k]
        assert other["tokens"] == h["tokens"]
        assert other["perplexity"] == pytest.approx(h["perplexity"], rel=0.01), k
        assert other["dense_perplexity"] == pytest.approx(h["dense_perplexity"], rel=1e-5)
        assert other["agreement"] == pytest.approx(h["agreement"], abs=0.01)


def test_bfloat16_weights_train(tiny_folder, tmp_path):
    """The path for models whose float32 weights do not fit: bf16 weights loaded with device_map "auto" (which
    transformers leaves undispatched on a machine without GPUs), trained and scored like any model."""
    from factorlab.models import load_model

    loaded = load_model(str(tiny_folder), dtype=torch.bfloat16, device_map="auto", reuse=False)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    recipe = Recipe(model=str(tiny_folder), shared_size=32, train_tokens=1024, heldout_tokens=256, seq_len=32,
                    calibration_tokens=256, router_steps=10, per_token_rounds=0)
    heldout = train_run(recipe, "bf", loaded=loaded, runs_dir=tmp_path / "runs")["heldout_by_k"]
    assert heldout["4"]["agreement"] == 1.0 and heldout["2"]["agreement"] > 0.5


def test_loading_falls_back_to_bfloat16_then_refuses():
    info, _ = memory.model_shapes("meta-llama/Meta-Llama-3-8B")
    recipe = preset("default", model="meta-llama/Meta-Llama-3-8B")
    assert memory.loading(info, recipe, available=100 * 2**30)[:2] == ("float32", None)
    assert memory.loading(info, recipe, available=60 * 2**30)[:2] == ("bfloat16", None)
    with pytest.raises(memory.MemoryPlanError, match="GiB per process"):
        memory.loading(info, recipe, available=30 * 2**30)


def test_one_process_helpers_are_no_ops():
    x = torch.arange(6.0).reshape(3, 2)
    assert parallel.world_size() == 1 and parallel.is_main() and not parallel.launched()
    assert torch.equal(parallel.shard(x), x)
    assert parallel.gather_rows(x) is x and parallel.all_sum_(x) is x and parallel.broadcast_(x) is x
    assert parallel.offset_and_total(7) == (0, 7) and parallel.total(2.5) == 2.5 and parallel.all_max(3.0) == 3.0
    assert parallel.token_mean(0.25, 10) == 0.25 and parallel.any_true(True)
    index = torch.tensor([4, 0, 9])
    assert parallel.local_part(index, 0, 10) is index
    metrics = {"perplexity": 3.0, "dense_perplexity": 2.0, "agreement": 0.5, "kl": 0.1, "tokens": 10}
    assert parallel.reduce_heldout(metrics) is metrics


def test_shards_cover_the_rows_in_order():
    for rows in (1, 7, 8, 33):
        for world in (1, 2, 3):
            bounds = [parallel.shard_bounds(rows, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, rank order
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_launch_runs_the_same_command_under_accelerate(monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["train", "x", "--preset", "quick", "--processes", "2", "--seed", "3"]) == 0
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    tail = cmd[cmd.index("-m", 3):]
    assert tail == ["-m", "factorlab", "train", "x", "--preset", "quick", "--seed", "3"]  # without --processes


def test_bad_process_count_is_refused(capsys):
    assert cli.main(["train", "x", "--processes", "0"]) == 2
    assert "--processes must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("model, params", [("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384),
                                           ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
                                           ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008)])
def test_bundled_configs_give_the_published_parameter_counts(model, params):
    info, source = memory.model_shapes(model)
    assert info["parameters"] == params and "bundled" in source


def test_estimate_matches_the_weights_of_a_real_model(tiny_model):
    from factorlab.models import model_info

    info = model_info(tiny_model)
    assert memory.parameters(info) == info["parameters"]  # no biases in Llama
    recipe = Recipe(shared_size=0, train_tokens=1024, heldout_tokens=0, seq_len=32, calibration_tokens=256)
    est = memory.estimate(info, recipe)
    assert est.held["dense weights"] == 4 * info["parameters"]
    two = memory.estimate(info, recipe, processes=2)
    assert two.phases["layer-wise training"]["stream (one layer)"] * 2 == \
        est.phases["layer-wise training"]["stream (one layer)"]  # each process holds half the tokens


def test_plan_refuses_what_cannot_fit_and_streams_the_teacher_first():
    info, _ = memory.model_shapes("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    recipe = preset("default", model="TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    with pytest.raises(memory.MemoryPlanError, match="fewer train_tokens.*bfloat16"):
        memory.plan(info, recipe, available=4 * 2**30)
    router = recipe.replace(mode="router", train_tokens=2**20)
    cached = memory.estimate(info, router)
    assert cached.phases["router training"]["teacher cache, every layer"] > 150 * 2**30
    est, _, _ = memory.plan(info, router, available=40 * 2**30)
    assert not est.cache_teacher and est.peak < 36 * 2**30


def test_memory_command_prints_the_estimate_offline(capsys):
    assert cli.main(["memory", "meta-llama/Meta-Llama-3-8B", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "8.030 B parameters" in out and "normal equations" in out and "peak" in out
    assert cli.main(["memory", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--processes", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["processes"] == 2 and data["parameters"] == 1_100_048_384 and data["peak_bytes"] > 0
    assert cli.main(["memory", "nobody/unknown-model"]) == 2
    assert "bundled configs" in capsys.readouterr().err


def test_streamed_teacher_trains_the_router_like_the_cache(tiny_model):
    from factorlab.factorize import build_moe, make_partition
    from factorlab.par import train

    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(mode="router", shared_size=0, layers="all", router_steps=30, router_batch=64, train_tokens=256,
                    seq_len=32, heldout_tokens=0, calibration_tokens=256, split="contiguous")
    accuracy = []
    for cache in (True, False):
        moe = build_moe(tiny_model, make_partition(tiny_model, 4, "contiguous"), 2)
        accuracy.append(train(tiny_model, moe, ids, recipe, cache_teacher=cache).router_label_accuracy)
    assert accuracy[0].keys() == accuracy[1].keys()
    for i in accuracy[0]:
        assert accuracy[1][i] == pytest.approx(accuracy[0][i], abs=0.02)
