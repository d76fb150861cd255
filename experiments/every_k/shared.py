"""What the every_k scripts share: open the run named on the command line, and turn it back into the
model as it was before issue 34 (the trained K's weights at every K, the refitted experts at K = N)."""
import os
import sys

import torch

from factorlab.models import load_model
from factorlab.moe import factorized_layers
from factorlab.runs import load_moe, load_run


def open_run(doc: str):
    """`RUN [--json OUT.json]` from sys.argv (exit with doc when no run is named), THREADS (default 2):
    returns (run, loaded dense model, its factorized model, output path or None)."""
    args = sys.argv[1:]
    if not args:
        raise SystemExit(doc)
    out = args[args.index("--json") + 1] if "--json" in args else None
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    run = load_run(args[0])
    loaded = load_model(run.recipe.model)
    return run, loaded, load_moe(run, loaded.model), out


def as_before(moe, trained_k: int) -> None:
    """One set of weights for every K (the trained K's), and the experts, not the dense FFN, at K = N."""
    for mlp in factorized_layers(moe).values():
        trained = mlp.weights_by_k.get(trained_k)
        mlp.weights_by_k = {}
        if trained is not None:
            mlp.down.data, mlp.shared_down.data = trained
        mlp.tuned = False
