"""A world of N ranks simulated in one process, for the `sim` tier.

`run_ranks(world, fn)` runs `fn(rank)` once per simulated rank, each in its own thread, with
tamt_ds.sharding answering as rank r of `world` would: `rank()`, `world_size()`,
`distributed()`, `all_reduce_` returning the sum (max, min) over every rank's tensor of
the same call, as the real all-reduce hands every rank, and `barrier`, `gather_objects`,
`broadcast_object`, `gathered`.  The ranks run in lockstep from collective to collective, so a
collective's result can feed the next step, as in the radix selection of tamt_ds/thresholds.py.
Only what crosses those functions is combined: nothing the real code keeps per rank is shared.
A rank that makes other collectives than the rest fails the run, as it would hang a real job.

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


class _Abort(Exception):
    """Another simulated rank failed: this one stops where it waits."""


def run_ranks(world: int, fn) -> list:
    """[fn(0), ..., fn(world - 1)], each run as that rank of a `world`-rank job.

    One rank runs at a time, in rank order, up to its next collective (a baton passed from rank
    to rank: no thread herd to wake at each collective); the last rank to arrive combines."""
    local = threading.local()
    sent: list = [None] * world
    calls, done = [0] * world, [False] * world
    box: dict = {}
    turns = [threading.Semaphore(0) for _ in range(world)]
    errors: list = []

    def fail(r: int, exc: BaseException) -> None:
        errors.append((r, exc))
        for t in turns:
            t.release(world + 1)  # every waiting rank wakes, sees the failure and stops

    def wait_turn(r: int) -> None:
        if not turns[r].acquire(timeout=300):
            raise _Abort(f"rank {r} waited 300 s for its turn")
        if errors:
            raise _Abort()

    def combine() -> None:
        if len(set(calls)) != 1 or any(done):
            raise AssertionError(f"ranks made different numbers of collectives: {sorted(set(calls))}")
        ops = {op for op, _ in sent}
        assert len(ops) == 1, f"ranks disagree on the collective: {ops}"
        op = ops.pop()
        if op not in _REDUCE:  # barrier, gather, broadcast: every rank's object
            box["result"] = [obj for _, obj in sent]
            return
        tensors = [t for _, t in sent]
        assert len({(t.shape, t.dtype) for t in tensors}) == 1, "ranks all-reduce different shapes"
        box["result"] = _REDUCE[op](torch.stack(tensors))

    def collective(kind: str, payload):
        r = local.rank
        sent[r] = (kind, payload)
        calls[r] += 1
        if r == world - 1:
            combine()
            turns[0].release()
        else:
            turns[r + 1].release()
        wait_turn(r)
        return box["result"]

    def all_reduce(tensor: torch.Tensor, op: str = "sum", enabled: bool = True) -> torch.Tensor:
        if not (enabled and world > 1):
            return tensor
        return tensor.copy_(collective(op, tensor.detach().cpu().clone()))

    def exchange(kind: str, obj) -> list:
        return [obj] if world == 1 else collective(kind, obj)

    results: list = [None] * world

    def body(r: int) -> None:
        local.rank = r
        try:
            wait_turn(r)
            results[r] = fn(r)
            done[r] = True
            if r < world - 1:
                turns[r + 1].release()
            elif not all(done):
                raise AssertionError("ranks made different numbers of collectives: some still wait in one")
        except _Abort:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised below, with its rank
            fail(r, exc)

    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool costs more than it gives
    with _patched(world, local, all_reduce, exchange):
        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
        for t in threads:
            t.start()
        turns[0].release()
        for t in threads:
            t.join()
    torch.set_num_threads(intra_op)
    if errors:
        r, exc = errors[0]
        raise AssertionError(f"simulated rank {r} of {world} failed: {exc!r}") from exc
    return results
