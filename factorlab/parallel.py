"""Data parallelism for the recipe: the process group (through Hugging Face accelerate), reductions that
are no-ops in one process, and shards of token rows.

`accelerate launch --multi_gpu --num_processes P -m factorlab train ...` (or `train ... --processes P`)
starts P copies of the same command; `init()` joins them into one process group (gloo on CPUs, NCCL on
GPUs). Every helper here returns its input unchanged when there is one process, so the one-process
recipe runs exactly the code it ran before data parallelism existed.

Shards are contiguous blocks of rows in rank order, so gathering them (rank 0's rows first) gives the
rows of the one-process run in their order.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started as one of several (accelerate launch / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cpu: bool | None = None) -> None:
    """Join the process group when launched as one of several processes (no-op otherwise or when joined).

    accelerate's PartialState picks the backend: NCCL for GPU processes, gloo for CPU ones (cpu: whether the
    processes train on the CPU; default: when no GPU is visible)."""
    if launched() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Only the main process writes runs and reports progress."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's GPU: cuda:LOCAL_RANK (one GPU per process)."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on the main process first (e.g. to generate and cache text), then on the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---------------------------------------------------------------- shards of rows
def shard_bounds(rows: int, world: int | None = None, index: int | None = None) -> tuple[int, int]:
    """[start, end) of this process's contiguous block of `rows` (blocks differ by at most one row)."""
    world = world_size() if world is None else world
    index = rank() if index is None else index
    return index * rows // world, (index + 1) * rows // world


def shard(rows: torch.Tensor) -> torch.Tensor:
    """This process's block of rows (dim 0): all of them in one process."""
    start, end = shard_bounds(rows.shape[0])
    return rows[start:end]


def offset_and_total(count: int) -> tuple[int, int]:
    """(how many items the processes before this one hold, how many all hold) for a local count."""
    if world_size() == 1:
        return 0, count
    counts = _gather_counts(count)
    return sum(counts[:rank()]), sum(counts)


def local_part(index: torch.Tensor, offset: int, count: int) -> torch.Tensor:
    """The global indices that fall in this process's block [offset, offset + count), made local."""
    if world_size() == 1:
        return index
    inside = (index >= offset) & (index < offset + count)
    return index[inside] - offset


# ---------------------------------------------------------------- reductions
def _backend_tensor(t: torch.Tensor) -> torch.Tensor:
    """t on the device the backend communicates from (NCCL: this process's GPU; gloo: the CPU)."""
    want = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    return t if t.device == want else t.to(want)


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum t over the processes, in place (no-op in one process); returns t."""
    if world_size() > 1:
        moved = _backend_tensor(t)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not t:
            t.copy_(moved)
    return t


def all_max(value: float) -> float:
    if world_size() == 1:
        return value
    t = _backend_tensor(torch.tensor([value], dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def total(value: float) -> float:
    """A number summed over the processes."""
    if world_size() == 1:
        return value
    return float(all_sum_(torch.tensor([float(value)], dtype=torch.float64)).item())


def any_true(flag: bool) -> bool:
    """True on every process when it is true on any (e.g. a time budget passed on one of them)."""
    return flag if world_size() == 1 else total(float(flag)) > 0


def token_mean(value: float, count: int) -> float:
    """The mean over every process's items of a mean `value` over this process's `count` items."""
    if world_size() == 1:
        return value
    sums = all_sum_(torch.tensor([value * count, float(count)], dtype=torch.float64))
    return float(sums[0] / sums[1]) if sums[1] > 0 else value


def mean(t: torch.Tensor) -> torch.Tensor:
    """t.mean() over the elements of t on every process."""
    if world_size() == 1:
        return t.mean()
    sums = all_sum_(torch.stack([t.sum().double(), torch.tensor(float(t.numel()), dtype=torch.float64,
                                                                 device=t.device)]))
    return (sums[0] / sums[1]).to(t.dtype)


def all_sum_grads_(params: list[torch.Tensor]) -> None:
    """Sum the parameters' gradients over the processes (each scaled by its share of the global batch,
    so the sum is the one-process gradient of the batch mean); a missing gradient counts as zero."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_sum_(p.grad)


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """The main process's t on every process, in place; returns t."""
    if world_size() > 1:
        moved = _backend_tensor(t)
        dist.broadcast(moved, src=0)
        if moved is not t:
            t.copy_(moved)
    return t


def broadcast_value(value):
    """The main process's Python value (picklable) on every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_counts(count: int) -> list[int]:
    t = _backend_tensor(torch.tensor([count], dtype=torch.int64))
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(c.item()) for c in out]


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of t (dim 0) concatenated in rank order, on every process (blocks may differ
    in size)."""
    if world_size() == 1:
        return t
    counts = _gather_counts(t.shape[0])
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    moved = _backend_tensor(padded)
    parts = [torch.empty_like(moved) for _ in counts]
    dist.all_gather(parts, moved)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def reduce_heldout(metrics: dict) -> dict:
    """Held-out metrics (evaluate.heldout_metrics) measured on each process's rows -> the metrics of all
    rows: perplexities from the summed log-likelihoods, agreement and KL as token-weighted means."""
    if world_size() == 1:
        return metrics
    import math

    n = float(metrics["tokens"])
    values = torch.tensor([math.log(metrics["perplexity"]) * n, math.log(metrics["dense_perplexity"]) * n,
                           metrics["agreement"] * n, metrics["kl"] * n, n], dtype=torch.float64)
    nll, dense_nll, agree, kl, count = all_sum_(values).tolist()
    return {**metrics, "perplexity": math.exp(nll / count), "dense_perplexity": math.exp(dense_nll / count),
            "agreement": agree / count, "kl": kl / count, "tokens": int(count)}
