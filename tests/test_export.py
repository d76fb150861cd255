"""Export to standard transformers MoE classes: exact for every top-K kind on tiny random Llamas (each format), the
fixed-K approximation of per-token K, refusals, the Hub offline, and one export of the embedded model end to end."""
import json

import pytest
import torch

from factorlab.export import (FORMATS, ExportError, build_export, check_repo_id, export_state_dict,
                              greedy_ids, max_logit_diff, plan_export, push_to_hub, routed_tensors)
from factorlab.factorize import build_moe, make_partition
from factorlab.moe import factorized_layers
from tests.conftest import tiny_llama

IDS = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))


def factorized(mode: str, k: int, shared: int = 0, layers=None, experts: int = 4, source=None):
    """A tiny random factorized Llama whose routing matters: routers with unit-scale rows."""
    dense = source or tiny_llama(layers=3)
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    part = make_partition(dense, experts, "random", layers, seed=1, shared_size=shared, calibration_ids=calib)
    moe = build_moe(dense, part, k, mode, router_seed=3)
    gen = torch.Generator().manual_seed(4)
    for mlp in factorized_layers(moe).values():
        mlp.router.linear.weight.copy_(torch.randn(mlp.router.linear.weight.shape, generator=gen))
    return dense, moe


def round_trip(model, plan, folder):
    """Save the export and load it back as a user would: AutoModelForCausalLM, no trust_remote_code."""
    from transformers import AutoModelForCausalLM

    build_export(model, plan).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config  # no custom code to fetch
    return AutoModelForCausalLM.from_pretrained(folder)


KINDS = [  # (output mode, K, shared neurons, factorized layers): what each exercises
    ("gated", 2, 0, None),  # gated top-K onto the class's own top-K router
    ("scaled", 2, 0, None),  # scaled top-K as top-1 over 6 set experts
    ("scaled", 2, 32, [1, 2]),  # + a shared block, layer 0 dense
    ("gated", 1, 32, [1]),  # two dense layers around one sparse one
    ("scaled", 3, 0, [0, 2]),  # K=3: N/K = 4/3 folded into down, 4 set experts of 3 experts each
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode, k, shared, layers", KINDS)
def test_top_k_runs_export_exactly(fmt, mode, k, shared, layers, tmp_path):
    dense, moe = factorized(mode, k, shared, layers)
    plan = plan_export(moe, fmt)
    assert plan.exact and plan.top_k == k
    back = round_trip(moe, plan, tmp_path)
    assert type(back).__name__ == {"qwen2_moe": "Qwen2MoeForCausalLM",
                                   "granitemoeshared": "GraniteMoeSharedForCausalLM"}[fmt]
    assert max_logit_diff(dense, moe, IDS) > 1e-2  # the routing matters (logits ~1): the check below can fail
    assert max_logit_diff(moe, back, IDS) < 1e-5  # measured 2-4e-7
    assert greedy_ids(moe, IDS[:, :8], 12) == greedy_ids(back, IDS[:, :8], 12)
    experts = 6 if (mode, k) == ("scaled", 2) else 4
    assert (plan.num_experts, back.config.num_experts_per_tok) == (experts, 1 if mode == "scaled" else k)
    if fmt == "qwen2_moe":  # dense layers stay plain MLPs
        assert back.config.mlp_only_layers == plan.dense_layers == [i for i in range(3) if i not in (layers or [0, 1, 2])]


def test_scaled_set_experts_are_the_top_k_sets():
    """Each set expert = N/K x the sum of its members, and the best set's logit is the top-K experts' sum."""
    _, moe = factorized("scaled", 2, shared=16)
    mlp = factorized_layers(moe)[1]
    plan = plan_export(moe)
    t = routed_tensors(mlp, plan)
    x = torch.randn(64, 64)
    set_logits = x @ t["router"].t()  # (T, 6)
    top2 = mlp.router.logits(x).topk(2).indices.sort().values
    sets = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    assert torch.equal(sets[set_logits.argmax(-1)], top2)
    d = mlp.expert_size
    h = x @ t["gate_up"][0].t()  # set {0, 1}
    out = (mlp.act_fn(h[:, :2 * d]) * h[:, 2 * d:]) @ t["down"][0].t()
    want = 2 * (mlp.expert_outputs(x)[:, 0] + mlp.expert_outputs(x)[:, 1])  # N/K = 2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_k_equal_n_of_a_tuned_model_is_dense_layers(tmp_path):
    dense, moe = factorized("scaled", 4, layers=[1, 2])
    for mlp in factorized_layers(moe).values():
        mlp.tuned = True  # as a run with refitted experts: K = N is the dense FFN
    plan = plan_export(moe)
    assert plan.exact and plan.moe_layers == [] and plan.dense_layers == [0, 1, 2]
    assert max_logit_diff(dense, round_trip(moe, plan, tmp_path), IDS) < 1e-5


def test_per_token_k_exports_the_nearest_fixed_k(tmp_path):
    """Per-token K cannot be a bias-free router: the export is the run at a fixed K, marked approximate."""
    _, moe = factorized("scaled", 2, shared=16, layers=[1, 2])
    for mlp in factorized_layers(moe).values():
        mlp.set_thresholds(torch.tensor([0.9, 0.6, 0.4, 0.1]), torch.tensor([1.2, 2.3, 3.1, 3.9]), min_experts=0)
    plan = plan_export(moe)
    assert not plan.exact and plan.top_k == 2 and "per-token K" in plan.notes[0]  # mean 2.3 -> 2
    assert plan_export(moe, top_k=3).top_k == 3
    assert not plan_export(moe, top_k=4).exact  # K = N is exact only where it is the dense FFN (refitted runs)
    assert all(m.adaptive for m in factorized_layers(moe).values())  # planning changes nothing
    with torch.no_grad():
        run_logits = moe(IDS).logits
    back = round_trip(moe, plan, tmp_path)  # build_export switches the model to top-2
    assert not any(m.adaptive for m in factorized_layers(moe).values())
    assert max_logit_diff(moe, back, IDS) < 1e-5  # exact for the fixed K ...
    with torch.no_grad():
        assert (back(IDS).logits - run_logits).abs().max() > 1e-3  # ... which is not the run's per-token K


def test_a_qwen2_source_keeps_its_qkv_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    source = Qwen2ForCausalLM(cfg).eval().requires_grad_(False)
    for layer in source.model.layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.bias, std=0.5)
    _, moe = factorized("gated", 2, source=source)
    back = round_trip(moe, plan_export(moe), tmp_path)
    assert back.config.qkv_bias and max_logit_diff(moe, back, IDS) < 1e-5
    with pytest.raises(ExportError, match="no q/k/v biases: export this model as qwen2_moe"):
        build_export(moe, plan_export(moe, "granitemoeshared"))


def test_refusals_say_what_to_do():
    dense, moe = factorized("gated", 2)
    with pytest.raises(ExportError, match="no factorized layer"):
        plan_export(dense)
    with pytest.raises(ExportError, match="choose one of qwen2_moe, granitemoeshared"):
        plan_export(moe, "mixtral")
    with pytest.raises(ExportError, match=r"K must be in 1..4"):
        plan_export(moe, top_k=5)
    factorized_layers(moe)[1].set_output_mode("scaled")
    with pytest.raises(ExportError, match="differ"):
        plan_export(moe)


def test_state_dict_names_match_the_classes():
    _, moe = factorized("scaled", 2, shared=16, layers=[1, 2])
    state = export_state_dict(moe, plan_export(moe))
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (6, 2 * 2 * 28, 64)  # (I-S)/N = 28
    assert state["model.layers.1.mlp.shared_expert_gate.weight"].abs().sum() == 0  # sigmoid(0) = 1/2 ...
    mlp = factorized_layers(moe)[1]
    torch.testing.assert_close(state["model.layers.1.mlp.shared_expert.down_proj.weight"], 2 * mlp.shared_down.t())
    assert "model.layers.0.mlp.gate_proj.weight" in state and "lm_head.weight" not in state  # tied


def test_the_hub_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match=r"Hub cannot be reached .*nothing was pushed; the export is in") as exc:
        push_to_hub(tmp_path, "me/smollm2-moe")
    assert "\n" not in str(exc.value)
    for bad in ("smollm2-moe", "a/b/c", "../x", "me/", " me/x", ""):
        with pytest.raises(ExportError, match="owner/name"):
            check_repo_id(bad)


def test_online_the_folder_is_uploaded(tmp_path, monkeypatch):
    """With the Hub reachable, push_to_hub creates the repo (if missing) and uploads the folder (a stand-in HfApi)."""
    import huggingface_hub

    from factorlab import export

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["repo_type"], kwargs["exist_ok"]))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], kwargs["folder_path"]))

    monkeypatch.setattr(export, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(tmp_path, "me/smollm2-moe") == "https://huggingface.co/me/smollm2-moe"
    assert calls == [("create", "me/smollm2-moe", "model", True), ("upload", "me/smollm2-moe", str(tmp_path))]


@pytest.mark.slow
def test_the_embedded_model_exports_exactly_from_the_cli(embedded, tmp_path, capsys, monkeypatch):
    """A saved run of the embedded model (gated top-2 in the last two layers, untrained router) through
    `python -m factorlab export`: plain transformers loads it, the logits and greedy reply match, the folder holds
    what a Hub repo needs, the run records the export, and --push-to-hub offline says so in one line."""
    from factorlab.cli import main
    from factorlab.recipe import Recipe
    from factorlab.runs import load_run, moe_tensors, save_run
    from factorlab.workflows import factorize, run_config

    recipe = Recipe(split="contiguous", layers="28-29", shared_size=0, output_mode="gated", mode="none",
                    per_token_rounds=0)
    loaded, partition, moe = factorize(recipe, embedded)
    runs = tmp_path / "runs"
    save_run("tiny-export", run_config(recipe, partition, loaded, moe), moe_tensors(moe, partition), {}, root=runs)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code = main(["export", "tiny-export", str(out), "--runs-dir", str(runs), "--push-to-hub", "me/tiny"])
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Hub cannot be reached" in errors[0]  # one line, after the export
    assert "EXACT" in printed.out and "identical" in printed.out
    s = load_run("tiny-export", runs).metrics["export"]["qwen2_moe K=2"]
    assert s["check"]["loaded_class"] == "Qwen2MoeForCausalLM" and s["check"]["max_abs_logit_diff"] < 1e-4
    assert s["check"]["greedy_same"] and len(s["check"]["export_ids"]) > 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert "chat_template.jinja" in names or "chat_template" in (out / "tokenizer_config.json").read_text()
    card = (out / "README.md").read_text()
    assert "Exact" in card and "Max |logit difference|" in card and "GFLOPs" in card and "output_mode" in card
    assert s["size"]["export_parameters"] - s["size"]["dense_parameters"] == 2 * 4 * 576 + 2 * 576  # routers, gates


@pytest.mark.slow
def test_the_lab_exports_a_run_as_a_zip(embedded, tmp_path, runs_dir, monkeypatch):
    """The Export button's job on a run of a tiny local model (the embedded tokenizer): a zip with the checkpoint
    and its card, offered by export_file with what it is; before it, a clear refusal."""
    import zipfile

    from factorlab import lab, lab_jobs
    from factorlab.jobs import get_manager
    from factorlab.models import load_model
    from factorlab.recipe import Recipe
    from factorlab.runs import load_run, moe_tensors, save_run
    from factorlab.workflows import factorize, run_config

    folder = tmp_path / "tiny-model"
    tiny_llama(vocab=len(embedded.tokenizer)).save_pretrained(folder)
    embedded.tokenizer.save_pretrained(folder)
    recipe = Recipe(model=str(folder), split="contiguous", layers="1", shared_size=0, output_mode="gated", mode="none",
                    per_token_rounds=0)
    loaded, partition, moe = factorize(recipe, load_model(str(folder)))
    save_run("tiny", run_config(recipe, partition, loaded, moe), moe_tensors(moe, partition), {}, root=runs_dir)
    monkeypatch.setattr(lab_jobs, "exports_root", lambda: tmp_path / "exports")
    with pytest.raises(lab.LabError, match="no export of 'tiny' yet: press Export first"):
        lab_jobs.export_file("tiny")
    job = get_manager().wait(lab_jobs.start_export("tiny", "qwen2_moe"), 120)
    assert job.state == "done", job.error
    path, text = lab_jobs.export_file("tiny")
    assert "Qwen2MoeForCausalLM at K=2, exact" in text
    with zipfile.ZipFile(path) as archive:
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(archive.namelist())
    assert load_run("tiny").metrics["export"]["qwen2_moe K=2"]["check"]["greedy_same"]
