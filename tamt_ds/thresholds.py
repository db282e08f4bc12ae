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
import math
import struct
from dataclasses import dataclass
from typing import Sequence

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
        # values >= tau, less the ties at tau with a key <= tie_key: one comparison of every
        # value, then the correction (this runs in every masked forward and backward, where
        # bf16 scores nearly always tie at tau; it was 3x slower as torch.where of three masks).
        return (values >= self.tau) ^ _pruned_ties(values, self.tau, self.tie_key, offset, rows)


def _pruned_ties(values: torch.Tensor, tau: float, tie_key: int, offset: int,
                 rows: torch.Tensor | None) -> torch.Tensor:
    """Bool: the entries of `values` (in a Cut.keep form) equal to tau whose tie key is <= tie_key."""
    at = _equal_to(values, tau)
    cached = rows is None and offset == 0 and values.dim() > 1 and values.numel() <= _CACHED_KEYS_MAX
    if cached:
        return at & (_matrix_tie_keys(values.numel(), values.device).view(values.shape) <= tie_key)
    if host_counts_are_free(values.device) and at.is_contiguous():  # hash only the ties (a few in a thousand):
        # hashing every gathered embedding row was most of its time
        flat = at.view(-1)
        ties = flat.nonzero().view(-1)
        flat[ties] = tie_keys(_flat_index(ties, values, offset, rows)) <= tie_key
        return at
    index = _flat_index(torch.arange(values.numel(), device=values.device), values, offset, rows)
    return at & (tie_keys(index).view(values.shape) <= tie_key)


def host_counts_are_free(device: torch.device) -> bool:
    """Whether an op whose output size depends on the values (nonzero, boolean indexing) is
    cheap here: on the CPU the count costs nothing, on an accelerator the host waits for it.
    (Tests set it False to run the accelerator's path on the CPU.)"""
    return device.type == "cpu"


def _flat_index(position: torch.Tensor, values: torch.Tensor, offset: int, rows: torch.Tensor | None) -> torch.Tensor:
    """Flat index in the matrix of the entries at flat `position`s of `values` (a Cut.keep form)."""
    if rows is None:
        return position + offset
    cols = values.shape[-1]
    return rows.reshape(-1)[position // cols] * cols + position % cols


_SAME_SIZE_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _equal_to(values: torch.Tensor, tau: float) -> torch.Tensor:
    """values == tau, compared as integers where that is the same: a nonzero tau that `values`'
    dtype holds exactly has one bit pattern (+0 and -0 are two, so 0 compares as floats).  A
    bf16 compare converts every value to fp32 on the CPU: as int16 it took half the time."""
    bits = _bits_of(tau, values.dtype)
    return values == tau if bits is None else values.view(_SAME_SIZE_INT[values.dtype]) == bits


@functools.lru_cache(maxsize=256)
def _bits_of(tau: float, dtype: torch.dtype) -> int | None:
    """tau's bit pattern in `dtype` as a signed integer; None where values == tau must compare floats."""
    if dtype not in _SAME_SIZE_INT or tau == 0 or not math.isfinite(tau):
        return None
    held = torch.tensor(tau, dtype=dtype)  # on the host: no device work
    return int(held.view(_SAME_SIZE_INT[dtype])) if float(held) == tau else None


KEEP_ALL = Cut(float("-inf"))


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose (signed) order is the float order of `values`: one cheap pass of int32
    work (positive floats' bits already sort; negative ones sort reversed, so flip them)."""
    bits = (values.detach().float() + 0.0).view(torch.int32)  # +0.0 folds -0 into +0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_to_float(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return struct.unpack("<f", struct.pack("<i", bits))[0]  # on the host: no tensor, no device


def _kth_smallest(groups: Sequence[Sequence[torch.Tensor]], ks: Sequence[int], reduce: bool,
                  device: torch.device) -> list[int]:
    """The k-th smallest (1-based) int32 key of each group of this rank's key tensors (on
    `device`), over all ranks.

    Radix selection on the key + 2^31 (unsigned, 8 bits a pass).  Each pass adds every
    tensor's keys into one [groups x 256] histogram on the device, then one all-reduce.  On
    an accelerator the keys outside their group's prefix go to a dropped bin instead of
    being compacted, which would wait for the device to learn their number; the prefix
    stays on the device, so the only host sync is the answer at the end, however many
    matrices (a bert-base reset has ~150; per matrix and pass it was ~1,000 syncs).  On the
    CPU the keys are compacted to their group's prefix after each pass: the later passes
    read a few candidates instead of every key (MiniLM's 22.5M scores: ~130 ms a pass)."""
    n = len(groups)
    prefix = torch.zeros(n, dtype=torch.int64, device=device)  # the high bits found, of key + 2^31
    remaining = torch.tensor(list(ks), dtype=torch.int64, device=device)
    outside = n * 256
    one = torch.ones(1, dtype=torch.int64, device=device)
    compact = host_counts_are_free(device)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(outside + 1, dtype=torch.int64, device=device)
        # (key + 2^31) >> m == prefix  <=>  key >> m == prefix - 2^(31 - m)  (arithmetic shift)
        high = prefix - (1 << (23 - shift)) if shift < 24 else None
        for g, items in enumerate(groups):
            for keys in items:
                if shift == 24:
                    bins = (keys >> 24) + (128 + g * 256)
                elif compact:  # the keys are this group's candidates: all within its prefix
                    bins = ((keys >> shift) & 255) + g * 256
                else:
                    bins = torch.where((keys >> (shift + 8)) == high[g], ((keys >> shift) & 255) + g * 256, outside)
                hist.index_add_(0, bins, one.expand_as(bins))
        hist = sharding.all_reduce_(hist[:outside], enabled=reduce).view(n, 256)
        cum = hist.cumsum(1)
        digit = (cum < remaining.unsqueeze(1)).sum(1)  # first bin whose running count reaches k
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0)
        remaining -= below
        prefix = (prefix << 8) | digit
        if compact and shift > 0:
            high = prefix - (1 << (31 - shift))
            groups = [[keys[(keys >> shift) == high[g]] for keys in items] for g, items in enumerate(groups)]
    return [p - (1 << 31) for p in prefix.tolist()]


def _below_and_at(n: int, items: dict[int, tuple[torch.Tensor, int]], device: torch.device,
                  reduce: bool) -> list[list[int]]:
    """For each matrix i of `items` (i -> this rank's keys, a key): how many keys are below the
    key and at it, summed over ranks, and how many at it here; one all-reduce, one host sync."""
    counts = torch.zeros(3, n, dtype=torch.int64, device=device)
    for i, (keys, key) in items.items():
        counts[0, i] = (keys < key).sum()
        counts[1, i] = (keys == key).sum()
    counts[2] = counts[1]
    sharding.all_reduce_(counts[:2], enabled=reduce)
    return counts.tolist()


def bottom_k_cuts(shards: Sequence[Shard], ks: Sequence[int] | int, *, reduce: bool) -> list[Cut]:
    """Cuts pruning exactly ks[i] entries of matrix i (per matrix), or, when `ks` is a
    single int, exactly ks entries over all matrices together (global scope: one tau,
    ties ordered by tie key, and by matrix order among equal keys of different
    matrices).  `reduce`: shards are disjoint across ranks, so sum counts.

    All matrices go through each step together: at most 4 host syncs per call, however
    many matrices.  The int32 order keys of this rank's shards are kept for the call
    (4 bytes an entry), so the float-to-key work is done once, not once a pass."""
    n = len(shards)
    for s in shards:
        if s.numel > MAX_MATRIX_NUMEL:
            raise ValueError(f"a masked matrix has {s.numel} entries; tie keys cover at most {MAX_MATRIX_NUMEL}")
    if n == 0:
        return []
    device = shards[0].values.device
    groups, quotas = ([list(range(n))], [ks]) if isinstance(ks, int) else ([[i] for i in range(n)], list(ks))
    live = [g for g, k in enumerate(quotas) if k > 0]
    keys = [_order_keys(s.values) for s in shards]
    # tau: the k-th smallest value of each group.
    taus = _kth_smallest([[keys[i] for i in groups[g]] for g in live], [quotas[g] for g in live], reduce, device)
    tau_of = {i: tau for g, tau in zip(live, taus) for i in groups[g]}

    # Per matrix: entries below tau, ties at tau.  The group prunes k - below ties.
    below, ties, local_ties = _below_and_at(n, {i: (keys[i], tau_of[i]) for i in tau_of}, device, reduce)
    pruned_ties = {g: quotas[g] - sum(below[i] for i in groups[g]) for g in live}
    tie_key = {i: ALL_TIES for i in tau_of}
    partial = [g for g in live if pruned_ties[g] < sum(ties[i] for i in groups[g])]
    if partial:
        # The tie keys of this rank's ties (their number is known: nonzero_static needs no sync),
        # in [0, 2^31): int32 keys of the same order.
        ties_of = {i: tie_keys(shards[i].offset + torch.nonzero_static(keys[i] == tau_of[i], size=local_ties[i])
                               .view(-1)).to(torch.int32) for g in partial for i in groups[g]}
        del keys
        boundary = _kth_smallest([[ties_of[i] for i in groups[g]] for g in partial],
                                 [pruned_ties[g] for g in partial], reduce, device)
        # Ties below the boundary key, and which matrices hold a tie at it (at most one
        # each: keys are distinct within a matrix).
        key_of = {i: key for g, key in zip(partial, boundary) for i in groups[g]}
        before, at, _ = _below_and_at(n, {i: (ties_of[i], key_of[i]) for i in key_of}, device, reduce)
        for g, key in zip(partial, boundary):
            left = pruned_ties[g] - sum(before[i] for i in groups[g])  # ties at the boundary key still to prune
            for i in groups[g]:
                takes = left > 0 and at[i] > 0
                left -= int(takes)
                tie_key[i] = key if takes else key - 1
    return [Cut(_key_to_float(tau_of[i]), tie_key[i]) if i in tau_of else KEEP_ALL for i in range(n)]
