"""`python -m factorlab <command>`: the headless lab. Every command has --json.

Settings are one factorlab.recipe.Recipe: `train`/`factorize` start from a preset (`--preset`, default
`default`: the measured recipe), take `--set KEY=VALUE` for any field and a few everyday flags
generated from the Recipe's fields. `python -m factorlab recipe` prints every field with what it does.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .recipe import PRESETS, Recipe, field_type, parse_assignments, preset, recipe_fields


class CliError(Exception):
    """A user error with a message that says what to do."""


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
    p.add_argument("--runs-dir", default=None,
                   help="runs folder (default: $FACTORLAB_RUNS, else /data/runs where /data is writable, else ./runs)")


def _fmt_flops(x: float) -> str:
    return f"{x / 1e6:10.2f} M"


def _parse_ks(text: str | None, default: int, num_experts: int) -> list[int]:
    """--k / --eval-k: 'all', or K values separated by commas, each in 1..N."""
    if text is None:
        return [default]
    if text.strip() == "all":
        return list(range(1, num_experts + 1))
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise CliError(f"K values are integers separated by commas, or 'all' (got {text!r})") from None
    bad = [k for k in ks if not 1 <= k <= num_experts]
    if bad or not ks:
        raise CliError(f"K values must be in 1..{num_experts} (the run's N), got {text!r}")
    return ks


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



# ---- the recipe on the command line ----
def _add_preset_and_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="the recipe to start from (default: default, the measured recipe); "
                        "`python -m factorlab recipe --preset P` shows one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                   help="any recipe field, e.g. --set router_steps=300 (repeatable; `python -m factorlab recipe` "
                        "lists them)")


def _add_recipe(p: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """--preset, --set KEY=VALUE and the everyday flags of these Recipe sections (None: all), generated
    from the fields' metadata. Flags default to None: only what the user typed changes the preset."""
    _add_preset_and_set(p)
    defaults = Recipe()
    for f in recipe_fields(everyday=True):
        if sections and f.metadata["section"] not in sections and f.name not in ("seed", "data"):
            continue
        kind = field_type(f)
        p.add_argument(f.metadata["flag"], dest=f"recipe_{f.name}", default=None, metavar=None if f.metadata["choices"]
                       else kind.__name__.upper(), type=kind, choices=f.metadata["choices"],
                       help=f"{f.metadata['help']} (default {_shown(getattr(defaults, f.name))})")


def _shown(value) -> str:
    return "none" if value is None else json.dumps(value)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The Recipe a command line asks for: the preset, then --set, then the everyday flags."""
    changes = parse_assignments(args.assignments)
    for name, value in vars(args).items():
        if name.startswith("recipe_") and value is not None:
            field = name.removeprefix("recipe_")
            if field in changes and changes[field] != value:
                raise CliError(f"{field} is set twice (--set {field}={changes[field]} and its flag {value}): "
                               "give it once")
            changes[field] = value
    return preset(args.preset, **changes)


def add_recipe(sub) -> None:
    p = sub.add_parser("recipe", help="print a recipe: every setting, its value and what it does")
    _add_preset_and_set(p)
    _add_json(p)
    p.set_defaults(func=cmd_recipe)


def cmd_recipe(args) -> int:
    recipe = preset(args.preset, **parse_assignments(args.assignments))
    if args.json:
        _emit_json(args, recipe.to_dict())
        return 0
    name = recipe.preset_name()
    print(f"# recipe: {name + ' (preset)' if name else 'preset ' + args.preset + ', changed'}")
    for n, (text, _) in PRESETS.items():
        print(f"# preset {n}: {text}")
    print("# change a field: train NAME --set KEY=VALUE (everyday ones also have a flag: train --help)")
    for line in recipe.describe():
        print(line)
    return 0


# ---- factorize ----
def add_factorize(sub) -> None:
    p = sub.add_parser("factorize", help="partition each FFN into N experts (a recipe's split), check exactness, "
                                         "optionally save the run (untrained router)")
    _add_recipe(p, ("factorize",))
    p.add_argument("--name", default=None, help="save as a run of this name (default: nothing is saved)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_factorize)


def cmd_factorize(args) -> int:
    from .workflows import factorize_run

    result = factorize_run(recipe_from_args(args), name=args.name, runs_dir=args.runs_dir, overwrite=args.overwrite)
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
        print(f"K={k}          FFN FLOPs = {100 * r:.1f}% of dense (every token at its top K)")
    print(f"run          {result['run'] or '(not saved: pass --name)'}")
    return 0


# ---- flops ----
def add_flops(sub) -> None:
    p = sub.add_parser("flops", help="analytic FLOPs per token of a recipe's shape, dense vs factorized, by component")
    _add_recipe(p, ("factorize",))
    p.add_argument("--seq-len", type=int, default=512, help="context length the attention is counted at")
    _add_json(p)
    p.set_defaults(func=cmd_flops)


def cmd_flops(args) -> int:
    from .flops import COMPONENTS, flops_per_token, flops_table, shares
    from .models import load_model, model_info

    if args.seq_len < 1:
        raise CliError("--seq-len must be at least 1")
    recipe = recipe_from_args(args)
    info = model_info(load_model(recipe.model).model)
    layers = recipe.validate(info)
    one_k = args.recipe_top_k is not None or any(a.startswith("top_k=") for a in args.assignments)
    ks = [recipe.top_k] if one_k else list(range(1, recipe.num_experts + 1))
    table = flops_table(info, args.seq_len, recipe.num_experts, ks, layers, recipe.shared_size)
    dense = flops_per_token(info, args.seq_len)
    if args.json:
        out = {"model": recipe.model, "seq_len": args.seq_len, "num_experts": recipe.num_experts,
               "shared_size": recipe.shared_size, "layers": layers, "unit": "FLOPs per token",
               "dense": {**dense, "shares": shares(dense)}, "k": table["k"]}
        _emit_json(args, out)
        return 0
    print(f"FLOPs per token at sequence length {args.seq_len} ({recipe.model}, {recipe.num_experts} experts"
          f"{f' + {recipe.shared_size} shared neurons' if recipe.shared_size else ''} in {len(layers)} layers; "
          "every token at its top K)")
    print(f"{'component':18s}{'dense':>14s}" + "".join(f"{'K=' + str(k):>14s}" for k in ks))
    for c in (*COMPONENTS, "total"):
        print(f"{c:18s}{_fmt_flops(dense[c]):>14s}" + "".join(f"{_fmt_flops(table['k'][str(k)][c]):>14s}" for k in ks))
    print(f"{'FFN vs dense':18s}{'100.0%':>14s}" + "".join(f"{100 * table['k'][str(k)]['ffn_ratio']:13.1f}%" for k in ks))
    print(f"{'total vs dense':18s}{'100.0%':>14s}" + "".join(f"{100 * table['k'][str(k)]['total_ratio']:13.1f}%" for k in ks))
    return 0


# ---- train ----
def add_train(sub) -> None:
    p = sub.add_parser("train", help="factorize + PAR training (a recipe) + held-out metrics; saves a run",
                       description="Train a recipe: a preset (--preset, default: the measured recipe), changed by "
                                   "the flags below or by --set KEY=VALUE for any other field (`python -m factorlab "
                                   "recipe` lists them all with what they do).")
    p.add_argument("name", help="run name (saved under the runs folder)")
    _add_recipe(p)
    p.add_argument("--eval-k", default=None, help="K values for held-out metrics, e.g. 1,2,3 (default: every K in 1..N)")
    p.add_argument("--device", default="cpu", help="where to train: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--processes", type=int, default=1, metavar="P", help=PROCESSES_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    _runs_dir(p)
    _add_json(p)
    p.set_defaults(func=cmd_train)


PROCESSES_HELP = ("data-parallel processes (default 1): the same command under `accelerate launch --num_processes P` "
                  "(gloo on CPUs, NCCL on GPUs, one GPU each). The model loads in float32 where the memory estimate "
                  "fits, else in bfloat16, else (one process, several GPUs) spread over the GPUs by device_map")


def _launch(args) -> int:
    """`train ... --processes P` outside a launched process: the same command line in P processes through
    `accelerate launch` (its multi-process launcher runs CPU processes too; factorlab picks gloo there)."""
    import os
    import shlex
    import socket
    import subprocess

    argv, rest = list(args.argv), []
    while argv:  # the command line without --processes
        item = argv.pop(0)
        if item == "--processes":
            argv.pop(0)
        elif not item.startswith("--processes="):
            rest.append(item)
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "--num_cpu_threads_per_process", str(threads), "-m", "factorlab", *rest]
    print(f"launching {args.processes} processes: {shlex.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


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


def cmd_train(args) -> int:
    import torch
    from tqdm import tqdm

    from . import parallel
    from .memory import describe, loading, model_shapes
    from .models import load_model
    from .workflows import train_run

    recipe = recipe_from_args(args)
    if args.processes < 1:
        raise CliError(f"--processes must be at least 1, got {args.processes}")
    device = _device(args.device)
    if device.type == "cuda" and args.processes > torch.cuda.device_count():
        raise CliError(f"--processes {args.processes} on --device cuda needs {args.processes} GPUs (one each); "
                       f"{torch.cuda.device_count()} here")
    if args.processes > 1 and not parallel.launched():
        return _launch(args)
    parallel.init(cpu=device.type == "cpu")
    if parallel.world_size() > 1 and device.type == "cuda":
        device = parallel.local_device()  # one GPU per process
    eval_ks = _parse_ks(args.eval_k, recipe.top_k, recipe.num_experts) if args.eval_k else None
    choice = None
    if parallel.is_main():  # decided once, before any process loads the model
        try:
            choice = loading(model_shapes(recipe.model)[0], recipe, processes=parallel.world_size(),
                             device=str(device))
        except (ValueError, RuntimeError) as exc:  # what cannot fit (MemoryPlanError) is refused by every process
            choice = exc
    choice = parallel.broadcast_value(choice)
    if isinstance(choice, Exception):
        raise choice
    dtype, device_map, plan = choice
    if parallel.is_main():
        print("\n".join(describe(plan)) + f"\n  loading the model in {dtype}"
              + (" spread over the GPUs (device_map auto)" if device_map else ""), file=sys.stderr)
    loaded = load_model(recipe.model, dtype=getattr(torch, dtype), device_map=device_map)
    if device_map:
        device = None  # the layers stay where device_map put them
    quiet = (bool(args.json) and args.json is True) or not parallel.is_main()
    bar = tqdm(total=None, desc="train", unit="step", disable=quiet)

    def progress(rec: dict) -> None:
        if rec.get("total") and bar.total != rec["total"]:
            bar.total = rec["total"]
        if "step" in rec:
            bar.n = rec["step"]
        losses = {k: f"{v:.4g}" for k, v in (rec.get("losses") or {}).items() if isinstance(v, float)}
        bar.set_postfix(phase=rec.get("phase"), layer=rec.get("layer"), **losses)
        bar.refresh()

    result = train_run(recipe, args.name, runs_dir=args.runs_dir, progress=progress, overwrite=args.overwrite,
                       eval_ks=eval_ks, device=device, loaded=loaded)
    bar.close()
    result.pop("_moe", None)
    if not parallel.is_main():
        return 0
    if args.json:
        _emit_json(args, result)
        return 0
    name = recipe.preset_name()
    print(f"run {result['run']}: recipe {name or 'custom (' + ', '.join(f'{k}={v}' for k, v in recipe.differences().items()) + ')'}"
          f", trained in {result['seconds']:.1f} s on {result['tokens']} tokens "
          f"(router label accuracy {result['train'].get('mean_router_label_accuracy') or float('nan'):.3f})")
    print(f"{'K':>3s} {'ppl':>10s} {'dense ppl':>10s} {'agreement':>10s} {'KL':>8s}   (held-out text)")
    for k, h in result["heldout_by_k"].items():
        if h:
            print(f"{k:>3s} {h['perplexity']:10.2f} {h['dense_perplexity']:10.2f} {h['agreement']:10.3f} {h['kl']:8.3f}")
    return 0


# ---- memory ----
def add_memory(sub) -> None:
    p = sub.add_parser("memory", help="memory a recipe needs per process, from the model's config alone (no weights)",
                       description="Estimate the memory of training a recipe on MODEL: 'default', a local folder, a Hub "
                                   "id (online), or a bundled config (offline): " + ", ".join(_bundled()) + ".")
    p.add_argument("model", help="the model: 'default', a folder, or a Hub id")
    _add_preset_and_set(p)
    p.add_argument("--processes", type=int, default=1, metavar="P", help="data-parallel processes (each holds 1/P "
                                                                         "of the training tokens)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bytes per weight")
    p.add_argument("--device", default="cpu", help="where it would train: cpu or cuda (compares with what is free "
                                                    "there, where it exists)")
    _add_json(p)
    p.set_defaults(func=cmd_memory)


def _bundled() -> list[str]:
    from .memory import CONFIGS

    return [f.stem.replace("__", "/") for f in sorted(CONFIGS.glob("*.json"))]


def cmd_memory(args) -> int:
    import torch

    from .memory import describe, estimate, model_shapes, plan

    recipe = preset(args.preset, **{**parse_assignments(args.assignments), "model": args.model})
    info, source = model_shapes(args.model)
    dtype_bytes = 2 if args.dtype == "bfloat16" else 4
    fits, available, where, reason = None, None, "", ""
    est = estimate(info, recipe, processes=args.processes, dtype_bytes=dtype_bytes)
    if args.device == "cpu" or torch.cuda.is_available():
        try:
            est, available, where = plan(info, recipe, processes=args.processes, dtype_bytes=dtype_bytes,
                                         device=args.device)
            fits = True
        except ValueError as exc:
            fits, reason = False, str(exc)
    if args.json:
        _emit_json(args, {**est.to_dict(), "source": source, "parameters": info["parameters"], "device": args.device,
                          "available_bytes": available, "fits": fits})
        return 0
    print(f"{args.model}: {info['parameters'] / 1e9:.3f} B parameters, {info['num_layers']} layers, hidden "
          f"{info['hidden_size']}, FFN {info['intermediate_size']}, vocab {info['vocab_size']} ({source})")
    print("\n".join(describe(est, available, where)))
    if fits is None:
        print(f"  no {args.device} here to compare with: the peak above is what each process needs there")
    elif fits:
        print(f"  fits here ({args.device})")
    else:
        print(f"  does not fit here: {reason}")
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
                                    "recipe": r.run.recipe.to_dict() if r.run else None,
                                    "config": r.config, "metrics": r.metrics} for r in runs]})
        return 0
    for r in runs:
        if r.run:
            recipe = r.run.recipe
            print(f"{r.name:24s} {recipe.model}  {recipe.num_experts}E{recipe.top_k}K split={recipe.split} "
                  f"mode={recipe.mode} recipe={recipe.preset_name() or 'custom'}")
        else:
            print(f"{r.name:24s} CORRUPT: {r.error}")
    if not runs:
        print("no runs yet: create one with `python -m factorlab train NAME` (or factorize --name NAME)")
    return 0


def _parsers() -> list:
    from . import cli_measure as m  # imports this module's helpers: loaded once these are defined

    return [add_info, add_recipe, add_factorize, add_flops, add_train, add_memory, add_experiment, add_runs,
            m.add_eval, m.add_bench, m.add_fidelity, m.add_export, m.add_atlas]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m factorlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _parsers():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models import ModelLoadError
    from .runs import RunError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --processes P` relaunches it
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
