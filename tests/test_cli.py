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
    out = _json(capsys, ["flops", "--model", "default", "--experts", "4", "--k", "1", "--seq-len", "512", "--json"])
    for side in ("dense", "factorized"):
        assert set(out[side]) >= {"attention_proj", "attention_scores", "ffn", "router", "lm_head", "total"}
    assert out["factorized"]["ffn"] / out["dense"]["ffn"] == pytest.approx(0.25, rel=1e-3)
    assert out["factorized"]["total"] < out["dense"]["total"]


@pytest.mark.slow
def test_factorize_json_and_run_folder(capsys, embedded, runs_dir):
    out = _json(capsys, ["factorize", "--model", "default", "--experts", "4", "--split", "random",
                         "--name", "demo", "--json"])
    assert out["max_abs_logit_diff"] < 3e-4
    assert out["max_abs_logit_diff_fp64"] < 1e-9  # exact maths: fp32 differences are summation order
    assert out["run"] == str(runs_dir / "demo")
    assert (runs_dir / "demo" / "tensors.safetensors").exists()
    listed = _json(capsys, ["runs", "--json"])
    assert [r["name"] for r in listed["runs"]] == ["demo"]


def test_errors_are_one_line(capsys):
    assert main(["flops", "--experts", "4", "--seq-len", "0"]) == 2
    assert "error: --seq-len must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_experts_message(capsys, embedded):
    assert main(["factorize", "--experts", "5"]) == 2
    err = capsys.readouterr().err
    assert "5 experts do not divide the FFN width 1536" in err and "Traceback" not in err


def test_unreachable_hub_model_is_a_clear_error(capsys):
    code = subprocess.run([sys.executable, "-m", "factorlab", "info", "--model", "someone/not-a-model"],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert code.returncode == 2
    assert "cannot be reached" in code.stderr and "embedded default" in code.stderr
    assert "Traceback" not in code.stderr


def test_train_options_reach_the_trainer(monkeypatch, capsys):
    """--split coverage, --ridge, --gate-up-steps, --gate-up-lr and --adaptive-rounds arrive in the specs
    train_run receives."""
    import factorlab.workflows as workflows

    seen = {}

    def fake_train_run(spec, cfg, data, name, **kw):
        seen.update(spec=spec, cfg=cfg)
        return {"run": name, "seconds": 0.0, "tokens": 0, "heldout_by_k": {}, "train": {}}

    monkeypatch.setattr(workflows, "train_run", fake_train_run)
    assert main(["train", "x", "--split", "coverage", "--ridge", "0.05", "--gate-up-steps", "7",
                 "--gate-up-lr", "0.002", "--adaptive-rounds", "2", "--json"]) == 0
    assert seen["spec"].split == "coverage"
    assert (seen["cfg"].ridge, seen["cfg"].gate_up_steps, seen["cfg"].gate_up_lr) == (0.05, 7, 0.002)
    assert seen["cfg"].adaptive_rounds == 2


def test_train_device_reaches_the_trainer_and_bad_devices_fail_clearly(monkeypatch, capsys):
    """--device is passed to train_run as a torch.device; a CUDA device where none is usable, or a
    name torch does not know, stops before any training with a message naming the fix."""
    import torch

    import factorlab.workflows as workflows

    seen = []

    def fake_train_run(spec, cfg, data, name, **kw):
        seen.append(kw["device"])
        return {"run": name, "seconds": 0.0, "tokens": 0, "heldout_by_k": {}, "train": {}}

    monkeypatch.setattr(workflows, "train_run", fake_train_run)
    assert main(["train", "x", "--json"]) == 0 and seen == [torch.device("cpu")]  # the default
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
    assert seen == [torch.device("cpu")]  # none of the failures trained
