"""A world of N ranks simulated in one process, for the `sim` tier.

`run_ranks(world, fn)` runs `fn(rank)` once per simulated rank, each in its own thread, with
tamt_ds.sharding answering as rank r of `world` would: `rank()`, `world_size()`,
`distributed()`, `all_reduce_` returning the sum (max, min) over every rank's tensor of
the same call, as the real all-reduce hands every rank, and `barrier`, `gather_objects`,
`broadcast_object`.  The ranks run in lockstep at each
all-reduce (a barrier), so a collective's result can feed the next step, as in the radix
selection of tamt_ds/thresholds.py.  Nothing is gathered that the real code does not gather:
only what crosses `sharding.all_reduce_` is combined.

A ZeRO-3 parameter is simulated by `zero_param(full, world, rank)`: the attributes
sharding.local_shard reads (the flattened parameter padded to a multiple of the world size,
rank r holding [r * P, (r + 1) * P)).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from tamt_ds import sharding

WORLD_SIZES = (1, 2, 3, 7, 8, 64, 512, 1024)


def split(world: int) -> list[int]:
    """The first, middle and last rank."""
    return sorted({0, world // 2, world - 1})


def zero_param(full: torch.Tensor, world: int, rank: int) -> SimpleNamespace:
    """What ZeRO-3 leaves rank `rank` of `world` of the parameter `full`."""
    part = -(-full.numel() // world)
    padded = torch.zeros(part * world, dtype=full.dtype)
    padded[: full.numel()] = full.reshape(-1)
    ds_tensor = padded[rank * part:(rank + 1) * part].clone()
    ds_tensor.ds_numel = part
    return SimpleNamespace(ds_id=0, ds_numel=full.numel(), ds_shape=full.shape, ds_tensor=ds_tensor)


_REDUCE = {"sum": lambda t: t.sum(0), "max": lambda t: t.amax(0), "min": lambda t: t.amin(0)}


@contextmanager
def _patched(world: int, local: threading.local, all_reduce, exchange):
    saved = {name: getattr(sharding, name) for name in ("rank", "world_size", "distributed", "all_reduce_",
                                                          "barrier", "gather_objects", "broadcast_object",
                                                          "gathered")}
    sharding.rank = lambda: local.rank
    sharding.world_size = lambda: world
    sharding.distributed = lambda: world > 1
    sharding.all_reduce_ = all_reduce
    sharding.barrier = lambda: exchange("barrier", None)
    sharding.gather_objects = lambda obj, dst=0: (lambda every: every if local.rank == dst else None)(
        exchange("gather", obj))
    sharding.broadcast_object = lambda obj, src=0: exchange("broadcast", obj)[src]

    @contextmanager
    def gathered(params, modifier_rank=None):
        """DeepSpeed's GatheredParameters: every rank's partition, all-gathered, padding cut off."""
        params = [p for p in params if sharding.is_partitioned(p)]
        for p in params:
            every = exchange("gather", p.ds_tensor)
            p.data = torch.cat(every)[: p.ds_numel].view(p.ds_shape)
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0, dtype=p.ds_tensor.dtype)  # released, as outside a forward

    sharding.gathered = gathered
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(sharding, name, value)


def run_ranks(world: int, fn) -> list:
    """[fn(0), ..., fn(world - 1)], each run as that rank of a `world`-rank job."""
    local = threading.local()
    sent: list = [None] * world
    box: dict = {}

    def combine():
        ops = {op for op, _ in sent}
        assert len(ops) == 1, f"ranks disagree on the collective: {ops}"
        op = ops.pop()
        if op not in _REDUCE:  # barrier, gather, broadcast: every rank's object
            box["result"] = [obj for _, obj in sent]
            return
        tensors = [t for _, t in sent]
        assert len({(t.shape, t.dtype) for t in tensors}) == 1, "ranks all-reduce different shapes"
        box["result"] = _REDUCE[op](torch.stack(tensors))

    barrier = threading.Barrier(world, action=combine, timeout=120)

    def all_reduce(tensor: torch.Tensor, op: str = "sum", enabled: bool = True) -> torch.Tensor:
        if not (enabled and world > 1):
            return tensor
        sent[local.rank] = (op, tensor.detach().cpu().clone())
        barrier.wait()
        return tensor.copy_(box["result"])

    def exchange(kind: str, obj) -> list:
        if world == 1:
            return [obj]
        sent[local.rank] = (kind, obj)
        barrier.wait()
        return box["result"]

    results: list = [None] * world
    errors: list = []

    def body(r: int) -> None:
        local.rank = r
        try:
            results[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, with its rank
            if not isinstance(exc, threading.BrokenBarrierError):
                errors.append((r, exc))
            barrier.abort()

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks are the parallelism (and tiny ops pay for a thread pool)
    with _patched(world, local, all_reduce, exchange):
        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    torch.set_num_threads(intra_op)
    if errors:
        r, exc = errors[0]
        raise AssertionError(f"simulated rank {r} of {world} failed: {exc!r}") from exc
    return results
