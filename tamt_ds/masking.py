"""Binary masks over frozen weights for the search: W_eff = W * 1[S > tau], straight-through to S.

Each masked Linear/Embedding gets one score tensor, partitioned by ZeRO-3 the same way
as its `weight`, held by a child module of its own (`MaskScore`, at `<module>.mask.score`)
whose forward computes the masked op: ZeRO-3 gathers a module's direct parameters before
its forward, so the score is gathered only when the mask is applied (the student pass and
its backward), never for the KD teacher's pass (masks off: the child does not run).  Each
module always has the same direct parameters, which ZeRO-3's prefetch trace requires (it
lists a module's parameters once and replays them every step).  The mask itself is never
stored: it is a function of the score and the module's `Cut` (tau plus a tie boundary, see
thresholds.py), so the mask used in forward, the one counted for sparsity and the
one exported agree exactly.  The masked forward keeps nothing weight-sized for
backward (see _MaskedLinearFn).

The initial mask (`initial_keep`: magnitude, random or a file, exactly k pruned per
matrix) is also what fine-tuning's fixed mask starts from (downstream/fixed_mask.py).
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
from tamt_ds.thresholds import KEEP_ALL, MAX_MATRIX_NUMEL, Cut, bottom_k_cuts

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


# torch's own F.linear: ZeRO-3's zero.Init replaces F.linear process-wide with a version that
# adds the bias in a second pass over the output (DeepSpeed's "memory-efficient linear").
_linear = torch._C._nn.linear


def _apply(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W * m, the bool mask promoted inside the multiply (one pass; on CPU 3x faster than
    torch.where(keep, W, 0), docs/benchmarks.md); pruned negative weights give -0, the same in every sum."""
    return weight * keep


class _MaskedLinearFn(torch.autograd.Function):
    """F.linear(x, W * m, b), m = cut.keep(S), straight-through to S: dL/dS = dL/dW_eff * W
    (search) and dL/dW = dL/dW_eff * m (a trainable weight).

    Only x and the parameters themselves are saved for backward, not W * m or m: under
    ZeRO-3 a parameter's storage is released after the module's forward and gathered
    again before its backward, so nothing weight-sized outlives the forward on any rank
    (F.linear would keep W * m, a full copy of every masked matrix, until backward).
    m and W * m are recomputed in backward from the re-gathered score and weight.  A weight
    ZeRO-3 keeps gathered anyway (persistent: every one at one rank) has nothing to release:
    there W * m is kept, as F.linear would, sparing backward the mask and the product (~20 ms
    of a MiniLM bf16 step; the same values either way).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, score, cut):  # runs without autograd recording
        ctx.cut = cut
        masked = _apply(weight, cut.keep(score))
        ctx.save_for_backward(x, weight, bias, score, masked if sharding.stays_gathered(weight) else None)
        return _linear(x, masked, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, score, masked = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        keep = ctx.cut.keep(score) if need_w or masked is None else None
        grad_x = grad_w = grad_b = grad_s = None
        if need_x:  # as one 2-D matmul: a non-contiguous grad_out (from attention's head split) made
            # matmul broadcast W to [batch, in, out] and copy it
            masked = _apply(weight, keep) if masked is None else masked
            grad_x = grad_out.reshape(-1, grad_out.shape[-1]).mm(masked).view(*grad_out.shape[:-1], -1)
        if need_w or need_s:
            grad_eff = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
            grad_w = grad_eff * keep if need_w else None
            grad_s = grad_eff * weight if need_s else None
        if bias is not None and need_b:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, grad_s, None


class _MaskedEmbeddingFn(torch.autograd.Function):
    """F.embedding(ids, W * m), computed on the looked-up rows only (m too), straight-through
    to S.  Saves the ids and the parameters; rows are looked up again in backward."""

    @staticmethod
    def forward(ctx, ids, weight, score, cut, padding_idx):
        ctx.cut, ctx.padding_idx, ctx.num_rows = cut, padding_idx, weight.shape[0]
        ctx.save_for_backward(ids, weight, score)
        return F.embedding(ids, weight) * cut.keep(F.embedding(ids, score), rows=ids)

    @staticmethod
    def backward(ctx, grad_out):
        ids, weight, score = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad[1:3]

        def scatter(grad_rows):  # the dense-gradient kernel of F.embedding's own backward
            return torch.ops.aten.embedding_dense_backward(grad_rows, ids, ctx.num_rows, ctx.padding_idx, False)

        grad_w = grad_s = None
        if need_w:
            grad_w = scatter(grad_out * ctx.cut.keep(F.embedding(ids, score), rows=ids))
        if need_s:
            grad_s = scatter(grad_out * F.embedding(ids, weight))
        return None, grad_w, grad_s, None, None


class MaskScore(nn.Module):
    """The score of one masked matrix, as the only parameter of a child of the masked module.

    Its forward runs the parent's masked op with the score: ZeRO-3 gathers the score for
    this call (and for its backward) alone, while the parent's own hooks gather the weight.
    The input goes through this module, not around it, so that ZeRO-3 releases the score
    once the input's gradient is computed."""

    def __init__(self, score: nn.Parameter):
        super().__init__()
        self.score = score

    def forward(self, x, masked_op):
        return masked_op(x, self.score)


class MaskedWeightMixin:
    mask_cut: Cut = KEEP_ALL
    mask_enabled: bool = True

    @property
    def mask_score(self) -> nn.Parameter:
        return self.mask.score


def attach_score(module: nn.Module, cls: type, score: nn.Parameter) -> None:
    """Make `module` a `cls` (a MaskedWeightMixin) whose mask reads `score`, partitioned like its weight."""
    module.__class__ = cls
    module.mask = MaskScore(score)
    sharding.partition_like(module.weight, [score])


class MaskedLinear(MaskedWeightMixin, nn.Linear):
    def forward(self, x):
        if not self.mask_enabled:
            return _linear(x, self.weight, self.bias)
        return self.mask(x, self.masked_op)

    def masked_op(self, x, score):
        return _MaskedLinearFn.apply(x, self.weight, self.bias, score, self.mask_cut)


class MaskedEmbedding(MaskedWeightMixin, nn.Embedding):
    def forward(self, ids):
        if not self.mask_enabled:
            return F.embedding(ids, self.weight, self.padding_idx)
        return self.mask(ids, self.masked_op)

    def masked_op(self, ids, score):
        padding_idx = -1 if self.padding_idx is None else self.padding_idx
        return _MaskedEmbeddingFn.apply(ids, self.weight, score, self.mask_cut, padding_idx)


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


def parse_baseline(text: str) -> tuple[str, float] | None:
    """`omp:S` / `random:S` -> (kind, S), the baselines every launcher builds on the fly;
    None for anything else (a mask file, `none`)."""
    kind, _, value = text.partition(":")
    if kind not in ("omp", "random") or not value:
        return None
    try:
        s = float(value)
    except ValueError:
        s = -1.0
    if not 0.0 <= s < 1.0:
        raise MaskError(f"--mask {text}: the sparsity must be a number in [0, 1), e.g. --mask {kind}:0.7")
    return kind, s


def check_settings(sparsity: float, scope: str) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise MaskError(f"--sparsity must be in [0, 1), got {sparsity}: pass e.g. --sparsity 0.7")
    if scope not in ("per_matrix", "global"):
        raise MaskError(f"--threshold_scope must be per_matrix or global, got {scope!r}")


# ---- initial masks: shared by the search (scores) and fine-tuning (a fixed mask) ---------


def ranking_shards(weights: Sequence[tuple[str, nn.Parameter]], method: str, *, seed: int = 0,
                   mask_file: dict[str, torch.Tensor] | None = None) -> list[sharding.Shard]:
    """This rank's shard of what the initial mask ranks, per matrix: |W| (magnitude = OMP),
    seeded uniform noise (random) or a given mask (file; keyed by module name)."""
    out = []
    for i, (name, weight) in enumerate(weights):
        w = sharding.local_shard(weight)
        lo, hi = w.offset, w.offset + w.values.numel()
        if method == "magnitude":
            values = w.values.abs().float()
        elif method == "random":
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)  # same full matrix on every rank
            values = torch.rand(w.numel, generator=gen)[lo:hi].to(w.values.device)
        elif method == "file":
            values = mask_file[name].reshape(-1)[lo:hi].to(w.values.device, torch.float32)
        else:
            raise MaskError(f"unknown mask init {method!r}: use magnitude, random or a mask file path")
        out.append(sharding.Shard(values, w.offset, w.numel))
    return out


@torch.no_grad()
def initial_keep(weights: Sequence[tuple[str, nn.Parameter]], method: str, ks: Sequence[int], *, seed: int = 0,
                 mask_file: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """This rank's keep-shard of each matrix's initial mask: the ks[i] lowest-ranked entries
    of matrix i pruned, ties in tie-key order (deterministic: recomputed on resume)."""
    ranks = ranking_shards(weights, method, seed=seed, mask_file=mask_file)
    cuts = bottom_k_cuts(ranks, ks, reduce=sharding.shards_are_disjoint([w for _, w in weights]))
    return [cut.keep(r.values, r.offset) for r, cut in zip(ranks, cuts)]


class MaskSet:
    """All masked matrices of one model, and the operations over all of them."""

    def __init__(self, sites: list[MaskSite], sparsity: float, scope: str = "per_matrix"):
        check_settings(sparsity, scope)
        self.sites, self.sparsity, self.scope = sites, sparsity, scope
        self.fixed_k: list[int] | None = None  # per-matrix counts of a given mask (fix_counts)
        self.init_args: dict = {}  # how init_scores made the initial mask, to remake it on resume

    def __iter__(self):
        return iter(self.sites)

    def __len__(self):
        return len(self.sites)

    @property
    def scores(self) -> list[nn.Parameter]:
        return [s.score for s in self.sites]

    def _reduce(self) -> bool:
        return sharding.shards_are_disjoint(self.scores)

    def _per_matrix_k(self) -> list[int]:
        if self.fixed_k is not None:
            return list(self.fixed_k)
        return [int(sharding.full_numel(s.score) * self.sparsity) for s in self.sites]

    def fix_counts(self, mask_file: dict[str, torch.Tensor]) -> None:
        """Prune exactly the given mask's number of entries in each matrix (not int(numel * s)),
        so that init_scores("file") and every later per-matrix cut reproduce that mask exactly."""
        self.fixed_k = [int((~mask_file[s.name].bool()).sum()) for s in self.sites]
        self.sparsity = sum(self.fixed_k) / sum(mask_file[s.name].numel() for s in self.sites)

    def require_counts_of(self, mask_file: dict[str, torch.Tensor], path: str) -> None:
        """A search started from a given mask starts from exactly that mask and keeps its own
        --sparsity: refuse a file whose pruned counts are not the ones --sparsity prunes (per
        matrix, or over all matrices for global scope), which the first reset would re-cut."""
        pruned = [int((~mask_file[s.name].bool()).sum()) for s in self.sites]
        numel = [mask_file[s.name].numel() for s in self.sites]
        have = f"(sparsity {sum(pruned) / sum(numel):.4f} over all masked matrices)"
        if self.scope == "global" and sum(pruned) != int(sum(numel) * self.sparsity):
            raise MaskError(f"--mask_init {path} prunes {sum(pruned)} of {sum(numel)} masked weights {have}, "
                            f"--sparsity {self.sparsity} prunes {int(sum(numel) * self.sparsity)}: pass the file's "
                            f"--sparsity, or another mask file")
        for site, p, n in zip(self.sites, pruned, numel):
            if self.scope == "per_matrix" and p != int(n * self.sparsity):
                raise MaskError(f"--mask_init {path} prunes {p} of {n} entries of {site.name} {have}, --sparsity "
                                f"{self.sparsity} prunes {int(n * self.sparsity)} of each matrix: pass the file's "
                                f"--sparsity (--threshold_scope global for a mask with other counts per matrix)")
        self.fixed_k = pruned  # the initial cut is the file's own (global scope: its own split over matrices)

    # ---- thresholds -------------------------------------------------------------
    def reset_thresholds(self) -> None:
        """tau := k-th smallest score (per matrix or over all), exact under ZeRO-3."""
        shards = [sharding.local_shard(s) for s in self.scores]
        ks = int(sum(s.numel for s in shards) * self.sparsity) if self.scope == "global" else self._per_matrix_k()
        for site, cut in zip(self.sites, bottom_k_cuts(shards, ks, reduce=self._reduce())):
            site.module.mask_cut = cut

    def cuts(self) -> list[tuple[float, int]]:
        return [(s.module.mask_cut.tau, s.module.mask_cut.tie_key) for s in self.sites]

    def load_cuts(self, cuts: Sequence[Sequence]) -> None:
        for site, (tau, tie_key) in zip(self.sites, cuts):
            site.module.mask_cut = Cut(float(tau), int(tie_key))

    # ---- initialisation ---------------------------------------------------------
    @torch.no_grad()
    def init_scores(self, method: str, *, seed: int = 0, mask_file: dict[str, torch.Tensor] | None = None) -> None:
        """Scores := INIT_SCORE where kept, 0 where pruned, pruning exactly k per matrix.

        The ranking is |W| (magnitude = OMP), uniform noise (random) or a given mask,
        read from this rank's shards only, then cut per matrix with a deterministic
        tie-break; each rank writes its own score shard.
        """
        self.init_args = {"method": method, "seed": seed, "mask_file": mask_file}
        for site, keep in zip(self.sites, self.initial_keep()):
            sharding.local_shard(site.score).values.copy_(keep.to(site.score.dtype) * INIT_SCORE)
            # tau0 sits halfway between the two init values (as in TAMT), so a score must move
            # by tau0 to flip until the first reset; a reset here would put tau on the pruned
            # scores themselves and let the first positive update flip them.
            site.module.mask_cut = Cut(INIT_SCORE / 2)
        self.mark_initial()

    def initial_keep(self) -> list[torch.Tensor]:
        """Local keep-shards of the initial mask init_scores made (recomputed, not stored)."""
        return initial_keep([(s.name, s.weight) for s in self.sites], self.init_args["method"], self._per_matrix_k(),
                            seed=self.init_args["seed"], mask_file=self.init_args["mask_file"])

    def restore_initial(self) -> None:
        """After a resume (on a MaskSet set up as before, by init_scores): the initial mask
        for distance-to-init, the current one as 'last logged'."""
        for site, keep in zip(self.sites, self.initial_keep()):
            site.init_keep = keep
            site.last_keep = site.local_keep()

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
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                                 or module.scale_grad_by_freq):
            raise MaskError(f"{name}: masking an embedding with max_norm, sparse or scale_grad_by_freq is not "
                            f"supported; leave it out of --mask_patterns")
        w = module.weight
        shape = sharding.full_shape(w)
        if shape.numel() > MAX_MATRIX_NUMEL:
            raise MaskError(f"{name} has {shape.numel()} entries, more than the {MAX_MATRIX_NUMEL} a mask can hold: "
                            f"leave it out of --mask_patterns")
        attach_score(module, cls, nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device)))
        sites.append(MaskSite(name, module))
    if not sites:
        raise MaskError(f"no Linear/Embedding module of {type(model).__name__} matches the mask patterns "
                        f"{list(patterns)}: pass --mask_patterns with regexes of module names")
    return MaskSet(sites, sparsity, scope)


def prepare_search(model: nn.Module, *, sparsity: float, patterns: Iterable[str] = TAMT_PATTERNS,
                   scope: str = "per_matrix", init: str = "magnitude", seed: int = 0,
                   mask_file: dict[str, torch.Tensor] | None = None, attach=None) -> tuple[MaskSet, list[nn.Parameter]]:
    """The search's model: every weight frozen, a score next to each masked one, initialised
    (`init`: magnitude, random, or the path `mask_file` was read from), and the MLM head, if
    the model has one, trainable except its decoder weight (tied to the frozen embedding).
    Returns the masks and the parameters to train: the scores, then the head."""
    base = {id(p) for p in model.base_model.parameters()}
    head = [p for p in model.parameters() if id(p) not in base]  # a tied decoder weight is the embedding's
    for p in model.parameters():
        p.requires_grad_(False)
    # `attach`: another pattern's masks (patterns.py), with the sites a mask file must cover
    masks = attach(model) if attach is not None else attach_masks(model, patterns, sparsity=sparsity, scope=scope)
    if mask_file is not None:
        from tamt_ds.maskfile import masks_for_model  # maskfile builds on this module

        file_masks = masks_for_model(mask_file, model, getattr(masks, "file_sites", masks), init)
        masks.require_counts_of(file_masks, init)
        masks.init_scores("file", seed=seed, mask_file=file_masks)
    else:
        masks.init_scores(init, seed=seed)
    for p in head:
        p.requires_grad_(True)
    return masks, masks.scores + head


@contextlib.contextmanager
def masks_disabled(masks: MaskSet):
    """The dense model: the same frozen weights with masks bypassed (the KD teacher); the
    scores' modules do not run, so ZeRO-3 gathers none of them."""
    for s in masks:
        s.module.mask_enabled = False
    try:
        yield
    finally:
        for s in masks:
            s.module.mask_enabled = True
