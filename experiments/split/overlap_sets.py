"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Overlapping neuron sets, trained at every layer and benchmarked (issue 7, round 4).

An experiment, not a library feature.

Usage: PYTHONPATH=. python experiments/split/overlap_sets.py C OUT.json [TASKS] [LIMIT]   (e.g. 6 out.json)
Environment: THREADS (default 2); SEED (default 0: the sets' k-means start and the routers);
SMOKE=1 runs a few-second version (layers 1-2, 2,048 tokens, 20 items).

Layers 1-29: the 256 shared neurons of the recipe (always on) + C sets of 640 routed neurons chosen
freely from the other 1,280 (a neuron may be in several sets), one set per token: the same active
neuron count as 1R4E2K with 256 shared (896 of 1,536), C/2 times its routed weights in memory. Sets
from the dense model's FFN inputs on the first 16,384 training tokens (experiments/tools/layer_probe.py:
spherical k-means of the tokens' energy profiles, then alternately token -> the set holding most of
its output energy, set -> its tokens' 640 strongest neurons). Training is par.train's layer-wise pass
on the model's own inputs (32,768 `everyday` tokens, 600 router steps, 2 refine rounds) with two
changes for sets: the first router labels are the energy assignment (FactorLLM's label divides the
teacher by N/K, which does not fit sets), and the refit solves each set's down projection on its own
tokens against the teacher minus the shared neurons' output (ridge 1, measured best per layer; the
shared down projection keeps its weights). Output rule gated with K=1 (the one chosen set counts 1).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import factorlab.evaluate as evaluate
import factorlab.par as par
from factorlab.experiment import read_dense_cache
from factorlab.factorize import Partition, _complement, _shared_neurons, build_moe, calibration_inputs
from factorlab.flops import flops_per_token
from factorlab.models import load_model, model_info
from factorlab.moe import TopKRouter, factorized_layers
from factorlab.workflows import DataSpec, load_data

SET_SIZE, SHARED, LAYERS, RIDGE = 640, 256, list(range(1, 30)), 1.0
TASKS = "hellaswag,openbookqa,winogrande,arc_easy,arc_challenge,boolq,piqa,mmlu"


def make_sets(act: torch.Tensor, wn2: torch.Tensor, rest: torch.Tensor, num_sets: int, seed: int = 0) -> torch.Tensor:
    """(C, 640) neuron ids of the C sets, from activations act (T, I) and down-row norms^2 wn2 (I,)."""
    e = act[:, rest].pow(2) * wn2[rest]
    f = F.normalize(e.sqrt(), dim=1)
    cent = f[torch.randperm(len(f), generator=torch.Generator().manual_seed(seed))[:num_sets]].clone()
    for _ in range(15):
        lab = (f @ cent.t()).argmax(1)
        for c in range(num_sets):
            if (lab == c).any():
                cent[c] = F.normalize(f[lab == c].mean(0), dim=0)
    for _ in range(15):
        score = torch.stack([e[lab == c].mean(0) if (lab == c).any() else e.mean(0) for c in range(num_sets)])
        members = score.topk(SET_SIZE, dim=1).indices  # (C, 640) into rest
        held = torch.stack([e[:, m].sum(1) for m in members], 1)  # (T, C)
        new = held.argmax(1)
        if torch.equal(new, lab):
            break
        lab = new
    return rest[members].sort(dim=1).values


def install_sets(mlp, dense_mlp, sets: torch.Tensor) -> None:
    g, u, d = dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight, dense_mlp.down_proj.weight
    mlp.gate_up = torch.nn.Parameter(torch.cat([g[sets], u[sets]], dim=1).clone(), requires_grad=False)  # (C, 2D, H)
    mlp.down = torch.nn.Parameter(d.t()[sets].clone(), requires_grad=False)  # (C, D, H)
    mlp.num_experts = sets.shape[0]
    mlp.router = TopKRouter(mlp.hidden_size, sets.shape[0], 1)
    mlp.router.linear.weight.requires_grad_(False)


def energy_labels(mlp, inputs, teacher, top_k, chunk, factor=None):
    """The set holding most of each token's output energy under the original down rows: one-hot (T, C).
    factor: the trainer's error metric (--error-metric output); these labels have none."""
    if factor is not None:
        raise ValueError("overlap_sets.py labels by energy: run it with the default error_metric")
    norms = mlp.original_norms  # (C, D)
    out = []
    with torch.no_grad():
        for x in inputs.split(chunk):
            energy = (mlp.expert_activations(x).pow(2) * norms).sum(-1)  # (t, C)
            out.append(F.one_hot(energy.argmax(1), mlp.num_experts).to(x.dtype))
    return torch.cat(out)


def refit_sets(mlp, inputs, target, ridge, chunk, weights=None):
    """Each set's down projection on its own tokens, against target minus the shared output.
    weights: the trainer's token weights (its signature since round 7); this refit has none."""
    if weights is not None:
        raise ValueError("overlap_sets.py refits without token weights: run it with the default token_weight")
    n, d = mlp.num_experts, mlp.expert_size
    gram = torch.zeros(n, d, d, dtype=torch.float64)
    cross = torch.zeros(n, d, mlp.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for x, t in zip(inputs.split(chunk), target.split(chunk)):
            chosen = mlp.router(x)[3][:, 0]
            r = t - mlp.shared_output(x)
            for c in range(n):
                rows = chosen == c
                if rows.any():
                    h = x[rows] @ mlp.gate_up[c].t()
                    a = (mlp.act_fn(h[:, :d]) * h[:, d:]).double()
                    gram[c] += a.t() @ a
                    cross[c] += a.t() @ r[rows].double()
        for c in range(n):
            if gram[c].diagonal().sum() == 0:
                continue
            lam = ridge * gram[c].diagonal().mean().clamp_min(1e-12)
            g = gram[c] + lam * torch.eye(d, dtype=torch.float64)
            mlp.down[c].copy_(torch.linalg.solve(g, cross[c] + lam * mlp.down[c].double()).float())


def main() -> None:
    num_sets, out_path = int(sys.argv[1]), Path(sys.argv[2])
    tasks = sys.argv[3] if len(sys.argv) > 3 else TASKS
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 500
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    smoke = os.environ.get("SMOKE") == "1"
    seed = int(os.environ.get("SEED", "0"))
    global LAYERS
    if smoke:
        LAYERS, tasks, limit = [1, 2], "arc_easy", 20
    tokens = 2048 if smoke else 32768
    loaded = load_model("default")
    dense, info = loaded.model, model_info(loaded.model)
    data = DataSpec(source="everyday", train_tokens=tokens, heldout_tokens=2048 if smoke else 8192, seq_len=256)
    train_ids, held = load_data(loaded, data)
    start = time.monotonic()
    calib = calibration_inputs(dense, train_ids[:64], LAYERS)  # the first 16,384 training tokens
    perms, sets = {}, {}
    with torch.no_grad():
        for i in LAYERS:
            m = dense.model.layers[i].mlp
            act = m.act_fn(m.gate_proj(calib[i])) * m.up_proj(calib[i])
            shared = _shared_neurons(act.abs(), SHARED)
            rest = _complement(shared, act.shape[1])
            perms[i] = torch.cat([shared, rest])
            sets[i] = make_sets(act, m.down_proj.weight.pow(2).sum(0), rest, num_sets, seed)
    del calib
    split_seconds = time.monotonic() - start
    partition = Partition(2, "cluster", info["intermediate_size"], perms, 0, SHARED)  # 2 x 640: the right expert width
    moe = build_moe(dense, partition, top_k=1, output_mode="gated")
    if seed:  # seed 0 keeps the generator as it was for the runs in the README
        torch.manual_seed(seed)
    for i, mlp in factorized_layers(moe).items():
        install_sets(mlp, dense.model.layers[i].mlp, sets[i])
        mlp.original_norms = mlp.down.detach().pow(2).sum(-1).clone()  # (C, D)
    par.layer_labels, par.refit_down = energy_labels, refit_sets
    cfg = par.TrainConfig(top_k=1, ridge=RIDGE, router_steps=20 if smoke else 600, seed=seed, refine_rounds=2,
                          adaptive_rounds=0)  # the top-K layer-wise pass of round 4
    result = par.train(dense, moe, train_ids, cfg, started=start)
    train_seconds = result.seconds
    heldout = evaluate.heldout_metrics(dense, moe, held)
    print(f"trained in {train_seconds:.0f} s (split {split_seconds:.0f} s); held-out {heldout}", flush=True)
    gflops = (flops_per_token(info, 512, 4, 2, LAYERS, SHARED)["total"]
              + len(LAYERS) * 2 * info["hidden_size"] * (num_sets - 4)) / 1e9  # 1R4E2K + the larger routers
    evaluate._gflops = lambda _info, _seq, moe=None, top_k=None, _active=None: gflops if moe is not None else \
        flops_per_token(info, 512)["total"] / 1e9  # (the sweep also passes the measured experts per token)
    cache_file = Path("experiments/dense_cache.json")
    cache = read_dense_cache(cache_file, "default") if cache_file.exists() else {}
    sweep = evaluate.run_sweep(dense, loaded.tokenizer, moe, tasks, [1], limit, 0, None, 16, progress=False,
                               dense_cache=cache)
    seven = {k: v for k, v in sweep["tasks"].items() if k != "mmlu"}
    out = {"setting": {"seed": seed, "num_sets": num_sets, "set_size": SET_SIZE, "shared": SHARED, "layers": "1-29",
                       "top_k": 1, "ridge": RIDGE, "train_tokens": 32768, "router_steps": 600, "refine_rounds": 2},
           "command": (f"SEED={seed} " if seed else "") + f"PYTHONPATH=. python experiments/split/overlap_sets.py {num_sets} OUT",
           "threads": torch.get_num_threads(), "train_seconds": round(train_seconds, 1),
           "split_seconds": round(split_seconds, 1), "gflops_per_token": gflops, "heldout": heldout,
           "router_label_accuracy": result.router_label_accuracy, "summary_seven": evaluate.summarize(seven), **sweep}
    out_path.write_text(json.dumps(out, indent=1, default=str))
    for task, v in sweep["tasks"].items():
        m = v["main_metric"]
        got = v["k"]["1"]
        print(f"{task}: dense {v['dense'][m]:.3f}  sets {got[m]:.3f}  above-chance {got['above_chance']}")
    print(json.dumps(out["summary_seven"]))


if __name__ == "__main__":
    main()
