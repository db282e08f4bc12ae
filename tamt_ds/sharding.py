"""The one place that knows how ZeRO-3 lays a parameter out across ranks.

ZeRO stage 3 flattens every parameter, pads it to a multiple of the world size and
gives rank r the contiguous slice [r * P, (r + 1) * P) in `param.ds_tensor`.  Outside
forward/backward `param.data` is an empty placeholder, so anything that reads values
(mask init from |W|, thresholds, sparsity) must work on that local slice.  Everything
here also works on plain (non-ZeRO) parameters: the "shard" is then the whole tensor
on every rank, and collectives are skipped when there is no process group.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass
class Shard:
    """This rank's elements of one parameter, as a flat view of live storage."""

    values: torch.Tensor  # 1-D, only the real (unpadded) elements held here; writes go to the parameter
    offset: int  # flat index of values[0] in the full parameter
    numel: int  # numel of the full parameter


def local_shard(param: torch.Tensor) -> Shard:
    if not is_partitioned(param):
        # Replicated parameter: every rank holds all of it, so its "share" is everything.
        # Selections then count each element once (see `all_reduce_sum` callers).
        return Shard(param.data.view(-1), 0, param.numel())
    part = param.ds_tensor.ds_numel
    start = rank() * part
    valid = max(0, min(part, param.ds_numel - start))
    return Shard(param.ds_tensor.data.view(-1)[:valid], start, param.ds_numel)


def shards_are_disjoint(params) -> bool:
    """True when local shards partition the parameters (so counts must be summed over ranks)."""
    return distributed() and all(is_partitioned(p) for p in params)


def all_reduce_(tensor: torch.Tensor, op=None, enabled: bool = True) -> torch.Tensor:
    if enabled and distributed():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_counts(counts: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """[world, *counts.shape] of every rank's counts (rank order = shard order)."""
    if not (enabled and distributed()):
        return counts.unsqueeze(0)
    out = [torch.empty_like(counts) for _ in range(world_size())]
    dist.all_gather(out, counts)
    return torch.stack(out)


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


def barrier() -> None:
    if distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
