"""Score the dense model once on an experiment config's tasks and save the scores to its dense cache,
so that grid rows (also in parallel processes) reuse them: python experiments/tools/dense_cache.py CONFIG.json"""
import json
import logging
import sys
from pathlib import Path

from factorlab.evaluate import run_sweep
from factorlab.experiment import read_dense_cache, write_dense_cache
from factorlab.models import load_model

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
config = json.loads(Path(sys.argv[1]).read_text())
ev = config["eval"]
model = config.get("base", {}).get("model", "default")
loaded = load_model(model)
path = Path(ev["dense_cache"])
cache = read_dense_cache(path, model)
for task in ev["tasks"].split(","):  # one task at a time, saved as it finishes
    run_sweep(loaded.model, loaded.tokenizer, None, task, (), limit=ev.get("limit"), seed=ev.get("seed", 0),
              data_dir=ev.get("data_dir"), batch_size=ev.get("batch_size", 16), progress=False, dense_cache=cache)
    write_dense_cache(path, model, cache)
