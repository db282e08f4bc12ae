"""The one place that reaches into DeepSpeed's ZeRO-3 optimizer and engine.

sharding.py knows how ZeRO-3 lays a parameter out (`ds_tensor`, `ds_shape`, ...); this
module knows where the ZeRO-3 optimizer keeps what a search reads and restores: the
fp32 master copy of each trainable parameter and its optimizer state (exp_avg, ...),
the base optimizer's lazily created state and parameter groups, the loss scaler, the
small parameters it keeps gathered ("persistent"), the engine's step counters, and the
local gradient partition; two of its step's methods, replaced (`streamline_step`); and
what its module hooks call (`skip_coordinator` at one rank, `no_backward_hooks_without_grad`).
Little of this is DeepSpeed's documented API, and a DeepSpeed release may move any of it,
so pyproject.toml caps deepspeed at the newest version tested; the README ("Testing a newer DeepSpeed") names the tests that cover it, and
tests/test_distributed_boundary.py fails if another module uses these names.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import types

import torch

from tamt_ds import sharding

COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # the engine's own, restored on resume


# ---------------------------------------------------------------- one parameter

def has_fp32_master(p: torch.Tensor) -> bool:
    """ZeRO-3's optimizer keeps an fp32 copy of p (p is partitioned and handed to it)."""
    return sharding.is_partitioned(p) and hasattr(p, "_z3_optimizer")


def full_fp32_master(p: torch.Tensor) -> torch.Tensor:
    """p's whole fp32 master, in p's shape, on the accelerator (collective; p must have one)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p).reshape(sharding.full_shape(p))


def local_fp32_master(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's partition of p's fp32 master, flat with ZeRO's padding (None if p has none)."""
    if not has_fp32_master(p):
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    master = safe_get_local_fp32_param(p)
    return None if master is None else master.reshape(-1)


def set_local_fp32_master(p: torch.Tensor, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_local_fp32_param

    safe_set_local_fp32_param(p, value)


def local_optimizer_state(p: torch.Tensor, key: str) -> torch.Tensor:
    """This rank's partition of p's optimizer state `key` (e.g. exp_avg), flat with padding."""
    from deepspeed.utils import safe_get_local_optimizer_state

    return safe_get_local_optimizer_state(p, key)


def set_local_optimizer_state(p: torch.Tensor, value: torch.Tensor, key: str) -> None:
    from deepspeed.utils import safe_set_local_optimizer_state

    safe_set_local_optimizer_state(p, value, key)


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's partition of p's gradient (on the accelerator, even with offload)."""
    from deepspeed.utils import safe_get_local_grad

    return safe_get_local_grad(p)


def set_local_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_local_grad

    safe_set_local_grad(p, value)


# ---------------------------------------------------------------- the optimizer

def optimizer_state_layout(engine) -> tuple[list[str], dict]:
    """(optimizer state keys with one value per element, e.g. exp_avg; the others, e.g. step)."""
    opt = engine.optimizer
    flat = opt.fp32_partitioned_groups_flat[0]
    state = opt.optimizer.state[flat]
    per_element = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
    return per_element, {k: copy.deepcopy(v) for k, v in state.items() if k not in per_element}


def create_optimizer_state(engine, per_element: list[str], scalars: dict) -> None:
    """The base optimizer creates its state lazily at its first step: create it now (zeros
    for the `per_element` keys, then `scalars`), so that it can be filled."""
    opt = engine.optimizer
    for flat in opt.fp32_partitioned_groups_flat:
        state = opt.optimizer.state[flat]
        for key in per_element:
            state.setdefault(key, torch.zeros_like(flat))
        state.update(copy.deepcopy(scalars))


def optimizer_param_groups(engine) -> list[dict]:
    """The base optimizer's parameter groups, live (the lr, weight decay, ... it steps with)."""
    return engine.optimizer.optimizer.param_groups


def release_persistent_parameters(engine) -> None:
    """ZeRO-3 keeps small ("persistent") parameters gathered once a step has used them: free
    those full copies, so that the next forward gathers the partitions just written."""
    persistent = list(getattr(engine.optimizer, "persistent_parameters", []))
    if persistent:
        persistent[0].partition(persistent)


def loss_scaler_state(engine) -> dict | None:
    """A copy of the loss scaler's attributes (current scale, hysteresis, ...); None without one."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return copy.deepcopy(vars(scaler)) if scaler is not None else None


def set_loss_scaler_state(engine, state: dict | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state is not None and scaler is not None:
        vars(scaler).update(copy.deepcopy(state))


# ---------------------------------------------------------------- the engine

def engine_counters(engine) -> dict:
    return {key: getattr(engine, key) for key in COUNTERS}


def set_engine_counters(engine, counters: dict) -> None:
    for key, value in counters.items():
        setattr(engine, key, value)


# ---------------------------------------------------------------- the optimizer step
#
# Two copies of every gradient that DeepSpeed's ZeRO-3 optimizer step makes, removed
# (docs/benchmarks.md, the step against a plain loop).  `streamline_step(engine)` replaces two
# methods on the one DeepSpeedZeroOptimizer_Stage3 instance that engine.build_engine made
# (nothing else in the process changes).  Both keep ZeRO-3's semantics at any number of ranks:
# each rank still holds, norms and steps only its own gradient partition, and the norm is one
# all-reduced sum, the same on every rank.
# - The gradient norm (for clipping): DeepSpeed's get_grad_norm_direct copies each gradient
#   partition to fp64 to take its norm, a fresh full-size fp64 temporary a step (180 MB for
#   MiniLM's 22.5M scores).  Here: fp64 norms of GRAD_NORM_CHUNK-element slices (vector_norm
#   in fp64: each slice is cast into a small temporary, not the whole partition at once;
#   _foreach_norm in fp64 was 2x slower on the CPU), their squares summed: 22.5M bf16 values 0.05 CPU-s, not 0.12; ~1e-16 from DeepSpeed's value.
#   fp64 as DeepSpeed's: an fp32 norm (~1e-6 off) changed the clipped update enough that an
#   IMP run with the optimizer offloaded (DeepSpeed's own norm) and one without no longer
#   gave the same masks (tests/test_imp.py).
# - The fp32 gradient of a sub-group: DeepSpeed concatenates the sub-group's gradient
#   partitions and casts the concatenation to the master dtype (two full-size copies in bf16,
#   one in fp32).  The partitions are adjacent views of one flat buffer, so here the flat view
#   is cast once (bf16), or used as it is (fp32: the buffer is rewritten by the next backward
#   and not read after the step).
# Installed only where the norm is DeepSpeed's plain one: no model or sequence parallelism,
# the partition group is the whole world (sharding's all-reduce is over the world), no CPU
# offload of the optimizer (which takes other paths).

GRAD_NORM_CHUNK = 1 << 16  # elements per partial norm


def streamline_step(engine) -> bool:
    """Install both overrides on the engine's ZeRO-3 optimizer; False (nothing changed) where they do not apply."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    optimizer = engine.optimizer
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
    chunks = [c for g in gradients for c in g.reshape(-1).split(GRAD_NORM_CHUNK)]
    if chunks:
        norms = [torch.linalg.vector_norm(c, 2, dtype=torch.float64) for c in chunks]  # a slice-sized fp64 cast each
        squares = torch.stack(norms).square().sum()
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
    master.grad = flat if flat.dtype == master.dtype else _fp32_grad_buffer(self, sub_group_id, master).copy_(flat)
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_synchronized_device():
        flat.record_stream(get_accelerator().current_stream())  # as DeepSpeed does for each partition
    self.averaged_gradients[sub_group_id] = None


def _fp32_grad_buffer(self, sub_group_id: int, master: torch.Tensor) -> torch.Tensor:
    """Where sub-group `sub_group_id`'s fp32 gradient is written: on the CPU one buffer kept
    from step to step (4 bytes per score of this rank's partition, held between steps too).
    A fresh one is a fresh mapping (far above glibc's mmap threshold) that the cast page-faults
    in every step: MiniLM's 22.5M bf16 -> fp32 took 42 ms so, 4 ms into a kept buffer (1 thread).
    On an accelerator the caching allocator already reuses the block: a fresh one, as DeepSpeed."""
    if master.device.type != "cpu":
        return torch.empty_like(master)
    kept = vars(self).setdefault("_tamt_fp32_grads", {})
    if sub_group_id not in kept:
        kept[sub_group_id] = torch.empty_like(master)
    return kept[sub_group_id]


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


# ---------------------------------------------------------------- one rank: the module hooks
#
# ZeRO-3 runs its parameter coordinator before and after every module's forward and backward
# (MiniLM: ~160 modules, three passes a KD step): it fetches the module's parameters, records or
# replays the prefetch trace, and releases them again, all in Python; ~9% of a MiniLM bf16 step
# at one rank (docs/benchmarks.md).  At one rank there is nothing to fetch: a gathered parameter
# is a view of its own partition.  So there `one_rank_settings` keeps every parameter gathered
# (persistent), and `skip_coordinator` replaces the coordinator's four calls on this engine by
# what is left of them: the module stack DeepSpeed keeps for external parameters, and a gather
# of what something else released (checkpoint loading, GatheredParameters, empty_partition_cache).
# The hooks themselves, and the autograd functions they wrap around each module, still run:
# backward adds up gradients in the same order, so the step is bit for bit the full path's
# (tests/test_one_rank_step.py).  Not with parameter offload: persistent parameters would stay
# on the accelerator, the memory that offload is asked to save.

def one_rank_settings(zero_config: dict) -> dict:
    """A one-rank ZeRO-3 config: the gradient bucket all-reduced in place (the reduce-scatter
    path concatenates and copies every gradient to scatter it to itself; an all-reduce at one
    rank is a no-op), and every parameter persistent unless parameters are offloaded."""
    out = {**zero_config, "reduce_scatter": False}
    if (zero_config.get("offload_param") or {}).get("device", "none") in ("none", None):
        out["stage3_param_persistence_threshold"] = sys.maxsize
    return out


def skip_coordinator(engine) -> bool:
    """At one rank with every parameter persistent: the module hooks stop calling ZeRO-3's
    parameter coordinator (above).  False (nothing changed) anywhere else."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
    from deepspeed.utils import z3_leaf_module

    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None or sharding.world_size() != 1:
        return False
    if not all(sharding.stays_gathered(p) for p in engine.module.parameters()):
        return False

    def gathered(module):
        sharding.gather_released(iter_params(module, recurse=z3_leaf_module(module)))

    def pre_forward(module):
        parameter_offload.FWD_MODULE_STACK.append(module)  # popped by DeepSpeed's post-forward hook
        gathered(module)

    offload.pre_sub_module_forward_function = pre_forward
    offload.pre_sub_module_backward_function = gathered
    offload.post_sub_module_forward_function = offload.post_sub_module_backward_function = lambda module: None
    return True


def no_backward_hooks_without_grad(engine) -> None:
    """ZeRO-3 wraps every module's outputs and inputs in autograd functions whose backward
    fetches and releases the module's parameters, also in a pass without autograd (the KD
    teacher, evaluation), where no backward can follow: ~9 ms of MiniLM's teacher pass
    (docs/benchmarks.md).  DeepSpeed looks the functions up on the module at each call
    (`pre_bwd_fn`, `post_bwd_fn`): each is replaced by one that passes its tensors through
    when grad mode is off.  With grad mode on nothing changes, so neither does any backward."""
    for module in engine.module.modules():
        for name in ("pre_bwd_fn", "post_bwd_fn"):
            function = vars(module).get(name)
            if function is not None and not isinstance(function, _OnlyWithGrad):
                setattr(module, name, _OnlyWithGrad(function))


class _OnlyWithGrad:
    def __init__(self, function):
        self.function = function

    def apply(self, tensor):
        return self.function.apply(tensor) if torch.is_grad_enabled() else tensor


@contextlib.contextmanager
def same_step(model):
    """Forward passes in this block continue the ZeRO-3 step that the last forward began.

    ZeRO-3 begins a step at every forward of the engine's model: it records the order in
    which modules fetch their parameters once, then replays it every step to prefetch (and
    drops it, at the first module out of order).  A KD step runs two forwards, the teacher's
    (masks off: the score modules do not run) and the student's; as two steps they would
    alternate and each would drop the other's record, after prefetching for it.  Run as one
    (teacher, student, backward), every KD step repeats the record.  A plain module (no
    engine) has no record: nothing to do."""
    optimizer = getattr(model, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)  # training engine / inference engine
    coordinator = offload.get_param_coordinator() if hasattr(offload, "get_param_coordinator") else None
    if coordinator is None:
        yield
        return
    coordinator.reset_step = lambda: None  # shadows the method the model's forward pre-hook calls
    try:
        yield
    finally:
        del coordinator.reset_step


def release_prefetched(model) -> None:
    """End forward passes that no backward follows (evaluation) under a replayed trace.

    Replaying the KD step's trace, ZeRO-3 prefetches after the student's forward what the
    backward will need; with no backward those parameters stay gathered or in flight, and the
    next gather outside a forward (the export's full masks) meets one in flight ("Cannot
    partition a param in flight").  DeepSpeed's empty_partition_cache waits for and releases
    them all; the next forward gathers what it needs again.  A plain module: nothing to do."""
    if hasattr(model, "empty_partition_cache"):
        model.empty_partition_cache()
