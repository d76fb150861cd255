"""The CLI's measuring commands: eval, bench, fidelity, export and atlas (the parser and `main` are in cli.py)."""
from __future__ import annotations

import logging
import sys

from .cli import CliError, _add_json, _device, _emit_json, _parse_ks, _runs_dir


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
    p.add_argument("--split", default=None, help="the split to score, e.g. test (default: each task's own, "
                   "validation for most; with --data-dir, the split its files hold)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per forward")
    p.add_argument("--dense-only", action="store_true", help="score the dense model alone (no run)")
    p.add_argument("--model", default=None, help="with --dense-only: the model to score (default: 'default')")
    p.add_argument("--no-store", action="store_true", help="do not merge the results into the run's metrics.json")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_eval)


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
    from .evaluate import run_sweep
    from .models import load_model
    from .runs import load_run
    from .tasks import parse_tasks
    from .workflows import evaluate_run

    tasks = parse_tasks(args.tasks)
    if args.dense_only:
        if args.name:
            raise CliError("--dense-only scores the dense model alone: drop the run name")
        loaded = load_model(args.model or "default")
        sweep = run_sweep(loaded.model, loaded.tokenizer, None, tasks, [], limit=args.limit, seed=args.seed,
                          data_dir=args.data_dir, split=args.split, batch_size=args.batch_size,
                          progress=sys.stderr.isatty())
        sweep["model"], sweep["run"] = args.model or "default", None
    elif not args.name:
        raise CliError("give a run NAME, or --dense-only to score the dense model alone")
    elif args.model:
        raise CliError("--model goes with --dense-only; a run is scored with the model it was made from")
    else:
        recipe = load_run(args.name, args.runs_dir).recipe
        ks = _parse_ks(args.k, recipe.top_k, recipe.num_experts)
        sweep = evaluate_run(args.name, tasks, ks, limit=args.limit, seed=args.seed, data_dir=args.data_dir,
                             split=args.split, batch_size=args.batch_size, runs_dir=args.runs_dir,
                             store=not args.no_store, progress=sys.stderr.isatty())
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
    from .runs import load_run
    from .workflows import bench_run

    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(p: dict) -> None:
        logging.getLogger(__name__).info("bench %(phase)s %(step)d/%(total)d", p)

    if args.name:
        if args.experts:
            raise CliError("--experts benchmarks a fresh split of --model: give it without a run name")
        recipe = load_run(args.name, args.runs_dir).recipe
        result = bench_run(args.name, _parse_ks(args.k, 1, recipe.num_experts), prefill=args.prefill,
                           decode=args.decode, batch=args.batch, repeats=args.repeats, device=device, dtype=dtype,
                           runs_dir=args.runs_dir, store=not args.no_store, progress=progress)
    elif args.experts:
        loaded = load_model(args.model)
        moe = build_moe(loaded.model, make_partition(loaded.model, args.experts, "contiguous"), top_k=1)
        result = run_benchmark(loaded.model.to(device=device, dtype=dtype), moe.to(device=device, dtype=dtype),
                               _parse_ks(args.k, 1, args.experts), prefill=args.prefill, decode=args.decode,
                               batch=args.batch, repeats=args.repeats, progress=progress)
        result["model"], result["run"] = args.model, None
    else:
        raise CliError("give a run NAME, or --experts N to benchmark a fresh contiguous split of --model")
    if args.json:
        _emit_json(args, result)
    else:
        print(format_report(result))
    return 0


# ---- export ----
def add_export(sub) -> None:
    from .export import FORMATS

    p = sub.add_parser("export", help="write a run as a standard transformers MoE checkpoint (loads without custom "
                                      "code), checked against the run")
    p.add_argument("name", help="run name")
    p.add_argument("out_dir", help="the folder to write (config, safetensors, tokenizer + chat template, README card)")
    p.add_argument("--format", default=FORMATS[0], choices=FORMATS, dest="fmt",
                   help="the transformers class: qwen2_moe (dense layers stay dense; default) or granitemoeshared")
    p.add_argument("--k", type=int, default=None,
                   help="the K to export (default: the run's K; per-token K runs: the nearest fixed K, approximate)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    p.add_argument("--no-store", action="store_true", help="do not record the export in the run's metrics.json")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload the folder to this Hub repo "
                                                                       "(owner/name; needs the Hub and a token)")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import check_repo_id, push_to_hub
    from .workflows import export_run

    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # a typo fails before the export, not after it
    command = " ".join(["python -m factorlab export", args.name, args.out_dir, "--format", args.fmt] +
                       (["--k", str(args.k)] if args.k else []))
    s = export_run(args.name, args.out_dir, fmt=args.fmt, top_k=args.k, runs_dir=args.runs_dir,
                   store=not args.no_store, overwrite=args.overwrite, command=command)
    if args.json:
        _emit_json(args, s)
    else:
        plan, check, size = s["plan"], s["check"], s["size"]
        print(f"exported {s['run']} to {s['folder']} as {s['class']} at K={plan['top_k']}: "
              f"{'EXACT' if plan['exact'] else 'APPROXIMATE'}")
        print(f"  routing: {plan['routing']}")
        for note in plan["notes"]:
            print(f"  note: {note}")
        print(f"  loaded back as {check['loaded_class']} (plain transformers, no remote code): max |logit diff| vs the "
              f"factorlab model at K={plan['top_k']} = {check['max_abs_logit_diff']:.2e} on {check['tokens']} tokens; "
              f"greedy reply {'identical' if check['greedy_same'] else 'DIFFERENT'}")
        a = s["approximation"]
        if a:
            print(f"  vs the run (per-token K) on {a['tokens']} held-out tokens: perplexity {a['run']['perplexity']:.2f}"
                  f" -> {a['export']['perplexity']:.2f} (dense {a['dense_perplexity']:.2f}), agreement with dense "
                  f"{a['run']['agreement']:.3f} -> {a['export']['agreement']:.3f}, same top-1 as the run on "
                  f"{100 * a['vs_run']['agreement']:.1f}% of tokens")
        elif not plan["exact"]:
            print("  the run has no held-out text (heldout_tokens 0): the approximation was not measured")
        print(f"  parameters {size['export_parameters']:,} (dense {size['dense_parameters']:,}); safetensors "
              f"{size['export_bytes'] / 2**20:,.1f} MiB (dense fp32 tensors {size['dense_bytes'] / 2**20:,.1f} MiB); "
              f"{s['flops']['export']['total'] / 1e9:.3f} GFLOPs/token (dense {s['flops']['dense']['total'] / 1e9:.3f})")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(s['folder'], args.push_to_hub)}")
    return 0


# ---- atlas ----
def add_atlas(sub) -> None:
    p = sub.add_parser("atlas", help="the expert atlas of a run: what each expert handles and what removing it costs "
                                     "(stored with the run)")
    p.add_argument("name", help="run name")
    p.add_argument("--text", default=None, metavar="FILE", help="a .txt/.jsonl file added to the corpus as a domain")
    p.add_argument("--stored", action="store_true", help="show the stored atlas instead of computing it again")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-store", action="store_true", help="do not store the atlas in the run's folder")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_atlas)


def cmd_atlas(args) -> int:
    import torch

    from .workflows import atlas_run, stored_atlas

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stored:
        atlas = stored_atlas(args.name, args.runs_dir)
        if atlas is None:
            raise CliError(f"run {args.name!r} has no stored atlas: run `python -m factorlab atlas {args.name}`")
    else:
        def progress(rec: dict) -> None:
            logging.getLogger(__name__).info("atlas %s", rec.get("message"))

        atlas = atlas_run(args.name, runs_dir=args.runs_dir, upload=args.text, store=not args.no_store,
                          progress=progress)
    if args.json:
        _emit_json(args, atlas)
        return 0
    t, spec = atlas["timing"], atlas["specialisation"]
    print(f"atlas of {atlas['run']}: {len(atlas['layers'])} layers x {atlas['num_experts']} experts, "
          f"{t['seconds'] + t.get('setup_seconds', 0):.0f} s ({t['ablation_forwards']} ablations, {t['threads']} threads)")
    print("corpus: " + ", ".join(f"{d['name']} {d['tokens']} tokens ({d['ablation_tokens']} for ablations)"
                                 for d in atlas["domains"]))
    for name, v in sorted(spec.items(), key=lambda kv: kv[0] == "difference"):  # the routers, then their difference
        if isinstance(v, dict) and "mi_bits" in v:
            print(f"I(domain; top-1 expert) {name:>16}: {v['mi_bits']:+.4f} bits (95% CI {v['mi_ci95'][0]:+.4f} "
                  f"to {v['mi_ci95'][1]:+.4f})")
    print("costliest removals (delta next-token loss, nats/token):")
    for r in atlas["ranking"][:10]:
        what = "shared block" if r["target"] == "shared" else f"expert {r['target']}"
        print(f"  layer {r['layer']:>2} {what:<13} {r['delta']:+.4f} +- {r['stderr'] or 0:.4f}")
    return 0


# ---- fidelity ----
def add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="chat fidelity: does the run answer the shipped chat prompts like the dense "
                       "model? (agreement, KL, NLL gap, identical replies; per K, with intervals)")
    p.add_argument("name", help="run name")
    p.add_argument("--k", default="all", help="K values, e.g. '1,2', or 'all' (default: 1..N)")
    p.add_argument("--examples", type=int, default=0, metavar="P", help="also print the first P prompts' replies")
    p.add_argument("--no-store", action="store_true", help="do not store the results in the run's metrics.json")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_fidelity)


def cmd_fidelity(args) -> int:
    from .runs import load_run
    from .workflows import fidelity_run

    recipe = load_run(args.name, args.runs_dir).recipe
    ks = _parse_ks(args.k, recipe.top_k, recipe.num_experts)

    def progress(what: str, fraction: float) -> None:
        logging.getLogger(__name__).info("fidelity %3.0f%% %s", 100 * fraction, what)

    result = fidelity_run(args.name, ks, runs_dir=args.runs_dir, store=not args.no_store, progress=progress)
    if args.json:
        _emit_json(args, result)
        return 0
    s = result["settings"]
    print(f"chat fidelity of {args.name}: {s['prompts']} shipped prompts, greedy replies of up to {s['reply_tokens']} "
          f"tokens; 95% bootstrap intervals over prompts")
    print(f"{'K':>3} {'agreement':>22} {'KL nats/token':>22} {'NLL gap':>22}   identical first "
          + " / ".join(str(p) for p in s["prefixes"]) + " tokens")
    for k, m in result["by_k"].items():
        def f(name: str, scale: float = 1.0, fmt: str = ".3f") -> str:
            lo, hi = m[f"{name}_ci"]
            return f"{m[name] * scale:{fmt}} [{lo * scale:{fmt}}, {hi * scale:{fmt}}]"
        same = " / ".join(f"{100 * m['identical'][str(p)]:.0f}%" for p in s["prefixes"])
        print(f"{k:>3} {f('agreement', 100, '.1f'):>22} {f('kl'):>22} {f('nll_gap'):>22}   {same}")
    print("agreement, KL: the run read the dense model's own greedy replies (teacher forcing); NLL gap: the dense "
          "model's NLL/token of the run's greedy replies minus of its own")
    for i in range(min(args.examples, s["prompts"])):
        print(f"\n> {result['prompts'][i]['prompt']}\n  dense: {result['dense']['replies'][i]!r}")
        for k in result["replies"]:
            print(f"  K={k}: {result['replies'][k][i]!r}")
    return 0
