"""Issue 34's chat column: top-1 agreement with the dense model on the dense model's own chat replies, per K.

The dense model answers P shipped prompts (factorlab/prompts/prompts.jsonl, every 13th: all categories;
chat template, greedy, up to 48 new tokens); the factorized model is teacher-forced on prompt + reply at
each K and scored on the reply tokens: now (each K its own weights, K = N the dense FFN) and before (the
trained K's weights at every K, the refitted experts at K = N), on the same run.

Usage: PYTHONPATH=. python experiments/every_k/chat_agreement.py RUN [--json OUT.json]   (THREADS, default 2)
"""
import json
from pathlib import Path

import torch
from shared import as_before, open_run

from factorlab.chat import prompt_ids
from factorlab.moe import set_top_k

PROMPTS = Path(__file__).resolve().parents[2] / "factorlab" / "prompts" / "prompts.jsonl"


def main() -> None:
    run, loaded, moe, out = open_run(__doc__)
    dense, tok = loaded.model, loaded.tokenizer
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()][::13]
    rows = []  # (ids (1, T), first reply position)
    with torch.no_grad():
        for text in prompts:
            ids = prompt_ids(tok, [{"role": "user", "content": text}])
            reply = dense.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.eos_token_id)
            rows.append((reply, ids.shape[1]))
    n = run.recipe.num_experts
    result = {"run": run.name, "prompts": len(prompts), "reply_tokens": sum(r.shape[1] - p for r, p in rows)}

    def agreement() -> float:
        same = total = 0
        with torch.no_grad():
            for ids, start in rows:
                want = dense(ids).logits[0, start - 1:-1].argmax(-1)
                got = moe(ids).logits[0, start - 1:-1].argmax(-1)
                same += int((want == got).sum())
                total += want.numel()
        return same / total

    for label in ("now", "before"):
        if label == "before":
            as_before(moe, run.recipe.top_k)
        result[label] = {}
        for k in range(1, n + 1):
            set_top_k(moe, k)
            result[label][k] = agreement()
            print(label, k, f"{result[label][k]:.3f}", flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
