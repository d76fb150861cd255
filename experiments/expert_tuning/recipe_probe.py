"""Runs at commit 25c6601 (uses options since removed; see docs/research.md).

Quick recipe probe used during development (issue 7): held-out perplexity of K=2 recipes.

Train text: README/METADATA prose of the installed packages (even files), held-out: the odd files
(8 x 256 tokens). Usage: PYTHONPATH=. python experiments/expert_tuning/recipe_probe.py '[{"mode": "experts", "target": "teacher"}]'
Row keys: TrainConfig fields, plus rows (x256 training tokens), n, k, output_mode, shared.
"""
import glob, json, math, sys, time

import torch

torch.set_num_threads(1)
from factorlab.models import load_model
from factorlab.factorize import make_partition, build_moe
from factorlab.par import train, TrainConfig
lm = load_model("default"); m, tok = lm.model, lm.tokenizer
files = sorted(glob.glob(".venv/lib/python3.11/site-packages/*.dist-info/METADATA"))
texts = [open(f, errors="ignore").read() for f in files]
texts = [t.split("\n\n",1)[1] for t in texts if len(t) > 3000]
ids = tok("\n\n".join(texts[::2]), return_tensors="pt").input_ids[0]
hid = tok("\n\n".join(texts[1::2]), return_tensors="pt").input_ids[0]
L=256
held = hid[: 8*L].view(-1, L)
def ppl(model):
    with torch.no_grad():
        nll=0; n=0
        for r in held.split(4):
            lg = model(r).logits[:, :-1]
            nll += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), r[:,1:].reshape(-1), reduction="sum").item(); n += r[:,1:].numel()
    return math.exp(nll/n)
print("dense ppl", ppl(m), flush=True)
for row in json.loads(sys.argv[1]):
    rows = row.pop("rows", 64)
    train_ids = ids[: (len(ids)//L)*L].view(-1, L)[:rows]
    n = row.pop("n", 4); k = row.pop("k", 2); om = row.pop("output_mode", "scaled"); sh = row.pop("shared", 0)
    p = make_partition(m, n, "cluster", calibration_ids=train_ids[:16], shared_size=sh)
    moe = build_moe(m, p, k, output_mode=om)
    t=time.time()
    r = train(m, moe, train_ids, TrainConfig(top_k=k, **{"adaptive_rounds": 0, "refine_rounds": 2, **row}))
    s = r.summary()
    print(n, k, om, sh, rows, row, "time %.1f" % (time.time()-t), "acc %.3f" % (s["mean_router_label_accuracy"] or 0), "ppl K %.1f" % ppl(moe), flush=True)
