"""Issue 32 evidence: export runs with `python -m factorlab export`, then load each export in a fresh process that
imports only transformers (never factorlab, no trust_remote_code) and compare its logits and greedy reply with the
factorlab model it was made from (fp32, and again in float64).

    PYTHONPATH=. python experiments/export/export_runs.py RUN [RUN ...] [--out /tmp/factorlab-export] [--format F] [--k K]
        [--check-only]

Writes experiments/export/results/export_<RUN>[_<format>][_k<K>].json (the CLI's summary, with --no-store: the run is
not changed) and plain_<same>.json (the fresh-process check), and prints one markdown row per run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

RESULTS = Path(__file__).resolve().parent / "results"

PLAIN = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
folder, text, prompt, target = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(folder)  # no trust_remote_code
tok = AutoTokenizer.from_pretrained(folder)
assert not any(name.startswith("factorlab") for name in sys.modules)
ids = tok(text, return_tensors="pt").input_ids
chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                               return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
    out = model.generate(chat, attention_mask=torch.ones_like(chat), max_new_tokens=32, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=model.generation_config.eos_token_id)
save_file({"logits": logits.contiguous(), "greedy": out[0, chat.shape[1]:].contiguous(), "ids": ids}, target)
print(type(model).__name__, sum(p.numel() for p in model.parameters()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "factorlab-export"))
    parser.add_argument("--format", default="qwen2_moe", dest="fmt")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--check-only", action="store_true", help="reuse the export folder and summary already there")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from factorlab.export import fix_k, greedy_ids
    from factorlab.models import cache_dir
    from factorlab.workflows import CHAT_CHECK, CHECK_TEXT, open_run

    RESULTS.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        tag = run + ("" if args.fmt == "qwen2_moe" else f"_{args.fmt}") + (f"_k{args.k}" if args.k else "")
        folder = Path(args.out) / tag
        summary_path = RESULTS / f"export_{tag}.json"
        command = [sys.executable, "-m", "factorlab", "export", run, str(folder), "--format", args.fmt, "--no-store",
                   "--overwrite", "--json", str(summary_path)] + (["--k", str(args.k)] if args.k else [])
        if not args.check_only:
            subprocess.run(command, check=True)
        summary = json.loads(summary_path.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "plain.safetensors"
            loaded_as = subprocess.run([sys.executable, "-c", PLAIN, str(folder), CHECK_TEXT, CHAT_CHECK, str(target)],
                                       check=True, capture_output=True, text=True).stdout.split()
            plain = load_file(str(target))
        r, loaded, moe = open_run(run)
        fix_k(moe, summary["plan"]["top_k"])
        with torch.no_grad():
            logits = moe(plain["ids"]).logits
        chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_CHECK}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)["input_ids"]
        ours = greedy_ids(moe, chat)
        # the same comparison in float64: what is left in fp32 is summation-order noise, not a different function
        from transformers import AutoModelForCausalLM

        back64 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, experts_implementation="eager")
        with torch.no_grad():
            diff64 = (moe.double()(plain["ids"]).logits - back64(plain["ids"]).logits).abs().max().item()
        del back64
        dense_file = cache_dir() / "smollm2-135m-instruct" / "model.safetensors"
        result = {
            "run": run, "format": args.fmt, "k": summary["plan"]["top_k"], "exact": summary["plan"]["exact"],
            "command": " ".join(["python -m factorlab export", run, "OUT", "--format", args.fmt]
                                + (["--k", str(args.k)] if args.k else [])),
            "fresh_process_class": loaded_as[0], "fresh_process_parameters": int(loaded_as[1]),
            "tokens": int(plain["ids"].shape[1]),
            "max_abs_logit_diff": (logits - plain["logits"]).abs().max().item(),
            "max_abs_logit": logits.abs().max().item(), "max_abs_logit_diff_fp64": diff64,
            "greedy_same": ours == plain["greedy"].tolist(),
            "factorlab_text": loaded.tokenizer.decode(ours), "export_text": loaded.tokenizer.decode(plain["greedy"]),
            "files": sorted(p.name for p in folder.iterdir()),
            "export_safetensors_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "dense_safetensors_bytes": dense_file.stat().st_size if dense_file.exists() else None,
            "export_parameters": summary["size"]["export_parameters"],
            "dense_parameters": summary["size"]["dense_parameters"],
        }
        (RESULTS / f"plain_{tag}.json").write_text(json.dumps(result, indent=2))
        a = summary.get("approximation")
        approx = (f"held-out ppl {a['run']['perplexity']:.2f} -> {a['export']['perplexity']:.2f}, agreement "
                  f"{a['run']['agreement']:.3f} -> {a['export']['agreement']:.3f}, same top-1 as the run "
                  f"{a['vs_run']['agreement']:.3f}" if a else "")
        print(f"| {run} | {summary['class']} K={result['k']} | {'exact' if result['exact'] else 'approximate'} | "
              f"{result['max_abs_logit_diff']:.2e} | {result['max_abs_logit_diff_fp64']:.1e} | {result['greedy_same']} | {result['export_parameters']:,} / "
              f"{result['dense_parameters']:,} | {result['export_safetensors_bytes'] / 2**20:.0f} / "
              f"{(result['dense_safetensors_bytes'] or 0) / 2**20:.0f} MiB | {approx} |")


if __name__ == "__main__":
    main()
