"""GPU check of the library (no Gradio, no model download): run it where CUDA is available.

    python scripts/gpu_check.py [--device cuda] [--out gpu_check.json] [--quick]

A random LlamaForCausalLM with the embedded default's shapes (SmolLM2-135M: 30 layers, hidden
576, FFN 1536, 9/3 heads, vocab 49152) stands in for the model, which is not on a GPU machine
without the wheel. It checks, on the device against the CPU:

1. the cluster split (4 experts + 256 shared neurons, layers 1-29) computed on the device;
2. K = N is exact (max |logit difference| to the dense model) in float32;
3. the same factorized model gives the same logits on the device as on the CPU: top-2, per-token
   K (thresholds, min 0 experts) and the first-token path;
4. bfloat16 forward passes are finite and close to float32;
5. a short PAR training of three layers (per-token K, refits) runs with the model on the device
   and matches the CPU's per-layer errors;
6. factorlab.bench.run_benchmark on the device (float32 and bfloat16): dense vs factorized ratios.

Every check is recorded (passed, the measured numbers, or the error) in the JSON; exit status 1
if any failed. --quick: fewer repeats and tokens (for a CPU dry run of the script).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from factorlab.bench import run_benchmark  # noqa: E402
from factorlab.factorize import build_moe, make_partition  # noqa: E402
from factorlab.moe import factorized_layers  # noqa: E402
from factorlab.par import train  # noqa: E402
from factorlab.recipe import Recipe  # noqa: E402


def smollm_shaped(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def rel_diff(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this where one is, or pass --device cpu for a dry run")
        return 2
    report = {"device": str(device), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "checks": {}}
    import transformers
    report["transformers"] = transformers.__version__
    checks = report["checks"]

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
            ok = bool(out.pop("ok", True))
            checks[name] = {"ok": ok, **out}
        except Exception as exc:  # recorded, not raised: every check runs
            checks[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc()[-2000:]}
        checks[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[{'ok' if checks[name]['ok'] else 'FAIL'}] {name}: "
              f"{ {k: v for k, v in checks[name].items() if k != 'trace'} }", flush=True)

    dense_cpu = smollm_shaped()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 49152, (4, 128), generator=gen)
    ids = torch.randint(0, 49152, (2, 64), generator=gen)
    dense_dev = smollm_shaped().to(device)
    state = {}

    def split_on_device():
        part_dev = make_partition(dense_dev, 4, "cluster", layers=list(range(1, 30)), calibration_ids=calib.to(device),
                                  shared_size=256)
        part_cpu = make_partition(dense_cpu, 4, "cluster", layers=list(range(1, 30)), calibration_ids=calib, shared_size=256)
        same = sum(torch.equal(part_dev.permutations[i].cpu(), part_cpu.permutations[i]) for i in part_cpu.layers)
        state["partition"] = part_cpu
        # k-means on another device may break ties differently: report, do not require equality
        return {"layers": len(part_cpu.layers), "same_permutation_as_cpu": same}

    def exact_at_k_equal_n():
        moe = build_moe(dense_dev, state["partition"], top_k=4)
        diff = (logits(moe, ids) - logits(dense_dev, ids)).abs().max().item()
        return {"ok": diff < 1e-3, "max_abs_logit_diff": diff}

    def same_as_cpu():
        out = {}
        moe_cpu = build_moe(dense_cpu, state["partition"], top_k=2, router_seed=1)
        moe_dev = build_moe(dense_dev, state["partition"], top_k=2, router_seed=1)
        out["top2_rel_diff"] = rel_diff(logits(moe_dev, ids), logits(moe_cpu, ids))
        thresholds = torch.tensor([0.6, 0.5, 0.4, 0.0])
        for model in (moe_cpu, moe_dev):
            for m in factorized_layers(model).values():
                m.set_thresholds(thresholds, min_experts=0)
        out["per_token_k_rel_diff"] = rel_diff(logits(moe_dev, ids), logits(moe_cpu, ids))
        out["ok"] = all(v < 1e-3 for v in out.values())
        return out

    def bf16():
        moe = build_moe(dense_dev, state["partition"], top_k=2, router_seed=1)
        ref = logits(moe, ids)
        # a factorized model shares attention and embeddings with its dense model: convert a copy
        dense_bf = smollm_shaped().to(device=device, dtype=torch.bfloat16)
        moe_bf = build_moe(dense_bf, state["partition"], top_k=2, router_seed=1)
        lo = logits(moe_bf, ids)
        finite = bool(torch.isfinite(lo).all())
        # routing may flip for near-tied tokens in bfloat16: compare the argmax agreement too
        agree = (lo.argmax(-1) == ref.argmax(-1)).float().mean().item()
        return {"ok": finite, "finite": finite, "rel_diff_to_fp32": rel_diff(lo, ref), "argmax_agreement": agree}

    def training():
        rows = torch.randint(0, 49152, (8 if args.quick else 16, 128), generator=gen)
        recipe = Recipe(router_steps=30, per_token_rounds=2, per_token_router_steps=10)
        res = {}
        for name, dense in (("cpu", dense_cpu), ("device", dense_dev)):
            part = make_partition(dense_cpu, 4, "cluster", layers=[1, 2, 3], calibration_ids=calib, shared_size=256)
            moe = build_moe(dense, part, top_k=2)
            t0 = time.perf_counter()
            result = train(dense, moe, rows.to(next(dense.parameters()).device), recipe)
            res[name] = {"seconds": round(time.perf_counter() - t0, 2),
                         "layer_mse": {str(k): v for k, v in sorted(result.layer_mse.items())}}
        mse_cpu = torch.tensor(list(res["cpu"]["layer_mse"].values()))
        mse_dev = torch.tensor(list(res["device"]["layer_mse"].values()))
        res["max_rel_mse_diff"] = ((mse_dev - mse_cpu).abs() / mse_cpu).max().item()
        res["ok"] = res["max_rel_mse_diff"] < 0.05  # same recipe, different kernels: errors agree
        return res

    def bench(dtype):
        def run():
            dense = smollm_shaped().to(device=device, dtype=dtype)
            moe = build_moe(dense, state["partition"], top_k=2).to(device=device, dtype=dtype)
            result = run_benchmark(dense, moe, [1, 2, 4], prefill=128 if args.quick else 512,
                                   decode=8 if args.quick else 64, batch=2 if args.quick else 8,
                                   repeats=2 if args.quick else 5)
            return {"speedup_by_k": result["k"], "dense_median_s": {p: r["dense"]["median_s"]
                                                                   for p, r in result["raw"].items()},
                    "machine": result["machine"]}
        return run

    check("cluster_split_on_device", split_on_device)
    if "partition" not in state:  # the other checks need a partition: take the CPU's
        state["partition"] = make_partition(dense_cpu, 4, "cluster", layers=list(range(1, 30)), calibration_ids=calib,
                                            shared_size=256)
    check("exact_at_k_equal_n_fp32", exact_at_k_equal_n)
    check("device_matches_cpu_fp32", same_as_cpu)
    check("bfloat16_forward", bf16)
    check("par_training_on_device", training)
    check("bench_fp32", bench(torch.float32))
    check("bench_bf16", bench(torch.bfloat16))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [n for n, c in checks.items() if not c["ok"]]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
