"""Binary masks over frozen weights: W_eff = W * 1[S > tau], straight-through to S.

Each masked Linear/Embedding gets one score tensor `mask_score`, registered on the
same module as its `weight`, so ZeRO-3 partitions both the same way and gathers both
for the module's forward.  The mask itself is never stored: it is a function of the
score and the module's `Cut` (tau plus a tie boundary, see thresholds.py), so the
mask used in forward, the one counted for sparsity and the one exported agree
exactly.

Two uses share this module:
- search:     weight frozen, score trains (dL/dS = dL/dW_eff * W);
- fine-tune:  score frozen (the fixed mask), weight trains (dL/dW = dL/dW_eff * m),
              so pruned weights get exactly zero gradient and stay zero.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tamt_ds import sharding
from tamt_ds.errors import InputError
from tamt_ds.thresholds import KEEP_ALL, Cut, bottom_k_cuts

# The TAMT matrix set (BERT / RoBERTa module names), as regexes searched in module names.
TAMT_PATTERNS: tuple[str, ...] = (
    r"layer\.\d+\.attention\.self\.(query|key|value)$",
    r"layer\.\d+\.attention\.output\.dense$",
    r"layer\.\d+\.intermediate\.dense$",
    r"layer\.\d+\.output\.dense$",
    r"pooler\.dense$",
    r"embeddings\.word_embeddings$",
)
INIT_SCORE = 0.02  # kept entries start at 2 * tau0 (tau0 = 0.01), pruned ones at 0, as in TAMT


class _MaskedWeight(torch.autograd.Function):
    """W * m with m treated as identity in backward (straight-through)."""

    @staticmethod
    def forward(ctx, weight, score, keep):
        ctx.save_for_backward(weight, keep)
        return weight * keep

    @staticmethod
    def backward(ctx, grad):
        weight, keep = ctx.saved_tensors
        grad_weight = grad * keep if ctx.needs_input_grad[0] else None
        grad_score = grad * weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_score, None


class MaskedWeightMixin:
    mask_cut: Cut = KEEP_ALL
    mask_enabled: bool = True

    def masked_weight(self) -> torch.Tensor:
        if not self.mask_enabled:
            return self.weight
        with torch.no_grad():
            keep = self.mask_cut.keep(self.mask_score)
        return _MaskedWeight.apply(self.weight, self.mask_score, keep)


class MaskedLinear(MaskedWeightMixin, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedEmbedding(MaskedWeightMixin, nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.masked_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


_MASKED_CLASS = {nn.Linear: MaskedLinear, nn.Embedding: MaskedEmbedding}


@dataclass
class MaskSite:
    name: str  # module name in the wrapped model
    module: nn.Module
    init_keep: torch.Tensor | None = field(default=None, repr=False)  # local shard, for distance-to-init
    last_keep: torch.Tensor | None = field(default=None, repr=False)  # local shard, for change-since-last-log

    @property
    def score(self) -> nn.Parameter:
        return self.module.mask_score

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def local_keep(self) -> torch.Tensor:
        shard = sharding.local_shard(self.score)
        return self.module.mask_cut.keep(shard.values, shard.offset)


class MaskError(InputError):
    pass


def check_settings(sparsity: float, scope: str) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise MaskError(f"--sparsity must be in [0, 1), got {sparsity}: pass e.g. --sparsity 0.7")
    if scope not in ("per_matrix", "global"):
        raise MaskError(f"--threshold_scope must be per_matrix or global, got {scope!r}")


class MaskSet:
    """All masked matrices of one model, and the operations over all of them."""

    def __init__(self, sites: list[MaskSite], sparsity: float, scope: str = "per_matrix"):
        check_settings(sparsity, scope)
        self.sites, self.sparsity, self.scope = sites, sparsity, scope
        # Exact pruned count per matrix, when a given mask fixes them (fine-tuning a mask
        # file); None: int(numel * sparsity) per matrix, as TAMT prescribes.
        self.fixed_k: list[int] | None = None

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    @property
    def scores(self) -> list[nn.Parameter]:
        return [s.score for s in self.sites]

    def _reduce(self) -> bool:
        return sharding.shards_are_disjoint(self.scores)

    # ---- thresholds -------------------------------------------------------------
    def _per_matrix_k(self, shards: Sequence[sharding.Shard]) -> list[int]:
        return list(self.fixed_k) if self.fixed_k is not None else [int(s.numel * self.sparsity) for s in shards]

    def _cut(self, shards: Sequence[sharding.Shard]) -> list[Cut]:
        if self.scope == "global" and self.fixed_k is None:
            return bottom_k_cuts(shards, int(sum(s.numel for s in shards) * self.sparsity), reduce=self._reduce())
        return bottom_k_cuts(shards, self._per_matrix_k(shards), reduce=self._reduce())

    def fix_counts(self, mask_file: dict[str, torch.Tensor]) -> None:
        """Prune exactly the given mask's number of entries in each matrix (not int(numel * s)),
        so that init_scores("file") and every later cut reproduce that mask exactly."""
        self.fixed_k = [int((~mask_file[s.name].bool()).sum()) for s in self.sites]
        self.sparsity = sum(self.fixed_k) / sum(mask_file[s.name].numel() for s in self.sites)

    def reset_thresholds(self) -> None:
        """tau := k-th smallest score (per matrix or over all), exact under ZeRO-3."""
        cuts = self._cut([sharding.local_shard(s) for s in self.scores])
        for site, cut in zip(self.sites, cuts):
            site.module.mask_cut = cut

    def cuts(self) -> list[tuple[float, int]]:
        return [(s.module.mask_cut.tau, s.module.mask_cut.boundary) for s in self.sites]

    def load_cuts(self, cuts: Sequence[Sequence]) -> None:
        for site, (tau, boundary) in zip(self.sites, cuts):
            site.module.mask_cut = Cut(float(tau), int(boundary))

    # ---- initialisation ---------------------------------------------------------
    @torch.no_grad()
    def init_scores(self, method: str, *, seed: int = 0, mask_file: dict[str, torch.Tensor] | None = None) -> None:
        """Scores := INIT_SCORE where kept, 0 where pruned, pruning exactly k per matrix.

        The ranking is |W| (magnitude = OMP), uniform noise (random) or a given mask,
        read from this rank's shards only, then cut per matrix with a deterministic
        tie-break; each rank writes its own score shard.
        """
        for site, keep in zip(self.sites, self.initial_keep(method, seed=seed, mask_file=mask_file)):
            sharding.local_shard(site.score).values.copy_(keep.to(site.score.dtype) * INIT_SCORE)
            # tau0 sits halfway between the two init values (as in TAMT), so a score must move
            # by tau0 to flip until the first reset; a reset here would put tau on the pruned
            # scores themselves and let the first positive update flip them.
            site.module.mask_cut = Cut(INIT_SCORE / 2, 0)
        self.mark_initial()

    @torch.no_grad()
    def initial_keep(self, method: str, *, seed: int = 0, mask_file=None) -> list[torch.Tensor]:
        """Local keep-shards of the initial mask (deterministic: recomputed on resume)."""
        ranks = self.ranking_shards(method, seed=seed, mask_file=mask_file)
        cuts = bottom_k_cuts(ranks, self._per_matrix_k(ranks), reduce=self._reduce())
        return [cut.keep(r.values, r.offset) for r, cut in zip(ranks, cuts)]

    def restore_initial(self, method: str, *, seed: int = 0, mask_file=None) -> None:
        """After a resume: the initial mask for distance-to-init, the current one as 'last logged'."""
        for site, keep in zip(self.sites, self.initial_keep(method, seed=seed, mask_file=mask_file)):
            site.init_keep = keep
            site.last_keep = site.local_keep()

    def ranking_shards(self, method, *, seed, mask_file) -> list[sharding.Shard]:
        out = []
        for i, site in enumerate(self.sites):
            w = sharding.local_shard(site.weight)
            lo, hi = w.offset, w.offset + w.values.numel()
            if method == "magnitude":
                values = w.values.abs().float()
            elif method == "random":
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # same full matrix on every rank
                values = torch.rand(w.numel, generator=gen)[lo:hi].to(w.values.device)
            elif method == "file":
                values = mask_file[site.name].reshape(-1)[lo:hi].to(w.values.device, torch.float32)
            else:
                raise MaskError(f"unknown mask init {method!r}: use magnitude, random or a mask file path")
            out.append(sharding.Shard(values, w.offset, w.numel))
        return out

    def mark_initial(self) -> None:
        for site in self.sites:
            site.init_keep = site.local_keep()
            site.last_keep = site.init_keep.clone()

    # ---- measurements from the real binary masks -------------------------------------
    @torch.no_grad()
    def stats(self, update_last: bool = True) -> dict:
        """Sparsity, change since the last call and Hamming distance to the initial mask,
        per matrix and overall, counted on the live masks (on their device; one host
        transfer for all matrices)."""
        device = sharding.local_shard(self.sites[0].score).values.device
        counts = torch.zeros(len(self.sites), 3, dtype=torch.int64, device=device)
        for i, site in enumerate(self.sites):
            keep = site.local_keep()
            counts[i, 0] = (~keep).sum()
            if site.last_keep is not None:
                counts[i, 1] = (keep != site.last_keep).sum()
                counts[i, 2] = (keep != site.init_keep).sum()
            if update_last:
                site.last_keep = keep
        counts = sharding.all_reduce_(counts, enabled=self._reduce()).cpu()
        numel = torch.tensor([sharding.full_numel(s.score) for s in self.sites], dtype=torch.float64)
        total = float(numel.sum())
        per = counts.double() / numel.unsqueeze(1)
        return {
            "sparsity": float(counts[:, 0].sum()) / total,
            "mask_change": float(counts[:, 1].sum()) / total,
            "distance_to_init": float(counts[:, 2].sum()) / total,
            "per_matrix": {s.name: {"sparsity": float(per[i, 0]), "mask_change": float(per[i, 1]),
                                    "distance_to_init": float(per[i, 2]), "threshold": s.module.mask_cut.tau}
                           for i, s in enumerate(self.sites)},
        }

    @torch.no_grad()
    def full_masks(self) -> dict[str, torch.Tensor]:
        """Full bool keep-masks (True = kept), assembled from all ranks, one matrix at a time."""
        out = {}
        for site in self.sites:
            with sharding.gathered([site.score]):
                out[site.name] = site.module.mask_cut.keep(site.score.data).cpu().clone()
        return out

    @torch.no_grad()
    def zero_pruned_weights(self) -> None:
        """Write exact zeros into pruned weight entries (fine-tuning starts from the subnetwork)."""
        for site in self.sites:
            w = sharding.local_shard(site.weight)
            w.values.mul_(site.local_keep().to(w.values.dtype))


def attach_masks(model: nn.Module, patterns: Iterable[str] = TAMT_PATTERNS, *, sparsity: float,
                 scope: str = "per_matrix") -> MaskSet:
    """Give every Linear/Embedding whose name matches a pattern a score next to its weight."""
    check_settings(sparsity, scope)  # before the model is touched
    regexes = [re.compile(p) for p in patterns]
    sites = []
    for name, module in model.named_modules():
        cls = _MASKED_CLASS.get(type(module))
        if cls is None or not any(r.search(name) for r in regexes):
            continue
        w = module.weight
        shape = sharding.full_shape(w)
        score = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))
        module.__class__ = cls
        module.register_parameter("mask_score", score)
        sharding.partition_like(w, [score])
        sites.append(MaskSite(name, module))
    if not sites:
        raise MaskError(f"no Linear/Embedding module of {type(model).__name__} matches the mask patterns "
                        f"{list(patterns)}: pass --mask_patterns with regexes of module names")
    return MaskSet(sites, sparsity, scope)


@contextlib.contextmanager
def masks_disabled(masks: MaskSet):
    """The dense model: the same frozen weights with masks bypassed (the KD teacher)."""
    for s in masks:
        s.module.mask_enabled = False
    try:
        yield
    finally:
        for s in masks:
            s.module.mask_enabled = True
