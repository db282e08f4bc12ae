"""Exact bottom-k selection over sharded tensors, without gathering any of them.

A *cut* says which entries of a matrix are pruned: those with value < tau, plus the
ties (value == tau) whose flat index is < boundary.  Choosing tau as the k-th
smallest value and boundary so that exactly k - #(value < tau) ties fall below it
prunes exactly k entries, whatever the ties, deterministically (lowest flat index
first).  Real checkpoints have tied magnitudes, bf16 scores tie a lot, and untrained
matrices keep their {0, 2*tau0} scores, so ties are the normal case.

The k-th value is found by radix selection on the float bits: 4 passes, each one
256-bin histogram per matrix, summed over ranks with a single all-reduce.  Only
counts travel between ranks, never values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tamt_ds import sharding
from tamt_ds.sharding import Shard


@dataclass
class Cut:
    tau: float
    boundary: int  # ties with flat index < boundary are pruned

    def keep(self, values: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Bool keep-mask of `values` (any shape, flattened order), which start at flat index `offset`."""
        keep = values > self.tau
        pruned_ties = self.boundary - offset
        if pruned_ties < values.numel():  # some ties here are kept
            ties = values == self.tau
            if pruned_ties > 0:
                ties.view(-1)[:pruned_ties] = False
            keep |= ties
        return keep


KEEP_ALL = Cut(float("-inf"), 0)


def _sort_keys(values: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 keys in [0, 2^32) whose order is the float order."""
    bits = (values.detach().float() + 0.0).view(torch.int32).to(torch.int64)  # +0.0 folds -0 into +0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def _key_to_float(key: int) -> float:
    bits = key - 2**31
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _kth_keys(groups: Sequence[Sequence[Shard]], ks: Sequence[int], reduce: bool) -> list[int]:
    """Key of the k-th smallest value (1-based) of each group of shards."""
    n = len(groups)
    prefix = torch.zeros(n, dtype=torch.int64)
    remaining = torch.tensor(list(ks), dtype=torch.int64)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(n, 256, dtype=torch.int64)
        for g, shards in enumerate(groups):
            for shard in shards:
                keys = _sort_keys(shard.values)
                if shift < 24:
                    keys = keys[(keys >> (shift + 8)) == prefix[g]]
                hist[g] += torch.bincount((keys >> shift) & 255, minlength=256).cpu()
        sharding.all_reduce_(hist, enabled=reduce)
        cum = hist.cumsum(1)
        digit = (cum < remaining.unsqueeze(1)).sum(1)  # first bin whose running count reaches k
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
        remaining -= below
        prefix = (prefix << 8) | digit
    return prefix.tolist()


def _boundaries(groups, keys, quotas, reduce: bool) -> list[list[int]]:
    """For each matrix, the flat index just past its last pruned tie.

    A group's quota of ties is spent on its matrices in order (global scope has one
    group of all matrices), and within a matrix in flat order, which ranks hold as
    consecutive slices.  Only tie counts are exchanged.
    """
    out = []
    me = sharding.rank() if reduce else 0
    for shards, key, quota in zip(groups, keys, quotas):
        ties = [(_sort_keys(s.values) == key) for s in shards]
        per_rank = sharding.all_gather_counts(torch.tensor([int(t.sum()) for t in ties]), enabled=reduce)
        total = per_rank.sum(0)
        bounds = torch.zeros(len(shards), dtype=torch.int64)
        for m, shard in enumerate(shards):
            q = min(max(quota - int(total[:m].sum()), 0), int(total[m]))
            if q == int(total[m]):
                bounds[m] = shard.numel if q else 0
                continue
            before_me = int(per_rank[:me, m].sum())
            if before_me < q <= before_me + int(per_rank[me, m]):  # this rank holds the q-th tie
                bounds[m] = shard.offset + int(ties[m].nonzero()[q - before_me - 1]) + 1
        sharding.all_reduce_(bounds, op="max", enabled=reduce)
        out.append(bounds.tolist())
    return out


def bottom_k_cuts(shards: Sequence[Shard], ks: Sequence[int] | int, *, reduce: bool) -> list[Cut]:
    """Cuts pruning exactly ks[i] entries of matrix i (per-matrix), or, when `ks` is a
    single int, exactly ks entries over all matrices together (global scope, ties
    spent in matrix order).  `reduce`: shards are disjoint across ranks, so sum counts."""
    if isinstance(ks, int):
        if ks <= 0:
            return [KEEP_ALL for _ in shards]
        groups, quotas_k = [list(shards)], [ks]
    else:
        groups, quotas_k = [[s] for s in shards], list(ks)
    live = [i for i, k in enumerate(quotas_k) if k > 0]
    keys = _kth_keys([groups[i] for i in live], [quotas_k[i] for i in live], reduce)
    # How many entries lie strictly below the k-th value decides how many ties to prune.
    less = torch.zeros(len(live), dtype=torch.int64)
    for j, i in enumerate(live):
        less[j] = sum(int((_sort_keys(s.values) < keys[j]).sum()) for s in groups[i])
    sharding.all_reduce_(less, enabled=reduce)
    quotas = [quotas_k[i] - int(less[j]) for j, i in enumerate(live)]
    bounds = _boundaries([groups[i] for i in live], keys, quotas, reduce)

    cuts: list[Cut] = []
    if isinstance(ks, int):
        tau = _key_to_float(keys[0])
        return [Cut(tau, b) for b in bounds[0]]
    result = {i: Cut(_key_to_float(keys[j]), bounds[j][0]) for j, i in enumerate(live)}
    for i in range(len(shards)):
        cuts.append(result.get(i, KEEP_ALL))
    return cuts
