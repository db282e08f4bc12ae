"""The exact bottom-k selection at 1 to 1024 ranks (simulated in one process, tests/simworld.py):
each rank holds its ZeRO-3 slice of every matrix (sharding.local_shard on the padded layout),
and the cuts every rank computes prune exactly the entries a single-process torch.sort of the
whole values picks, ties included.  The real 2-rank run is tests/test_ties.py."""
from __future__ import annotations

import pytest
import torch

from tamt_ds import sharding
from tamt_ds.thresholds import bottom_k_cuts, tie_keys
from tests.simworld import WORLD_SIZES, run_ranks, split, zero_param

pytestmark = pytest.mark.sim

SHAPES = [(37, 29), (16, 64), (5, 7), (1, 3)]


def matrices(seed: int) -> list[torch.Tensor]:
    """Scores with many ties: a few levels, 0 and -0 among them, and bf16-rounded noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        if i % 2 == 0:
            m = torch.randint(-2, 4, shape, generator=g).float() * 0.25
            m[m == 0] = torch.tensor(-0.0).expand(int((m == 0).sum())).where(
                torch.rand(int((m == 0).sum()), generator=g) < 0.5, torch.tensor(0.0))
        else:
            m = (torch.rand(shape, generator=g) * 0.05).to(torch.bfloat16).float()
        out.append(m)
    return out


def reference_pruned(mats: list[torch.Tensor], ks) -> list[torch.Tensor]:
    """Per matrix, which entries one process prunes: sort by (value, tie key, matrix) with
    torch.sort on the concatenated values, and take the first k of each group."""
    groups = [list(range(len(mats)))] if isinstance(ks, int) else [[i] for i in range(len(mats))]
    quotas = [ks] if isinstance(ks, int) else list(ks)
    pruned = [torch.zeros(m.numel(), dtype=torch.bool) for m in mats]
    for group, k in zip(groups, quotas):
        values = torch.cat([mats[i].reshape(-1) for i in group])
        keys = torch.cat([tie_keys(torch.arange(mats[i].numel())) for i in group])
        which = torch.cat([torch.full((mats[i].numel(),), i) for i in group])
        index = torch.cat([torch.arange(mats[i].numel()) for i in group])
        order = torch.arange(len(values))  # matrix order, then (stable) tie key, then value
        order = order[torch.sort(keys[order], stable=True).indices]
        order = order[torch.sort(values[order], stable=True).indices]
        for j in order[:k].tolist():
            pruned[int(which[j])][int(index[j])] = True
    return [p.view(m.shape) for p, m in zip(pruned, mats)]


def simulated_cuts(mats: list[torch.Tensor], ks, world: int):
    """What each rank of `world` computes: its shards, and the cuts from them."""
    def rank_fn(r: int):
        shards = [sharding.local_shard(zero_param(m, world, r)) for m in mats]
        reduce = world > 1  # sharding.shards_are_disjoint of partitioned parameters
        return shards, bottom_k_cuts(shards, ks, reduce=reduce)

    return run_ranks(world, rank_fn)


def check(mats, ks, world):
    expected = reference_pruned(mats, ks)
    ranks = simulated_cuts(mats, ks, world)
    first_cuts = ranks[0][1]
    for r, (shards, cuts) in enumerate(ranks):
        assert cuts == first_cuts, (world, r)  # every rank the same cut
    covered = [torch.zeros(m.numel(), dtype=torch.int64) for m in mats]
    for r in split(world) + [world - 1]:
        shards, cuts = ranks[r]
        for i, (shard, cut) in enumerate(zip(shards, cuts)):
            # A rank's view of its slice agrees with the whole-matrix answer.
            want = ~expected[i].reshape(-1)[shard.offset:shard.offset + len(shard.values)]
            assert torch.equal(cut.keep(shard.values, shard.offset), want), (world, r, i)
    for shards, _ in ranks:  # the slices partition every matrix
        for i, shard in enumerate(shards):
            covered[i][shard.offset:shard.offset + len(shard.values)] += 1
            assert shard.numel == mats[i].numel()
    assert all(bool((c == 1).all()) for c in covered), world
    for i, (m, cut) in enumerate(zip(mats, first_cuts)):
        assert torch.equal(cut.keep(m), ~expected[i]), (world, i)
    pruned = [int(expected[i].sum()) for i in range(len(mats))]
    if isinstance(ks, int):
        assert sum(pruned) == ks
    else:
        assert pruned == list(ks)
        for i, k in enumerate(ks):  # tau is the k-th smallest value, as torch.sort gives it
            if k:
                assert first_cuts[i].tau == float(torch.sort(mats[i].reshape(-1)).values[k - 1]), (world, i)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_per_matrix_cuts_equal_one_process_sort(world):
    mats = matrices(world)
    numels = [m.numel() for m in mats]
    edges = [0, numels[1], 1, numels[3] - 1]  # none, all, one, all but one
    for ks in ([int(n * 0.7) for n in numels], edges)[:1 if world >= 512 else 2]:  # 1024 ranks: ~2 s a case
        check(mats, ks, world)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_global_cut_equals_one_process_sort(world):
    mats = matrices(100 + world)
    total = sum(m.numel() for m in mats)
    for k in (int(total * 0.5), 1, total)[:1 if world >= 512 else 3]:
        check(mats, k, world)


# ---------------------------------------------------------------------------
# The masks as exported: MaskSet's cut on every rank's shards, then the full masks assembled from
# the ranks' partitions (MaskSet.full_masks, what export_search_outputs writes to mask.pt).


EXPORTS = [(1, "per_matrix"), (2, "per_matrix"), (3, "per_matrix"), (7, "global"), (8, "per_matrix"),
           (64, "per_matrix"), (512, "global"), (1024, "per_matrix")]  # each world once: ~2 s a case at 1024


@pytest.mark.parametrize("world, scope", EXPORTS)
def test_exported_masks_from_every_world_size_are_the_one_process_masks(world, scope):
    from types import SimpleNamespace

    from tamt_ds.masking import MaskSet, MaskSite

    mats = matrices(200 + world)
    sparsity = 0.7
    ks = int(sum(m.numel() for m in mats) * sparsity) if scope == "global" else [int(m.numel() * sparsity) for m in mats]
    expected = reference_pruned(mats, ks)

    def rank_fn(r: int):
        sites = [MaskSite(f"m{i}", SimpleNamespace(mask_score=zero_param(m, world, r))) for i, m in enumerate(mats)]
        masks = MaskSet(sites, sparsity, scope)
        masks.reset_thresholds()
        return [s.local_keep() for s in sites], masks.full_masks()

    ranks = run_ranks(world, rank_fn)
    for r in split(world):
        local, full = ranks[r]
        for i, m in enumerate(mats):
            assert torch.equal(full[f"m{i}"], ~expected[i]), (world, r, i)
    for i, m in enumerate(mats):  # the ranks' keep-shards put together are the same mask
        assert torch.equal(torch.cat([local[i] for local, _ in ranks]).view(m.shape), ~expected[i]), (world, i)
