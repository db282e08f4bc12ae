"""The one place that talks to torch.distributed and knows how ZeRO-3 lays a parameter out.

ZeRO stage 3 flattens every parameter, pads it to a multiple of the world size and
gives rank r the contiguous slice [r * P, (r + 1) * P) in `param.ds_tensor`.  Outside
forward/backward `param.data` is an empty placeholder, so anything that reads values
(mask init from |W|, thresholds, sparsity) must work on that local slice.  Everything
here also works on plain (non-ZeRO) parameters: the "shard" is then the whole tensor
on every rank, and collectives are skipped when there is no process group.

Collectives run on the communication device: the accelerator's current device under
NCCL (which refuses CPU tensors), the CPU under gloo.  Callers hand in tensors on any
device and get the result back where their tensor lives, so no caller needs to know
which backend runs underneath.  A test fails if another module imports
torch.distributed or reads ZeRO's parameter attributes (`ds_*`); the ZeRO optimizer's
internals are behind tamt_ds/zero.py.
"""
from __future__ import annotations

import contextlib
import datetime
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def quiet_deprecations() -> None:
    # torch.distributed warns on every ZeRO collective that DeepSpeed still uses old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def stays_gathered(param: torch.Tensor) -> bool:
    """ZeRO-3 keeps `param` gathered between uses (persistent): small parameters, and every one
    at one rank (zero.one_rank_settings)."""
    return is_partitioned(param) and bool(getattr(param, "ds_persist", False))


def gather_released(params) -> None:
    """Gather those of the (ZeRO-3) `params` that are released; the others are left alone."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    released = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    if released:
        released[0].all_gather(released)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def distributed() -> bool:
    return initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def backend() -> str | None:
    return dist.get_backend() if initialized() else None


def comm_device() -> torch.device:
    """Where tensors must live to cross ranks: CPU under gloo, else the accelerator's
    current device (NCCL / HCCL / ... take device tensors only)."""
    if not initialized() or backend() == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@dataclass
class Shard:
    """This rank's elements of one parameter, as a flat view of live storage."""

    values: torch.Tensor  # 1-D, only the real (unpadded) elements held here; writes go to the parameter
    offset: int  # flat index of values[0] in the full parameter
    numel: int  # numel of the full parameter


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_partitioned(param) else param.numel()


def full_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if is_partitioned(param) else param.shape


def local_shard(param: torch.Tensor) -> Shard:
    if not is_partitioned(param):
        # Replicated parameter: every rank holds all of it, so its "share" is everything.
        # Selections then count each element once (see `all_reduce_` callers' `enabled`).
        return Shard(param.data.view(-1), 0, param.numel())
    part = param.ds_tensor.ds_numel
    start = rank() * part
    valid = max(0, min(part, param.ds_numel - start))
    return Shard(param.ds_tensor.data.view(-1)[:valid], start, param.ds_numel)


def local_partition(param: torch.Tensor) -> torch.Tensor:
    """This rank's whole partition of a ZeRO-3 parameter, padding included (live storage:
    the training-dtype copy the forward gathers)."""
    return param.ds_tensor.data


def shards_are_disjoint(params) -> bool:
    """True when local shards partition the parameters (so counts must be summed over ranks)."""
    return distributed() and all(is_partitioned(p) for p in params)


def all_reduce_(tensor: torch.Tensor, op: str = "sum", enabled: bool = True) -> torch.Tensor:
    """In-place all-reduce ("sum", "max" or "min") of a tensor on any device."""
    if enabled and distributed():
        wire = tensor.to(comm_device())
        dist.all_reduce(wire, op=_OPS[op])
        if wire is not tensor:
            tensor.copy_(wire)
    return tensor


def all_gather_counts(counts: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """[world, *counts.shape] of every rank's counts (rank order = shard order), on counts' device."""
    if not (enabled and distributed()):
        return counts.unsqueeze(0)
    wire = counts.to(comm_device())
    out = [torch.empty_like(wire) for _ in range(world_size())]
    dist.all_gather(out, wire)
    return torch.stack(out).to(counts.device)


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's picklable `obj`, in rank order, on rank `dst` (None elsewhere)."""
    if not distributed():
        return [obj]
    parts = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, parts, dst=dst)
    return parts


def broadcast_object(obj, src: int = 0):
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if distributed():
        dist.barrier()


def shutdown() -> None:
    """End the process group once every rank is done with it.  A process that exits with
    a live gloo group now and then aborts during interpreter shutdown ("terminate called
    without an active exception", SIGABRT) even after a clean run."""
    global _out_of_band
    if initialized():
        barrier()
        dist.destroy_process_group()
    _out_of_band = None


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """Full tensors of (possibly partitioned) parameters inside the block."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def partition_like(anchor: torch.nn.Parameter, new_params: list[torch.nn.Parameter]) -> None:
    """Hand freshly created parameters to ZeRO-3 with the same layout as `anchor`.

    Called as soon as each score tensor is created, so at most one full score
    matrix exists at a time on any rank.
    """
    if is_partitioned(anchor):
        anchor.convert_to_zero_parameters(param_list=new_params)


# ---------------------------------------------------------------- out-of-band
# The process group's key-value store (hosted by the launcher or by rank 0) works
# even while a collective is stuck, so failure handling talks through it: a
# heartbeat per rank, and claims that let one rank report an error all ranks share.

OUT_OF_BAND_TIMEOUT_S = 5.0
_out_of_band = None


def _store():
    """A connection of this process's own to the group's store, every call bounded by
    OUT_OF_BAND_TIMEOUT_S: the group's connection keeps its long timeout (a rank may wait
    that long for a peer, e.g. NCCL's first-collective handshake) and is never held by
    the heartbeat thread."""
    global _out_of_band
    if _out_of_band is None:
        store = dist.distributed_c10d._get_default_store()
        try:
            store = store.clone()
        except (AttributeError, RuntimeError):  # a store without clone (older torch): share the group's
            pass
        store.set_timeout(datetime.timedelta(seconds=OUT_OF_BAND_TIMEOUT_S))
        _out_of_band = store
    return _out_of_band


def heartbeat() -> None:
    """Count one beat of this rank (called by a watchdog thread); raises if the store does not answer."""
    _store().add(f"tamt/beat/{rank()}", 1)


def heartbeats() -> list[int] | None:
    """Every rank's beat count, or None if the store does not answer."""
    try:
        store = _store()
        return [store.add(f"tamt/beat/{r}", 0) for r in range(world_size())]
    except Exception:  # the store's host is gone or stopped: nothing to learn from it
        return None


def first_to_claim(key: str) -> bool:
    """True for the first rank (on any node) to claim `key`; also when the store is unreachable."""
    if not distributed():
        return True
    try:
        return _store().add(f"tamt/claim/{key}", 1) == 1
    except Exception:
        return True


def claims(key: str) -> int:
    """How many ranks claimed `key` so far (0 also when the store does not answer)."""
    if not distributed():
        return 0
    try:
        return _store().add(f"tamt/claim/{key}", 0)
    except Exception:
        return 0


def is_peer_failure(exc: BaseException) -> bool:
    """A collective or store operation failed because a peer died or stopped answering."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Broken pipe"))
