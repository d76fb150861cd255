"""Score factorlab's exported requests with lm-eval's HFLM and with factorlab's task scorer; compare.

Run in the lm-eval venv from the repository root, after export.py (same model weights, one process):
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. /tmp/lmeval/bin/python \
        tests/lmeval_crosscheck/compare_loglikelihoods.py /tmp/factorlab_lmeval --items 25
"""
import argparse
import json
from pathlib import Path

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from factorlab.evaluate import evaluate
from factorlab.tasks import Item, TaskData


def picks(lls, choices):
    norm = [x / len(c) for x, c in zip(lls, choices)]
    return lls.index(max(lls)), norm.index(max(norm))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--items", type=int, default=25)
    parser.add_argument("--model", default=str(Path.home() / ".cache/factorlab/smollm2-135m-instruct"))
    args = parser.parse_args()
    data = json.loads((Path(args.folder) / "factorlab_requests.json").read_text())
    lm = HFLM(pretrained=args.model, dtype="float32", batch_size=1, device="cpu")
    for task, items in data.items():
        items = items[:args.items]
        requests = [tuple(r) for it in items for r in it["requests"]]
        theirs = [ll for ll, _ in lm.loglikelihood(
            [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)]
        task_items = [Item(tuple(map(tuple, it["requests"])), tuple(it["choices"]), it["gold"], i)
                      for i, it in enumerate(items)]
        scores = evaluate(lm.model, lm.tokenizer, TaskData(task, task_items, "export", "validation", len(items), None, 0))
        ours = [x for ll in scores.loglikelihoods for x in ll]
        i, agree_acc, agree_norm = 0, 0, 0
        for it in items:
            n = len(it["requests"])
            a, b = picks(ours[i:i + n], it["choices"]), picks(theirs[i:i + n], it["choices"])
            agree_acc += a[0] == b[0]
            agree_norm += a[1] == b[1]
            i += n
        diff = max(abs(x - y) for x, y in zip(ours, theirs))
        print(f"{task:14s} {len(items)} items {len(requests)} requests: max |loglikelihood diff| {diff:.2e}; "
              f"same acc pick {agree_acc}/{len(items)}, same acc_norm pick {agree_norm}/{len(items)}")


if __name__ == "__main__":
    main()
