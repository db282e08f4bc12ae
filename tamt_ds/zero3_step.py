"""Two copies of every gradient that DeepSpeed's ZeRO-3 optimizer step makes, removed.

`streamline(optimizer)` replaces two methods on one DeepSpeedZeroOptimizer_Stage3 instance,
the one engine.build_engine made (nothing else in the process changes).  Both keep ZeRO-3's
semantics at any number of ranks: each rank still holds, norms and steps only its own
gradient partition, and the norm is one all-reduced sum, the same on every rank.

- The gradient norm (for clipping): DeepSpeed's get_grad_norm_direct copies each gradient
  partition to fp64 to take its norm, a fresh full-size fp64 temporary a step (180 MB for
  MiniLM's 22.5M scores; in bf16 the cast dominates the optimizer step, docs/benchmarks.md).
  Here: fp32 norms of CHUNK-element slices (torch._foreach_norm, one multi-tensor kernel on
  a GPU), their squares summed in fp64.  Its relative error is ~1e-6 of the fp64 norm, less
  than that of torch.nn.utils.clip_grad_norm_ (fp32 per tensor), which plain loops use.
- The fp32 gradient of a sub-group: DeepSpeed concatenates the sub-group's gradient
  partitions and casts the concatenation to the master dtype (two full-size copies in bf16,
  one in fp32).  The partitions are adjacent views of one flat buffer, so here the flat view
  is cast once (bf16), or used as it is (fp32: the buffer is rewritten by the next backward
  and not read after the step).

Installed only where the norm is DeepSpeed's plain one: no model or sequence parallelism,
the partition group is the whole world (sharding's all-reduce is over the world), no CPU
offload of the optimizer (which takes other paths)."""
from __future__ import annotations

import types

import torch

from tamt_ds import sharding

CHUNK = 1 << 16  # elements per fp32 partial norm: fp32 accumulation error stays ~1e-7 relative per chunk


def streamline(optimizer) -> bool:
    """Install both overrides on a ZeRO-3 optimizer; False (nothing changed) where they do not apply."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return False
    if (optimizer.offload_optimizer or optimizer.model_parallel_group is not None
            or optimizer.sequence_parallel_size != 1 or optimizer.partition_count != sharding.world_size()):
        return False
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm, optimizer)
    optimizer._prepare_fp32_grad_for_sub_group = types.MethodType(_prepare_fp32_grad, optimizer)
    return True


def grad_norm(gradients: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all of `gradients` (over every rank's partitions), fp64 0-d on their device."""
    chunks = [c for g in gradients for c in g.reshape(-1).split(CHUNK)]
    if chunks:
        partial = torch.stack(torch._foreach_norm(chunks, 2, dtype=torch.float32)).double()
        squares = partial.square().sum()
    else:
        squares = torch.zeros((), dtype=torch.float64, device=sharding.comm_device())
    return sharding.all_reduce_(squares).sqrt()


def _grad_norm(self, gradients, params, norm_type=2):
    """DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct for the L2 norm, without fp64 copies;
    an inf or NaN norm is -1, as DeepSpeed marks an overflow."""
    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    total = grad_norm(gradients)
    return torch.where(total.isfinite(), total, torch.full_like(total, -1.0))


def _prepare_fp32_grad(self, sub_group_id):
    """DeepSpeedZeroOptimizer_Stage3._prepare_fp32_grad_for_sub_group with one copy (bf16) or none (fp32)."""
    grads = self.averaged_gradients[sub_group_id]
    master = self.fp32_partitioned_groups_flat[sub_group_id]
    flat = adjacent_view(grads)
    if flat is None or flat.numel() != master.numel():
        return type(self)._prepare_fp32_grad_for_sub_group(self, sub_group_id)
    master.grad = flat.to(master.dtype)
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_synchronized_device():
        flat.record_stream(get_accelerator().current_stream())  # as DeepSpeed does for each partition
    self.averaged_gradients[sub_group_id] = None


def adjacent_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view over `tensors` where they lie back to back in one contiguous buffer, else None."""
    if not tensors:
        return None
    base = tensors[0]._base
    if base is None or not base.is_contiguous():
        return None
    start = offset = tensors[0].storage_offset()
    for t in tensors:
        if t._base is not base or not t.is_contiguous() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return base.view(-1).narrow(0, start - base.storage_offset(), offset - start)

