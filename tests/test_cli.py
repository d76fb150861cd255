"""The CLI's JSON contracts (fixed keys scripts rely on) and its one-line errors."""
import json
import subprocess
import sys

import pytest

from factorlab.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_flops_json(capsys, embedded):
    out = _json(capsys, ["flops", "--preset", "paper", "--seq-len", "512", "--json"])
    assert list(out["k"]) == ["1", "2", "3", "4"] and out["layers"] == list(range(30))
    for side in (out["dense"], out["k"]["1"]):
        assert set(side) >= {"attention_proj", "attention_scores", "ffn", "router", "lm_head", "total"}
    assert out["k"]["1"]["ffn"] / out["dense"]["ffn"] == pytest.approx(0.25, rel=1e-3)  # FactorLLM's 1R4E1K
    assert out["k"]["1"]["total"] < out["dense"]["total"]
    default = _json(capsys, ["flops", "--k", "2", "--json"])  # the default recipe's shape at one K
    assert list(default["k"]) == ["2"] and default["shared_size"] == 256 and default["layers"] == list(range(1, 30))
    ffn = 3 * 2 * 576 * (1536 + 29 * (256 + 2 * 320))  # layer 0 dense; 256 shared + 2 experts of 320
    assert default["k"]["2"]["ffn"] == ffn


@pytest.mark.slow
def test_factorize_json_and_run_folder(capsys, embedded, runs_dir):
    out = _json(capsys, ["factorize", "--experts", "4", "--split", "random", "--name", "demo", "--json"])
    assert out["max_abs_logit_diff"] < 3e-4
    assert out["max_abs_logit_diff_fp64"] < 1e-9  # exact maths: fp32 differences are summation order
    assert out["run"] == str(runs_dir / "demo")
    assert (runs_dir / "demo" / "tensors.safetensors").exists()
    listed = _json(capsys, ["runs", "--json"])
    assert [r["name"] for r in listed["runs"]] == ["demo"]
    from factorlab.recipe import Recipe

    # a factorize-only run is the default recipe's split with an untrained router
    assert listed["runs"][0]["recipe"] == Recipe(split="random", mode="none").to_dict()


def test_errors_are_one_line(capsys):
    assert main(["flops", "--experts", "4", "--seq-len", "0"]) == 2
    assert "error: --seq-len must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_experts_message(capsys, embedded):
    assert main(["factorize", "--experts", "5", "--shared", "0"]) == 2
    err = capsys.readouterr().err
    assert "5 experts do not divide the FFN width 1536" in err and "Traceback" not in err


def test_unreachable_hub_model_is_a_clear_error(capsys):
    code = subprocess.run([sys.executable, "-m", "factorlab", "info", "--model", "someone/not-a-model"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert code.returncode == 2
    assert "cannot be reached" in code.stderr and "embedded default" in code.stderr
    assert "Traceback" not in code.stderr


def _fake_train_run(seen: list):
    def fake(recipe, name, **kw):
        seen.append((recipe, kw))
        return {"run": name, "seconds": 0.0, "tokens": 0, "heldout_by_k": {}, "train": {}}
    return fake


def test_train_builds_its_recipe_from_preset_set_and_flags(monkeypatch, capsys):
    """`train x` trains Recipe(); a preset, --set for any field and the everyday flags change it, in
    that order; a field given twice with different values, an unknown field or a bad value is a clear error."""
    import factorlab.workflows as workflows
    from factorlab.recipe import Recipe, preset

    seen = []
    monkeypatch.setattr(workflows, "train_run", _fake_train_run(seen))
    assert main(["train", "x", "--json"]) == 0
    assert seen[-1][0] == Recipe()
    assert main(["train", "x", "--preset", "paper", "--set", "ridge=0.05", "--set", "per_token_router_steps=7",
                 "--split", "random", "--tokens", "4096", "--minutes", "2.5", "--json"]) == 0
    assert seen[-1][0] == preset("paper", ridge=0.05, per_token_router_steps=7, split="random", train_tokens=4096,
                                 minutes=2.5)
    assert main(["train", "x", "--set", "top_k=3", "--k", "3", "--json"]) == 0  # the same value twice is fine
    assert seen[-1][0].top_k == 3
    capsys.readouterr()
    n = len(seen)
    for argv, message in (
            (["--set", "top_k=1", "--k", "3"], "top_k is set twice"),
            (["--set", "refine_rounds=2"], "unknown recipe setting 'refine_rounds'"),
            (["--set", "router_steps"], "write KEY=VALUE"),
            (["--set", "router_steps=many"], "router_steps='many': expected a whole number"),
            (["--k", "5"], "K (top_k) must be in 1..4"),
            (["--set", "split=coverage"], "split='coverage' is not a choice")):
        assert main(["train", "x", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert len(seen) == n  # none of them trained


def test_train_help_is_short_and_research_knobs_are_set_only(capsys):
    """`train --help` lists at most 21 options (20 + --processes); fields that are not everyday have no flag
    (--set only)."""
    from factorlab.recipe import recipe_fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    options = [line for line in text.splitlines() if line.startswith("  -")]
    assert len(options) <= 21, options
    for f in recipe_fields(everyday=False):
        assert f"--{f.name.replace('_', '-')}" not in text
    for f in recipe_fields(everyday=True):
        assert f.metadata["flag"] in text


def test_recipe_command_prints_every_field(capsys):
    from factorlab.recipe import preset, recipe_fields

    out = _json(capsys, ["recipe", "--preset", "quick", "--json"])
    assert out == preset("quick").to_dict()
    assert main(["recipe"]) == 0
    text = capsys.readouterr().out
    assert "# recipe: default (preset)" in text
    for f in recipe_fields():
        assert any(line.startswith(f"{f.name} ") and f.metadata["help"] in line for line in text.splitlines()), f.name


def test_train_device_reaches_the_trainer_and_bad_devices_fail_clearly(monkeypatch, capsys):
    """--device is passed to train_run as a torch.device; a CUDA device where none is usable, or a
    name torch does not know, stops before any training with a message naming the fix."""
    import torch

    import factorlab.workflows as workflows

    seen = []

    calls = []
    monkeypatch.setattr(workflows, "train_run", _fake_train_run(calls))
    assert main(["train", "x", "--json"]) == 0
    seen.extend(kw["device"] for _, kw in calls)
    assert seen == [torch.device("cpu")]  # the default
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "x", "--device", "cuda"]) == 2
    assert "no CUDA device is available here; use --device cpu" in capsys.readouterr().err
    assert main(["train", "x", "--device", "gpu"]) == 2
    assert "not a device name" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "x", "--device", "cuda:3"]) == 2
    assert "only 1 CUDA device(s) here; use cuda:0" in capsys.readouterr().err
    assert len(calls) == 1  # none of the failures trained
