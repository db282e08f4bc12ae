"""Exact bottom-k selection over sharded tensors, without gathering any of them.

A *cut* says which entries of a matrix are pruned: those with value < tau, plus the
ties (value == tau) whose *tie key* is <= tie_key.  The tie key of an entry is a
seeded bijective hash of its flat index (`tie_keys`), so ties are pruned in a
pseudo-random order that is the same on every rank, and exactly k entries are pruned
whatever the ties.  Real checkpoints have tied magnitudes, untrained matrices keep
their {0, 2*tau0} scores, and bf16 scores tie a lot (near 0.02 bf16 has ~128 values
per octave, so thousands of scores share the k-th value): pruning ties in flat-index
order would prune the first rows (and the lowest token ids of an embedding) first.

tau is found by radix selection on the float bits: 4 passes, each one 256-bin
histogram per matrix, summed over ranks with a single all-reduce.  When only some
ties are pruned, the same selection runs over the tie keys of the ties.  Only counts
travel between ranks, never values.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tamt_ds import sharding
from tamt_ds.sharding import Shard

# Part of a mask's definition: another seed prunes other ties.  Any 31-bit constant.
TIE_SEED = 0x2545F491
_KEY_MASK = (1 << 31) - 1
MAX_MATRIX_NUMEL = 1 << 31  # tie keys are a permutation of [0, 2^31): flat indices must fit
NO_TIES = -1  # tie_key that prunes no tie
ALL_TIES = _KEY_MASK  # tie_key that prunes every tie (the largest key)
_CACHED_KEYS_MAX = 1 << 23  # whole matrices up to this size keep their keys (int32) for the forward


def tie_keys(index: torch.Tensor) -> torch.Tensor:
    """Tie keys of flat indices in [0, 2^31): a seeded bijection of [0, 2^31) onto itself
    (a 31-bit variant of the lowbias32 integer hash), int64.

    Every step is invertible on 31-bit values (adding a constant, xor with a right
    shift, multiplying by an odd constant, all mod 2^31), so distinct indices get
    distinct keys; products stay below 2^63, so no int64 overflow on any device.
    """
    h = (index + TIE_SEED) & _KEY_MASK
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _KEY_MASK
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _KEY_MASK
    return h ^ (h >> 16)


@functools.lru_cache(maxsize=8)
def _matrix_tie_keys(numel: int, device: torch.device) -> torch.Tensor:
    """Tie keys of a whole matrix, kept per size: the forward applies the cut to whole
    matrices every step, and a handful of distinct shapes cost a few MB (int32)."""
    return tie_keys(torch.arange(numel, device=device)).to(torch.int32)


@dataclass(frozen=True)
class Cut:
    tau: float
    tie_key: int = NO_TIES  # ties (value == tau) whose tie key is <= tie_key are pruned

    def keep(self, values: torch.Tensor, offset: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool keep-mask of `values`: a whole matrix (offset 0), a flat shard that starts at
        flat index `offset`, or rows gathered from a matrix (`rows`: their row indices;
        values[..., j] is column j).  The same entry gets the same answer in every form."""
        if self.tie_key < 0:
            return values >= self.tau
        if self.tie_key >= ALL_TIES:
            return values > self.tau
        keys = _keys_of(values, offset, rows)
        return torch.where(keys <= self.tie_key, values > self.tau, values >= self.tau)


def _keys_of(values: torch.Tensor, offset: int, rows: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        cols = values.shape[-1]
        return tie_keys(rows.unsqueeze(-1) * cols + torch.arange(cols, device=values.device))
    if offset == 0 and values.dim() > 1 and values.numel() <= _CACHED_KEYS_MAX:
        return _matrix_tie_keys(values.numel(), values.device).view(values.shape)
    return tie_keys(torch.arange(offset, offset + values.numel(), device=values.device)).view(values.shape)


KEEP_ALL = Cut(float("-inf"))


def _sort_keys(values: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 keys in [0, 2^32) whose order is the float order."""
    bits = (values.detach().float() + 0.0).view(torch.int32).to(torch.int64)  # +0.0 folds -0 into +0
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def _key_to_float(key: int) -> float:
    bits = key - 2**31
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _kth_smallest(groups: Sequence[Sequence], ks: Sequence[int], keys_of: Callable, reduce: bool) -> list[int]:
    """The k-th smallest (1-based) key of each group of items; `keys_of(item)` gives this
    rank's int64 keys in [0, 2^32) of one item (recomputed each pass: nothing big is kept)."""
    n = len(groups)
    prefix = torch.zeros(n, dtype=torch.int64)
    remaining = torch.tensor(list(ks), dtype=torch.int64)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(n, 256, dtype=torch.int64)
        for g, items in enumerate(groups):
            for item in items:
                keys = keys_of(item)
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


def bottom_k_cuts(shards: Sequence[Shard], ks: Sequence[int] | int, *, reduce: bool) -> list[Cut]:
    """Cuts pruning exactly ks[i] entries of matrix i (per matrix), or, when `ks` is a
    single int, exactly ks entries over all matrices together (global scope: one tau,
    ties ordered by tie key, and by matrix order among equal keys of different
    matrices).  `reduce`: shards are disjoint across ranks, so sum counts."""
    n = len(shards)
    for s in shards:
        if s.numel > MAX_MATRIX_NUMEL:
            raise ValueError(f"a masked matrix has {s.numel} entries; tie keys cover at most {MAX_MATRIX_NUMEL}")
    groups, quotas = ([list(range(n))], [ks]) if isinstance(ks, int) else ([[i] for i in range(n)], list(ks))
    live = [g for g, k in enumerate(quotas) if k > 0]
    # tau: the k-th smallest value of each group.
    taus = _kth_smallest([[shards[i] for i in groups[g]] for g in live], [quotas[g] for g in live],
                         lambda s: _sort_keys(s.values), reduce)
    tau_of = {i: tau for g, tau in zip(live, taus) for i in groups[g]}

    def ties(i: int) -> torch.Tensor:
        return _sort_keys(shards[i].values) == tau_of[i]

    # Per matrix: entries below tau, ties at tau.  The group prunes k - below ties.
    counts = torch.zeros(n, 2, dtype=torch.int64)
    for i in tau_of:
        keys = _sort_keys(shards[i].values)
        counts[i, 0] = int((keys < tau_of[i]).sum())
        counts[i, 1] = int((keys == tau_of[i]).sum())
    sharding.all_reduce_(counts, enabled=reduce)
    pruned_ties = {g: quotas[g] - int(counts[groups[g], 0].sum()) for g in live}
    tie_key = {i: ALL_TIES for i in tau_of}
    partial = [g for g in live if pruned_ties[g] < int(counts[groups[g], 1].sum())]
    if partial:
        def keys_of_ties(i: int) -> torch.Tensor:
            return tie_keys(shards[i].offset + ties(i).nonzero().view(-1))

        boundary = _kth_smallest([groups[g] for g in partial], [pruned_ties[g] for g in partial], keys_of_ties, reduce)
        # Ties below the boundary key, and which matrices hold a tie at it (at most one
        # each: keys are distinct within a matrix).
        at = torch.zeros(n, 2, dtype=torch.int64)
        for g, key in zip(partial, boundary):
            for i in groups[g]:
                keys = keys_of_ties(i)
                at[i, 0], at[i, 1] = int((keys < key).sum()), int((keys == key).sum())
        sharding.all_reduce_(at, enabled=reduce)
        for g, key in zip(partial, boundary):
            left = pruned_ties[g] - int(at[groups[g], 0].sum())  # ties at the boundary key still to prune
            for i in groups[g]:
                takes = left > 0 and int(at[i, 1]) > 0
                left -= int(takes)
                tie_key[i] = key if takes else key - 1
    return [Cut(_key_to_float(tau_of[i]), tie_key[i]) if i in tau_of else KEEP_ALL for i in range(n)]
