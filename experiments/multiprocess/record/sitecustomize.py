"""Loaded by Python at start-up when this folder is on PYTHONPATH (decisions.py puts it there): with
FACTORLAB_RECORD=DIR set, every per-token-K round saves its discrete decisions into DIR, per process."""
import os

if os.environ.get("FACTORLAB_RECORD"):
    import torch

    from factorlab import parallel
    from factorlab.par import per_token

    _OUT = os.environ["FACTORLAB_RECORD"]
    os.makedirs(_OUT, exist_ok=True)
    _COUNT = {"sets": 0, "refit": 0}
    _best_sets, _refit_down = per_token.best_sets, per_token.refit_down

    def _name(kind: str) -> str:
        _COUNT[kind] += 1
        return os.path.join(_OUT, f"{kind}{_COUNT[kind]:03d}.rank{parallel.rank()}.pt")

    def best_sets(*args, **kwargs):
        sets = _best_sets(*args, **kwargs)
        torch.save(sets.to(torch.uint8), _name("sets"))
        return sets

    def refit_down(mlp, inputs, target, ridge, chunk):
        with torch.no_grad():  # the routing the refit sees: router scores and the thresholds just tuned
            scores = torch.cat([mlp.router.linear(x).float().sigmoid() for x in inputs.split(chunk)])
        torch.save({"scores": scores, "thresholds": mlp.thresholds.clone()}, _name("refit"))
        return _refit_down(mlp, inputs, target, ridge, chunk)

    per_token.best_sets, per_token.refit_down = best_sets, refit_down
