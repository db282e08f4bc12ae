"""A search checkpoint written by 512 ranks, restored on 8 and on 1 bit for bit (and 7 -> 3,
1 -> 64): the real checkpoint.save and checkpoint.find / load, each run once per simulated rank
(tests/simworld.py), over ZeRO-3's layout of the parameters (padded to a multiple of the world
size, rank r holding [r * P, (r + 1) * P)).  Only DeepSpeed's accessors of a partition's fp32
master and optimizer state are stood in for, by tensors of that partition.  The real 2-rank
ZeRO-3 round trip is tests/test_checkpoint.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tamt_ds import checkpoint, zero
from tests.simworld import run_ranks, split, zero_param

pytestmark = pytest.mark.sim

SHAPES = {"encoder.layer.0.attention.self.query.mask_scores": (40, 24), "embeddings.mask_scores": (101, 16),
          "pooler.dense.mask_scores": (3, 5)}  # 960, 1616 and 15 entries: 15 < 512 ranks leave most empty
PER_ELEMENT = ["exp_avg", "exp_avg_sq"]
MODEL = {"name": "sim", "sha256": "0" * 64}


def full_state(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 master and optimizer states, whole (what the ranks hold together)."""
    g = torch.Generator().manual_seed(seed)
    return {name: {key: torch.randn(shape, generator=g) for key in ("fp32", *PER_ELEMENT)}
            for name, shape in SHAPES.items()}


def rank_engine(full: dict, world: int, rank: int) -> SimpleNamespace:
    """Rank `rank`'s engine of a `world`-rank ZeRO-3 run holding `full` (zeros when None)."""
    params = {}
    for name, shape in SHAPES.items():
        state = full[name] if full else {k: torch.zeros(shape) for k in ("fp32", *PER_ELEMENT)}
        p = zero_param(state["fp32"].to(torch.bfloat16), world, rank)  # the training-dtype partition
        p.requires_grad = True
        p.partition = {k: zero_param(v, world, rank).ds_tensor for k, v in state.items()}  # fp32, padded
        params[name] = p
    module = SimpleNamespace(named_parameters=lambda: list(params.items()))
    opt = SimpleNamespace(param_groups=[{"lr": 1e-3, "weight_decay": 0.0, "params": []}], state={"step": 7})
    return SimpleNamespace(module=module, optimizer=opt, lr_scheduler=None, global_steps=7, global_samples=56,
                           skipped_steps=0, params=params)


@pytest.fixture
def stand_ins(monkeypatch):
    """DeepSpeed's per-partition accessors, on the partitions rank_engine made."""
    monkeypatch.setattr(zero, "optimizer_state_layout", lambda e: (list(PER_ELEMENT), dict(e.optimizer.state)))
    monkeypatch.setattr(zero, "create_optimizer_state", lambda e, per, scalars: e.optimizer.state.update(scalars))
    monkeypatch.setattr(zero, "optimizer_param_groups", lambda e: e.optimizer.param_groups)
    monkeypatch.setattr(zero, "local_fp32_master", lambda p: p.partition["fp32"])
    monkeypatch.setattr(zero, "set_local_fp32_master", lambda p, v: p.partition["fp32"].copy_(v))
    monkeypatch.setattr(zero, "local_optimizer_state", lambda p, key: p.partition[key])
    monkeypatch.setattr(zero, "set_local_optimizer_state", lambda p, v, key: p.partition[key].copy_(v))
    monkeypatch.setattr(zero, "release_persistent_parameters", lambda e: None)
    monkeypatch.setattr(zero, "loss_scaler_state", lambda e: None)
    monkeypatch.setattr(zero, "set_loss_scaler_state", lambda e, s: None)


def save_at(root: str, world: int, full: dict) -> None:
    def rank_fn(r: int):
        return checkpoint.save(rank_engine(full, world, r), root, step=7, state={"step": 7},
                               data={"rank": r}, model=MODEL)

    assert set(run_ranks(world, rank_fn)) == {"step7"}


def load_at(root: str, world: int) -> list[tuple[SimpleNamespace, checkpoint.Restored]]:
    def rank_fn(r: int):
        engine = rank_engine(None, world, r)
        return engine, checkpoint.load(engine, checkpoint.find(root, MODEL))

    return run_ranks(world, rank_fn)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("before, after", [(512, 8), (512, 1), (7, 3), (1, 64)])
def test_a_checkpoint_restores_bit_for_bit_on_another_world_size(before, after, stand_ins, tmp_path):
    full = full_state(before * 31 + after)
    save_at(str(tmp_path), before, full)
    assert len(list((tmp_path / "step7").glob("rank*.pt"))) == before
    restored = load_at(str(tmp_path), after)
    for r in range(after) if after <= 8 else split(after):
        engine, got = restored[r]
        assert got.world_size == before and got.step == 7 and got.data == [{"rank": i} for i in range(before)]
        assert engine.optimizer.state == {"step": 7} and engine.global_samples == 56
        want = rank_engine(full, after, r)
        for name in SHAPES:
            p, q = engine.params[name], want.params[name]
            for key in ("fp32", *PER_ELEMENT):  # this rank's slice of the whole, padding 0
                assert torch.equal(bits(p.partition[key]), bits(q.partition[key])), (before, after, r, name, key)
            assert torch.equal(bits(p.ds_tensor), bits(q.ds_tensor)), (before, after, r, name)
    # The ranks' slices put together are the whole state, bit for bit.
    for name, shape in SHAPES.items():
        for key in ("fp32", *PER_ELEMENT):
            whole = torch.cat([restored[r][0].params[name].partition[key] for r in range(after)])
            assert torch.equal(bits(whole[:full[name][key].numel()]), bits(full[name][key].reshape(-1))), (name, key)


def test_a_full_disk_on_one_rank_stops_every_rank_with_one_line(stand_ins, tmp_path, monkeypatch):
    """8 ranks; rank 5's file of checkpoint step9 lands on a full device (/dev/full: the kernel's
    own ENOSPC, under torch.save's zip writer): every rank stops with the same one line naming
    rank 5 and the path, the incomplete step9 is deleted, step7 stays the one to resume from.
    (A real 8-rank run on a full tmpfs: tests/test_faults_at_size.py, `make test-faults`.)"""
    import os
    import tempfile

    from tamt_ds import sharding

    world, root, full = 8, str(tmp_path / "ckpt"), full_state(0)
    save_at(root, world, full)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        fd, path = real_mkstemp(*args, dir=dir, **kwargs)
        if sharding.rank() == 5 and os.path.basename(dir) == "step9":
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)

    def rank_fn(r: int):
        try:
            checkpoint.save(rank_engine(full, world, r), root, step=9, state={"step": 9}, data={"rank": r}, model=MODEL)
        except checkpoint.CheckpointError as e:
            return str(e)

    messages = run_ranks(world, rank_fn)
    assert len(set(messages)) == 1, messages  # the same text on every rank: printed once
    assert messages[0].startswith("checkpoint step9 not saved: no space left on device on rank 5 ("), messages[0]
    assert messages[0].endswith(f"writing {root}/step9/rank5.pt: free space there, lower --save_total_limit (now 2), "
                                f"or pass another --output_dir; --resume continues from step7"), messages[0]
    assert sorted(os.listdir(root)) == ["latest", "step7"]
    assert checkpoint.find(root, MODEL).tag == "step7"
