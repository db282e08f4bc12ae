"""The one place that reaches into DeepSpeed's ZeRO-3 optimizer and engine.

sharding.py knows how ZeRO-3 lays a parameter out (`ds_tensor`, `ds_shape`, ...); this
module knows where the ZeRO-3 optimizer keeps what a search reads and restores: the
fp32 master copy of each trainable parameter and its optimizer state (exp_avg, ...),
the base optimizer's lazily created state and parameter groups, the loss scaler, the
small parameters it keeps gathered ("persistent"), the engine's step counters, and the
local gradient partition.  Little of this is DeepSpeed's documented API, and a DeepSpeed
release may move any of it, so pyproject.toml caps deepspeed at the newest version
tested; the README ("Testing a newer DeepSpeed") names the tests that cover it, and
tests/test_distributed_boundary.py fails if another module uses these names.
"""
from __future__ import annotations

import contextlib
import copy

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
