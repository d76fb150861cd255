"""`python -m factorlab <command>`: the headless lab. Every command has --json."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .factorize import SHARED_CHOICES, STRATEGIES
from .moe import OUTPUT_MODES

FIRST_TOKEN = ("dense", "routed")  # --first-token: the first token of each sequence runs the whole FFN, or is routed


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _emit_json(args: argparse.Namespace, obj: dict) -> None:
    """--json alone prints to stdout; --json PATH writes the file (and says where)."""
    text = json.dumps(obj, indent=2, default=str)
    if args.json is True:
        print(text)
    else:
        Path(args.json).write_text(text)
        print(f"wrote {args.json}", file=sys.stderr)


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const=True, default=None, metavar="PATH",
                   help="machine-readable output (stdout, or written to PATH)")


def _runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default=None, help="runs folder (default: $FACTORLAB_RUNS or ./runs)")


def _fmt_flops(x: float) -> str:
    return f"{x / 1e6:10.2f} M"


# ---- info ----
def add_info(sub) -> None:
    p = sub.add_parser("info", help="model shapes (layers, hidden, FFN width, heads, vocab)")
    p.add_argument("--model", default="default", help="'default' (embedded), a Hub id or a local folder")
    _add_json(p)
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .models import load_model, model_info

    loaded = load_model(args.model)
    info = {**model_info(loaded.model), "model": args.model, "source": loaded.source,
            "load_seconds": round(loaded.load_seconds, 3)}
    if args.json:
        _emit_json(args, info)
    else:
        for k, v in info.items():
            print(f"{k:22s} {v}")
    return 0


# ---- factorize ----
def _shared_choice_arg(p) -> None:
    from .workflows import RECIPE_SHARED_CHOICE

    p.add_argument("--shared-choice", choices=SHARED_CHOICES, default=RECIPE_SHARED_CHOICE,
                   help=f"how the shared neurons are chosen on the calibration text (default {RECIPE_SHARED_CHOICE}, "
                        "the recipe): energy_share: the largest mean per-token share of the FFN's output energy "
                        "(activation^2 x |down row|^2); frequency: most often among each token's strongest quarter of "
                        "|activation| (the recipe before the fifteenth round); energy_frequency: the same by output "
                        "energy; energy_mean: the largest mean output energy")


def add_factorize(sub) -> None:
    p = sub.add_parser("factorize", help="partition each FFN into N experts, check exactness, save the run")
    p.add_argument("--model", default="default")
    p.add_argument("--experts", "-n", type=int, default=4, help="N experts (must divide the FFN width)")
    p.add_argument("--k", type=int, default=2, help="top-K experts per token stored with the run")
    p.add_argument("--split", choices=STRATEGIES, default="cluster")
    p.add_argument("--layers", default="all", help="'all' or e.g. '0-9,12'")
    p.add_argument("--output-mode", choices=OUTPUT_MODES, default="scaled")
    p.add_argument("--shared", type=int, default=0, help="always-on shared neurons per layer (0 = none)")
    _shared_choice_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="run name (saved under the runs folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_factorize)


def cmd_factorize(args) -> int:
    from .workflows import FactorizeSpec, factorize_run

    spec = FactorizeSpec(model=args.model, num_experts=args.experts, top_k=args.k, split=args.split,
                         layers=args.layers, output_mode=args.output_mode, seed=args.seed,
                         shared_size=args.shared, shared_choice=args.shared_choice)
    result = factorize_run(spec, args.name, runs_dir=args.runs_dir, overwrite=args.overwrite)
    result.pop("_moe", None)
    if args.json:
        _emit_json(args, result)
        return 0
    print(f"model        {result['model']} ({result['model_source']})")
    print(f"experts      {result['num_experts']} x {result['expert_size']} neurons "
          f"(+{result['shared_size']} shared), split={result['split']}, layers={len(result['layers'])}")
    print(f"exactness    K=N max |logit diff| vs dense = {result['max_abs_logit_diff']:.2e} "
          f"(max |logit| {result['max_abs_logit']:.1f}, {result['tokens']} tokens, fp32; "
          f"{result['max_abs_logit_diff_fp64']:.1e} in fp64; fp32 dense vs fp64 dense: "
          f"{result['dense_fp32_vs_fp64']:.1e})")
    for k, r in result["ffn_ratio_by_k"].items():
        print(f"K={k}          FFN FLOPs = {100 * r:.1f}% of dense")
    print(f"run          {result['run'] or '(not saved: pass --name)'}")
    return 0


# ---- flops ----
def add_flops(sub) -> None:
    p = sub.add_parser("flops", help="analytic FLOPs per token, dense vs factorized, by component")
    p.add_argument("--model", default="default")
    p.add_argument("--experts", "-n", type=int, default=4)
    p.add_argument("--k", type=int, default=None, help="one K (default: every K in 1..N)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", default="all")
    p.add_argument("--shared", type=int, default=0)
    p.add_argument("--first-token", choices=FIRST_TOKEN, default="routed",
                   help="dense: each sequence's first token runs the whole FFN (its cost shared over --seq-len)")
    _add_json(p)
    p.set_defaults(func=cmd_flops)


def cmd_flops(args) -> int:
    from .factorize import resolve_layers, validate_experts, validate_top_k
    from .flops import COMPONENTS, flops_per_token, flops_table, shares
    from .models import load_model, model_info

    if args.seq_len < 1:
        raise CliError("--seq-len must be at least 1")
    info = model_info(load_model(args.model).model)
    validate_experts(info["intermediate_size"], args.experts, args.shared)
    layers = resolve_layers(args.layers, info["num_layers"])
    ks = [args.k] if args.k else list(range(1, args.experts + 1))
    for k in ks:
        validate_top_k(k, args.experts)
    table = flops_table(info, args.seq_len, args.experts, ks, layers, args.shared, args.first_token == "dense")
    dense = flops_per_token(info, args.seq_len)
    if args.json:
        out = {"model": args.model, "seq_len": args.seq_len, "num_experts": args.experts, "unit": "FLOPs per token",
               "dense": {**dense, "shares": shares(dense)}, "k": table["k"]}
        if args.k:
            out["factorized"] = {c: table["k"][str(args.k)][c] for c in (*COMPONENTS, "total")}
            out["factorized"]["shares"] = table["k"][str(args.k)]["shares"]
            out["top_k"] = args.k
            out["ffn_ratio"] = table["k"][str(args.k)]["ffn_ratio"]
            out["total_ratio"] = table["k"][str(args.k)]["total_ratio"]
        _emit_json(args, out)
        return 0
    print(f"FLOPs per token at sequence length {args.seq_len} ({args.model}, {args.experts} experts)")
    header = f"{'component':18s}{'dense':>14s}" + "".join(f"{'K=' + str(k):>14s}" for k in ks)
    print(header)
    for c in (*COMPONENTS, "total"):
        print(f"{c:18s}{_fmt_flops(dense[c]):>14s}" + "".join(f"{_fmt_flops(table['k'][str(k)][c]):>14s}" for k in ks))
    print(f"{'FFN vs dense':18s}{'100.0%':>14s}" + "".join(f"{100 * table['k'][str(k)]['ffn_ratio']:13.1f}%" for k in ks))
    print(f"{'total vs dense':18s}{'100.0%':>14s}" + "".join(f"{100 * table['k'][str(k)]['total_ratio']:13.1f}%" for k in ks))
    return 0


# ---- train ----
def add_train(sub) -> None:
    from .par import E2E_PARAMS, ERROR_METRICS, LABEL_LOSSES, MODES, TARGETS, TOKEN_WEIGHTS, TrainConfig
    from .workflows import RECIPE_LAYERS, DataSpec

    p = sub.add_parser("train", help="factorize + PAR training + held-out metrics, saved as a run")
    p.add_argument("name", help="run name")
    p.add_argument("--model", default="default")
    p.add_argument("--experts", "-n", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--split", choices=STRATEGIES, default="cluster",
                   help="cluster (default): co-activation groups; coverage: cluster refined so each token's best "
                        "K experts hold more of its output (measured on the default model: K=2 lower held-out "
                        "perplexity but not better benchmarks; K=1 much worse perplexity; see README)")
    p.add_argument("--layers", default=RECIPE_LAYERS,
                   help=f"layers to factorize (default {RECIPE_LAYERS!r}: every layer but 0, the recipe; 'all' for every layer)")
    p.add_argument("--output-mode", choices=OUTPUT_MODES, default="scaled")
    p.add_argument("--shared", type=int, default=256,
                   help="always-on shared neurons per layer (default 256: the best recipe measured; 0 = pure N experts)")
    _shared_choice_arg(p)
    p.add_argument("--first-token", choices=FIRST_TOKEN, default="routed",
                   help="dense: each sequence's first token (the attention sink, with outputs up to ~800x the "
                        "others in some layers) runs the whole FFN and is left out of routing and refits (measured: "
                        "slightly lower held-out perplexity, worse benchmarks with per-token K; see README)")
    p.add_argument("--layer-k", default="uniform",
                   help="per-layer K: uniform (default) | auto (the same total K, moved to the layers whose measured "
                        "error gains most; measured worse than uniform on the default model, see README) | LAYERS=K "
                        "entries such as '3-6=3;2,11=1' (the rest at --k)")
    p.add_argument("--mode", choices=MODES, default="experts",
                   help="experts: router + least-squares expert refit (default); router: routers only; "
                        "none: untrained router (FactorLLM's Ex0)")
    p.add_argument("--tokens", type=int, default=DataSpec.train_tokens, help="training tokens")
    p.add_argument("--heldout-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget from the split on: gradient phases stop at it and end-to-end "
                        "distillation fits its schedule into it")
    p.add_argument("--data", default="builtin", help="builtin (= everyday) | everyday | local | selfgen | a mix of built-ins (everyday+selfgen) | "
                        "PATH(.txt/.jsonl) | hub:ID[:config]")
    p.add_argument("--router-steps", type=int, default=TrainConfig.router_steps)
    p.add_argument("--refine-rounds", type=int, default=TrainConfig.refine_rounds,
                   help="after the refit: relabel with the best joint K experts, retrain the router, refit again")
    p.add_argument("--adaptive-rounds", type=int, default=TrainConfig.adaptive_rounds,
                   help="per-token K at the same mean: after the refine rounds, this many rounds of (best sets "
                        "of experts per token -> router -> thresholds -> refit); 0 = fixed top-K")
    p.add_argument("--adaptive-router-steps", type=int, default=TrainConfig.adaptive_router_steps,
                   help="router Adam steps in each per-token round (it starts from the last round's router); "
                        "default: a third of --router-steps (200)")
    p.add_argument("--adaptive-min-experts", type=int, choices=(0, 1), default=TrainConfig.adaptive_min_experts,
                   help="per-token K: 1 = every token runs at least its best expert; 0 = a token may run none "
                        "(only the shared neurons); default: 0 with shared neurons, 1 without")
    p.add_argument("--label-loss", choices=LABEL_LOSSES, default="kl")
    p.add_argument("--ridge", type=float, default=TrainConfig.ridge,
                   help="least-squares refit regulariser (relative to the mean diagonal of the Gram matrix)")
    p.add_argument("--target", choices=TARGETS, default="teacher")
    p.add_argument("--token-weight", choices=TOKEN_WEIGHTS, default=TrainConfig.token_weight,
                   help="how each token's error counts in the refits and per-token sets: none = squared error; "
                        "residual = relative to the token's residual stream (attention sinks do not dominate)")
    p.add_argument("--error-metric", choices=ERROR_METRICS, default=TrainConfig.error_metric,
                   help="the error that picks each token's experts (router labels, per-token sets): plain = squared "
                        "error of the FFN output; output = as the dense model's next-token distribution feels it "
                        "(its Fisher information at the layer's FFN output; the refits stay plain; measured: lower "
                        "held-out KL, not better benchmarks; see README)")
    p.add_argument("--metric-tokens", type=int, default=TrainConfig.metric_tokens,
                   help="training tokens that estimate the output metric (--error-metric output)")
    p.add_argument("--gate-up-steps", type=int, default=0,
                   help="Adam steps per layer on the experts' gate/up (and down) after the refit; the down "
                        "projections are refitted once more after them")
    p.add_argument("--gate-up-lr", type=float, default=TrainConfig.gate_up_lr)
    p.add_argument("--e2e-steps", type=int, default=TrainConfig.e2e_steps,
                   help="end-to-end logit distillation (KL to the dense model) after the layer-wise pass: most steps")
    p.add_argument("--e2e-minutes", type=float, default=TrainConfig.e2e_minutes,
                   help="fit the end-to-end schedule into this many minutes (fewer steps if they do not fit)")
    p.add_argument("--e2e-lr", type=float, default=TrainConfig.e2e_lr)
    p.add_argument("--e2e-batch", type=int, default=TrainConfig.e2e_batch, help="sequences per end-to-end step")
    p.add_argument("--e2e-params", choices=E2E_PARAMS, default=TrainConfig.e2e_params,
                   help="what end-to-end distillation tunes: all expert weights, or the down projections only")
    p.add_argument("--eval-k", default=None, help="K values for held-out metrics, e.g. 1,2,3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda, cuda:1, ...: where to train (the text is prepared on the CPU; "
                        "an H200 trained the default recipe in 103 s, see README)")
    p.add_argument("--overwrite", action="store_true")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_train)


def _device(name: str):
    """A torch.device from --device, with a clear error where it is not usable here."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CliError(f"--device {name}: not a device name ({exc}); use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0")
    return device


def train_specs(args) -> tuple:
    """(FactorizeSpec, TrainConfig, DataSpec) of parsed `train` arguments: what `train` runs."""
    from .par import TrainConfig
    from .workflows import DataSpec, FactorizeSpec

    spec = FactorizeSpec(model=args.model, num_experts=args.experts, top_k=args.k, split=args.split,
                         layers=args.layers, output_mode=args.output_mode, seed=args.seed, shared_size=args.shared,
                         shared_choice=args.shared_choice, first_token_dense=args.first_token == "dense", layer_k=args.layer_k)
    cfg = TrainConfig(mode=args.mode, top_k=args.k, router_steps=args.router_steps, refine_rounds=args.refine_rounds,
                      label_loss=args.label_loss, ridge=args.ridge, adaptive_rounds=args.adaptive_rounds,
                      adaptive_min_experts=args.adaptive_min_experts,
                      adaptive_router_steps=args.adaptive_router_steps,
                      target=args.target, token_weight=args.token_weight,
                      error_metric=args.error_metric, metric_tokens=args.metric_tokens,
                      gate_up_steps=args.gate_up_steps, gate_up_lr=args.gate_up_lr,
                      e2e_steps=args.e2e_steps,
                      e2e_minutes=args.e2e_minutes, e2e_lr=args.e2e_lr, e2e_batch=args.e2e_batch,
                      e2e_params=args.e2e_params, minutes=args.minutes, seed=args.seed)
    data = DataSpec(args.data, args.tokens, args.heldout_tokens, args.seq_len)
    return spec, cfg, data


def cmd_train(args) -> int:
    from tqdm import tqdm

    from .workflows import train_run

    spec, cfg, data = train_specs(args)
    device = _device(args.device)
    eval_ks = [int(k) for k in args.eval_k.split(",")] if args.eval_k else None
    bar = tqdm(total=None, desc="train", unit="step", disable=bool(args.json) and args.json is True)

    def progress(rec: dict) -> None:
        if rec.get("total") and bar.total != rec["total"]:
            bar.total = rec["total"]
        if "step" in rec:
            bar.n = rec["step"]
        losses = {k: f"{v:.4g}" for k, v in (rec.get("losses") or {}).items() if isinstance(v, float)}
        bar.set_postfix(phase=rec.get("phase"), layer=rec.get("layer"), **losses)
        bar.refresh()

    result = train_run(spec, cfg, data, args.name, runs_dir=args.runs_dir, progress=progress,
                       overwrite=args.overwrite, eval_ks=eval_ks, device=device)
    bar.close()
    result.pop("_moe", None)
    if args.json:
        _emit_json(args, result)
        return 0
    print(f"run {result['run']}: trained in {result['seconds']:.1f} s on {result['tokens']} tokens "
          f"(router label accuracy {result['train'].get('mean_router_label_accuracy') or float('nan'):.3f})")
    print(f"{'K':>3s} {'ppl':>10s} {'dense ppl':>10s} {'agreement':>10s} {'KL':>8s}   (held-out text)")
    for k, h in result["heldout_by_k"].items():
        if h:
            print(f"{k:>3s} {h['perplexity']:10.2f} {h['dense_perplexity']:10.2f} {h['agreement']:10.3f} {h['kl']:8.3f}")
    return 0


# ---- experiment ----
def add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="run a resumable grid: factorize -> train -> evaluate, one row per setting")
    p.add_argument("--config", required=True, help="grid config JSON (see factorlab/experiment.py)")
    p.add_argument("--json", required=True, metavar="PATH", help="results file (rows already there are skipped)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only rows I, I+N, I+2N, ... (0-based), e.g. 0/2 and 1/2 in two processes with two --json files")
    p.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    from .experiment import run_experiment, table

    path = Path(args.config)
    if not path.exists():
        raise CliError(f"config file {path} not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"config file {path} is not valid JSON: {exc}") from exc
    shard = None
    if args.shard:
        try:
            index, count = (int(x) for x in args.shard.split("/"))
            if not 0 <= index < count:
                raise ValueError
        except ValueError:
            raise CliError(f"--shard must be I/N with 0 <= I < N, e.g. 0/2; got {args.shard!r}") from None
        shard = (index, count)
    done = run_experiment(config, args.json, shard=shard, progress=lambda r: print(f"row {r['row']}/{r['rows']}: {r['setting']}",
                                                                      file=sys.stderr))
    print(f"{'label':28s} {'K':>2s} {'train s':>8s} {'ppl':>9s} {'agree':>6s} {'rel%':>6s} {'abv%':>6s}")
    for line in table(done["rows"]):
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{line['label'][:28]:28s} {line['K']:>2s} {f(line['train_s'], '8.1f')} {f(line['ppl'], '9.2f')} "
              f"{f(line['agreement'], '6.3f')} {f(line['relative'] and 100 * line['relative'], '6.1f')} "
              f"{f(line['above_chance'] and 100 * line['above_chance'], '6.1f')}")
    return 0


# ---- runs ----
def add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list runs (corrupt ones are marked), or delete one")
    p.add_argument("--delete", default=None, metavar="NAME")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_runs)


def cmd_runs(args) -> int:
    from .runs import delete_run, list_runs

    if args.delete:
        delete_run(args.delete, args.runs_dir)
    runs = list_runs(args.runs_dir)
    if args.json:
        _emit_json(args, {"runs": [{"name": r.name, "path": str(r.path), "ok": r.ok, "error": r.error,
                                    "config": r.config, "metrics": r.metrics} for r in runs]})
        return 0
    for r in runs:
        if r.ok:
            c = r.config
            print(f"{r.name:24s} {c.get('model')}  {c.get('num_experts')}E{c.get('top_k')}K "
                  f"split={c.get('split')} mode={c.get('mode')}")
        else:
            print(f"{r.name:24s} CORRUPT: {r.error}")
    if not runs:
        print("no runs yet: create one with `python -m factorlab factorize --name NAME`")
    return 0


# ---- eval ----
def add_eval(sub) -> None:
    from .tasks import TASK_NAMES

    p = sub.add_parser("eval", help="benchmarks scored like lm-evaluation-harness: dense vs a run at each K")
    p.add_argument("name", nargs="?", default=None, help="run name (omit with --dense-only)")
    p.add_argument("--tasks", default="all", help=f"comma-separated, or 'all' ({', '.join(TASK_NAMES)})")
    p.add_argument("--k", default=None, help="K values, e.g. '1,2,4', or 'all' (default: the run's K)")
    p.add_argument("--limit", type=int, default=None, help="a seeded fixed subset of this many items per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--data-dir", default=None, help="a folder with one sub-folder per task "
                   "(a saved dataset or .jsonl files with the Hub's field names)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per forward")
    p.add_argument("--dense-only", action="store_true", help="score the dense model alone (no run)")
    p.add_argument("--model", default=None, help="with --dense-only: the model to score (default: 'default')")
    p.add_argument("--no-store", action="store_true", help="do not merge the results into the run's metrics.json")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_eval)


def _parse_ks(text: str | None, default: int, num_experts: int) -> list[int]:
    from .factorize import validate_top_k

    if text is None:
        return [default]
    if text.strip() == "all":
        return list(range(1, num_experts + 1))
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise CliError(f"--k takes integers separated by commas, or 'all' (got {text!r})") from None
    for k in ks:
        validate_top_k(k, num_experts)
    return ks


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _print_sweep(sweep: dict) -> None:
    print("scores, standard errors (±) and ratios in %; relative = factorized / dense on the main metric")
    for name, t in sweep["tasks"].items():
        print(f"{name}: n={t['n']} ({t['split']}, {t['source']}), chance {_pct(t['chance'])}%, "
              f"main metric {t['main_metric']}")
        print(f"  {'model':7s}{'acc':>7s}{'±':>6s}{'acc_norm':>10s}{'±':>6s}{'relative':>10s}{'rel.acc':>9s}"
              f"{'above-ch.':>11s}{'GFLOP/tok':>11s}{'s':>7s}")
        rows = [("dense", t["dense"])] + [(f"K={k}", r) for k, r in t["k"].items()]
        for label, r in rows:
            print(f"  {label:7s}{_pct(r['acc']):>7s}{_pct(r['stderr']['acc']):>6s}{_pct(r['acc_norm']):>10s}"
                  f"{_pct(r['stderr']['acc_norm']):>6s}{_pct(r.get('relative')):>10s}{_pct(r.get('relative_acc')):>9s}"
                  f"{_pct(r.get('above_chance')):>11s}{r['gflops_per_token']:>11.3f}{r['seconds']:>7.1f}")
    for k, s in sweep["summary"]["k"].items():
        excluded = ", ".join(s["above_chance_excluded"]) or "none"
        ci = s.get("ci95") or {}
        print(f"K={k}: mean relative {_pct(s['relative_capped'])}%{_interval(ci.get('relative_capped'))} (each task "
              f"capped at 100%; uncapped {_pct(s['relative'])}%), above-chance retention "
              f"{_pct(s['above_chance'])}%{_interval(ci.get('above_chance'))} over {len(s['above_chance_tasks'])} "
              f"tasks (left out, dense within 2 s.e. of chance: {excluded})")
    if any(s.get("ci95") for s in sweep["summary"]["k"].values()):
        print("[a, b]: 95% paired bootstrap interval over the items (the same resampled items for dense and "
              "factorized)")


def _interval(ci: list[float] | None) -> str:
    return "" if not ci else f" [{_pct(ci[0])}, {_pct(ci[1])}]"


def cmd_eval(args) -> int:
    from .evaluate import run_sweep, store_eval
    from .models import load_model
    from .moe import factorized_layers
    from .runs import load_moe, load_run
    from .tasks import parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.dense_only:
        loaded, moe, ks, run = load_model(args.model or "default"), None, [], None
    elif not args.name:
        raise CliError("give a run NAME, or --dense-only to score the dense model alone")
    elif args.model:
        raise CliError("--model goes with --dense-only; a run is scored with the model it was made from")
    else:
        run = load_run(args.name, args.runs_dir)
        loaded = load_model(run.config["model"])
        moe = load_moe(run, loaded.model)
        num_experts = next(iter(factorized_layers(moe).values())).num_experts
        ks = _parse_ks(args.k, run.config.get("top_k", 1), num_experts)
    sweep = run_sweep(loaded.model, loaded.tokenizer, moe, tasks, ks, args.limit, args.seed, args.data_dir,
                      args.batch_size, progress=sys.stderr.isatty())
    sweep["model"] = run.config["model"] if run else (args.model or "default")
    sweep["run"] = run.name if run else None
    if run and not args.no_store:
        store_eval(run.name, sweep, args.runs_dir)
    if args.json:
        _emit_json(args, sweep)
    else:
        _print_sweep(sweep)
    return 0


# ---- bench ----
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="wall-clock speed, dense vs factorized: FFN, prefill, decode, batched prefill")
    p.add_argument("name", nargs="?", default=None, help="run name (or --experts N: a fresh contiguous split)")
    p.add_argument("--model", default="default", help="without a run: the model to factorize")
    p.add_argument("--experts", "-n", type=int, default=None,
                   help="without a run: N experts over every layer, contiguous split, untrained router")
    p.add_argument("--k", default="all", help="K values, e.g. '1,2', or 'all' (default)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurements")
    p.add_argument("--decode", type=int, default=64, help="greedy tokens per decode sample (0 skips decode)")
    p.add_argument("--batch", type=int, default=8, help="sequences in the batched prefill (0 skips it)")
    p.add_argument("--repeats", type=int, default=5, help="alternating repetitions per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-store", action="store_true", help="do not store the results in the run's metrics.json")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    from .bench import format_report, run_benchmark
    from .factorize import build_moe, make_partition
    from .models import load_model
    from .moe import factorized_layers
    from .runs import load_moe, load_run, update_metrics

    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = None
    if args.name:
        run = load_run(args.name, args.runs_dir)
        loaded = load_model(run.config["model"])
        moe = load_moe(run, loaded.model)
    elif args.experts:
        loaded = load_model(args.model)
        moe = build_moe(loaded.model, make_partition(loaded.model, args.experts, "contiguous"), top_k=1)
    else:
        raise CliError("give a run NAME, or --experts N to benchmark a fresh contiguous split of --model")
    dtype = getattr(torch, args.dtype)
    dense = loaded.model.to(device=device, dtype=dtype)
    moe = moe.to(device=device, dtype=dtype)
    num_experts = next(iter(factorized_layers(moe).values())).num_experts
    ks = _parse_ks(args.k, 1, num_experts)
    result = run_benchmark(dense, moe, ks, prefill=args.prefill, decode=args.decode, batch=args.batch,
                           repeats=args.repeats, progress=lambda p: logging.getLogger(__name__).info(
                               "bench %(phase)s %(step)d/%(total)d", p))
    result["model"] = run.config["model"] if run else args.model
    result["run"] = run.name if run else None
    if run and not args.no_store:
        update_metrics(run.name, {"bench": result}, args.runs_dir)
    if args.json:
        _emit_json(args, result)
    else:
        print(format_report(result))
    return 0


PARSERS = [add_info, add_factorize, add_flops, add_train, add_experiment, add_runs, add_eval, add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m factorlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models import ModelLoadError
    from .runs import RunError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        code = args.func(args)
    except (CliError, ModelLoadError, RunError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    logging.getLogger(__name__).info("%s took %.1f s", args.command, time.perf_counter() - start)
    return code
