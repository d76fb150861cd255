"""Print probe.py result lines compactly: python experiments/default_recipe/summarize_probe.py FILE.jsonl ..."""
import json
import sys

skip = {"model", "num_experts", "split", "mode"}
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        s = {k: v for k, v in r["setting"].items() if k not in skip}
        h = " ".join(f"K{k}: {v['perplexity']:.1f}/{v['agreement']:.3f}" for k, v in r["heldout"].items())
        print(f"{r['train_s']:7.1f}s  {h}  acc {r['label_acc'] or 0:.3f}  {s}")
