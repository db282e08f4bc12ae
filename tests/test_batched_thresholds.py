"""A threshold reset cuts every matrix in the same few steps, whatever their number: the cuts of
many matrices of different sizes together are each matrix's cut alone and the one-process
torch.sort answer (per matrix and global scope, ties included, simulated ranks), and the
number of operations that make an accelerator wait for its host is the same for 3 matrices
as for 40 (a reset of bert-base has ~150 matrices)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tamt_ds import thresholds
from tamt_ds.sharding import Shard
from tamt_ds.thresholds import bottom_k_cuts
from tests.test_sim_thresholds import check

SCOPES = ("per_matrix", "global")


def many_matrices(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Sizes from 1 entry to a few thousand; tied levels (0 and -0 among them), bf16-rounded
    noise (ties near 0.02, as trained bf16 scores) and distinct fp32 values, in turn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        shape = (int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g)))
        kind = i % 3
        if kind == 0:
            m = torch.randint(-2, 3, shape, generator=g).float() * 0.01
            m[torch.rand(shape, generator=g) < 0.3] = -0.0
        elif kind == 1:
            m = (0.02 + torch.randn(shape, generator=g) * 0.001).to(torch.bfloat16).float()
        else:
            m = torch.randn(shape, generator=g)
        out.append(m)
    return out


def quotas(mats, scope: str, sparsity: float = 0.7):
    if scope == "global":
        return int(sum(m.numel() for m in mats) * sparsity)
    ks = [int(m.numel() * sparsity) for m in mats]
    ks[1], ks[-1] = 0, mats[-1].numel()  # none and all of a matrix
    return ks


def whole(m: torch.Tensor) -> Shard:
    return Shard(m.reshape(-1), 0, m.numel())


@pytest.mark.parametrize("path", ["cpu", "accelerator"])
@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize("scope", SCOPES)
def test_many_matrices_cut_together_equal_one_process_sort(world, scope, path, monkeypatch):
    if path == "accelerator":  # no compaction between passes (its count would wait for the device)
        monkeypatch.setattr(thresholds, "host_counts_are_free", lambda device: False)
    mats = many_matrices(40, seed=world)
    check(mats, quotas(mats, scope), world)


def test_per_matrix_cuts_together_equal_each_matrix_cut_alone():
    mats = many_matrices(40)
    ks = quotas(mats, "per_matrix")
    together = bottom_k_cuts([whole(m) for m in mats], ks, reduce=False)
    alone = [bottom_k_cuts([whole(m)], [k], reduce=False)[0] for m, k in zip(mats, ks)]
    assert together == alone
    assert sum(c.tie_key not in (-1, (1 << 31) - 1) for c in together) > 5  # partial ties were exercised


# Operations after which the host must wait for an accelerator: reading a value (item, int,
# bool) and those whose output size depends on the values (boolean indexing, nonzero, ...).
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2"}


class CountHostWaits(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        self.count += name in SYNCING or bool_index
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scope", SCOPES)
def test_host_waits_do_not_grow_with_the_number_of_matrices(scope, monkeypatch):
    monkeypatch.setattr(thresholds, "host_counts_are_free", lambda device: False)  # the accelerator's path
    waits = {}
    for count in (3, 40):
        mats = many_matrices(count)
        with CountHostWaits() as mode:
            cuts = bottom_k_cuts([whole(m) for m in mats], quotas(mats, scope), reduce=False)
        assert any(c.tie_key not in (-1, (1 << 31) - 1) for c in cuts)  # the tie selection ran too
        waits[count] = mode.count
    assert waits[40] == waits[3], waits
