"""Sparsity patterns of the search beyond unstructured: N:M and structured (heads, FFN neurons).

- `unstructured`: masking.py as it is (one score per weight, exact k-th value per matrix).
- `N:M`: one score per weight; in every group of M consecutive weights along a Linear's
  input dimension the N highest scores are kept, in the forward, on the whole matrix
  (ZeRO-3 gathers it for the forward anyway), so the groups never depend on how the
  matrix is partitioned and the mask is exact by construction: no threshold.  Ties in
  a group keep the lower input index.  The word embeddings stay dense (a lookup gains
  nothing from N:M); mask.pt marks them all kept.  The sparsity is 1 - N/M.
- `structured`: one score per attention head (on attention.output.dense, gating the
  head's input columns) and one per FFN neuron (on output.dense, gating its input
  column).  Gating a head's (neuron's) input to the output projection removes it
  entirely: its query/key/value rows (intermediate row) feed nothing else.  Heads are
  cut by one threshold over all layers (free per layer), neurons per layer with the same
  count in every layer (the compact model is a plain config's intermediate_size); the
  same fraction of heads and of neurons is pruned, so --sparsity is the fraction of
  head + FFN weights removed (up to rounding to whole heads and neurons).  Thresholds are
  the exact bottom-k cuts of thresholds.py, over few scores.

Both are straight-through to the scores, as unstructured TAMT: dL/dS = dL/dW_eff * W,
summed over a structure's weights for structured.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tamt_ds import sharding
from tamt_ds.masking import (INIT_SCORE, TAMT_PATTERNS, MaskedLinear, MaskError, MaskSet, MaskSite, attach_masks,
                             attach_score, check_settings, prepare_search)
from tamt_ds.thresholds import Cut, bottom_k_cuts


@dataclass(frozen=True)
class SparsityPattern:
    kind: str  # "unstructured", "n:m" or "structured"
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


UNSTRUCTURED = SparsityPattern("unstructured")


def parse_pattern(text: str) -> SparsityPattern:
    if text in ("unstructured", "structured"):
        return SparsityPattern(text)
    found = re.fullmatch(r"(\d+):(\d+)", text)
    if found and 1 <= int(found[1]) <= int(found[2]):
        return SparsityPattern("n:m", int(found[1]), int(found[2]))
    raise MaskError(f"--sparsity_pattern {text!r}: use unstructured, structured or N:M with 1 <= N <= M "
                    f"(e.g. --sparsity_pattern 2:4)")


def check_resume_pattern(saved: str, wanted: str, folder: str) -> None:
    """A search resumes only with the pattern its checkpoint was searched with: its scores mean
    nothing under another one (other shapes, or other groups).  Checkpoints from before patterns
    existed were unstructured."""
    if parse_pattern(saved) != parse_pattern(wanted):
        raise MaskError(f"checkpoint {folder} was searched with --sparsity_pattern {saved}, this run asks for "
                        f"{wanted}: resume with --sparsity_pattern {saved}, or start a new search with another "
                        f"--output_dir (or --overwrite_output_dir)")


# ---- N:M ----------------------------------------------------------------------------


def nm_keep(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool keep-mask of a whole [out, in] matrix: the n largest of each m consecutive
    entries along a row, ties to the lower index (a stable sort: the same on every device)."""
    groups = values.detach().float().reshape(-1, m)
    top = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True).view(values.shape)


def is_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive entries along the last dimension keeps exactly n."""
    return keep.shape[-1] % m == 0 and bool((keep.reshape(-1, m).sum(1) == n).all())


@dataclass(frozen=True)
class NMCut:
    """The mask_cut of an N:M matrix: a function of the whole score matrix, no threshold."""
    n: int
    m: int
    tau: float = 0.0  # no threshold (logged as 0)
    tie_key: int = -1

    def keep(self, values: torch.Tensor, offset: int = 0, rows=None) -> torch.Tensor:
        if offset != 0 or rows is not None or values.dim() != 2:
            raise RuntimeError("an N:M mask is a function of the whole matrix: gather it first")
        return nm_keep(values, self.n, self.m)


class GatheredMaskSite(MaskSite):
    """A site whose mask needs the whole matrix: this rank's part of it, from the gathered score
    (collective: every rank calls it, in the same order)."""

    def local_keep(self) -> torch.Tensor:
        shard = sharding.local_shard(self.score)
        with sharding.gathered([self.score]):
            keep = self.module.mask_cut.keep(self.score.data)
        return keep.reshape(-1)[shard.offset:shard.offset + shard.values.numel()].to(shard.values.device)


def _matrix_rank_values(weight: nn.Parameter, method: str, index: int, seed: int) -> torch.Tensor:
    """What an initial mask ranks, over the whole matrix (call with `weight` gathered)."""
    if method == "magnitude":
        return weight.data.abs().float()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)  # as masking.ranking_shards: same on every rank
    return torch.rand(weight.shape, generator=gen).to(weight.device)


class NMMaskSet(MaskSet):
    def __init__(self, sites: list[MaskSite], pattern: SparsityPattern, dense_shapes: dict[str, torch.Size]):
        super().__init__(sites, 1.0 - pattern.n / pattern.m)
        self.pattern, self.dense_shapes = pattern, dense_shapes

    def reset_thresholds(self) -> None:  # exact by construction
        pass

    def cuts(self) -> list[tuple[float, int]]:
        return [(0.0, -1) for _ in self.sites]

    def load_cuts(self, cuts) -> None:
        pass

    def require_counts_of(self, mask_file: dict[str, torch.Tensor], path: str) -> None:
        for site in self.sites:
            if not is_nm(mask_file[site.name], self.pattern.n, self.pattern.m):
                raise MaskError(f"--mask_init {path}: {site.name} is not {self.pattern} along its input dimension: "
                                f"pass a mask from a --sparsity_pattern {self.pattern} search")

    @torch.no_grad()
    def init_scores(self, method: str, *, seed: int = 0, mask_file: dict[str, torch.Tensor] | None = None) -> None:
        self.init_args = {"method": method, "seed": seed, "mask_file": mask_file}
        for site, keep in zip(self.sites, self.initial_keep()):
            sharding.local_shard(site.score).values.copy_(keep.to(site.score.dtype) * INIT_SCORE)
            site.module.mask_cut = NMCut(self.pattern.n, self.pattern.m)
        self.mark_initial()

    @torch.no_grad()
    def initial_keep(self) -> list[torch.Tensor]:
        """N:M of |W| (OMP), of seeded noise, or the file's mask, on each whole matrix."""
        a = self.init_args
        out = []
        for i, site in enumerate(self.sites):
            shard = sharding.local_shard(site.weight)
            if a["method"] == "file":
                keep = a["mask_file"][site.name].to(shard.values.device)
            else:
                with sharding.gathered([site.weight]):
                    keep = nm_keep(_matrix_rank_values(site.weight, a["method"], i, a["seed"]),
                                   self.pattern.n, self.pattern.m)
            out.append(keep.reshape(-1)[shard.offset:shard.offset + shard.values.numel()])
        return out

    def full_masks(self) -> dict[str, torch.Tensor]:
        out = super().full_masks()
        out.update({name: torch.ones(shape, dtype=torch.bool) for name, shape in self.dense_shapes.items()})
        return out


# ---- structured: heads and FFN neurons ---------------------------------------------------


class _ColumnGatedLinearFn(torch.autograd.Function):
    """F.linear(x * g, W, b) with g = cut.keep(S) repeated over each structure's columns, which
    is F.linear(x, W * g[None, :], b) exactly; straight-through: dL/dS_s = sum over the
    structure's columns j of sum_t x_tj (dL/dy_t W)_j, nothing weight-sized kept or built."""

    @staticmethod
    def forward(ctx, x, weight, bias, score, cut):
        gate = _column_gate(score, cut, weight.shape[1]).to(x.dtype)
        ctx.cut = cut
        ctx.save_for_backward(x, weight, bias, score)
        return F.linear(x * gate, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, score = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        gate = _column_gate(score, ctx.cut, weight.shape[1]).to(x.dtype)
        grad_x = grad_w = grad_b = grad_s = None
        if need_x or need_s:
            grad_in = grad_out.matmul(weight)  # dL/d(x * g)
            grad_x = grad_in * gate if need_x else None
            if need_s:
                per_column = (grad_in * x).reshape(-1, x.shape[-1]).sum(0)
                grad_s = per_column.view(score.numel(), -1).sum(1).to(score.dtype)
        if need_w:
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul((x * gate).reshape(-1, x.shape[-1]))
        if bias is not None and need_b:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, grad_s, None


def _column_gate(score: torch.Tensor, cut, in_features: int) -> torch.Tensor:
    return cut.keep(score).repeat_interleave(in_features // score.numel())


class ColumnGatedLinear(MaskedLinear):
    """A Linear whose input columns are gated by structure: one score per head / neuron."""

    def forward(self, x):
        if not self.mask_enabled:
            return F.linear(x, self.weight, self.bias)
        return self.mask(x, self.masked_op)

    def masked_op(self, x, score):
        return _ColumnGatedLinearFn.apply(x, self.weight, self.bias, score, self.mask_cut)


LAYER_PREFIX = re.compile(r"^(.*layer\.\d+\.)attention\.output\.dense$")


@dataclass
class StructuredLayer:
    prefix: str  # module name up to and including "layer.<i>."
    heads: MaskSite  # on attention.output.dense, one score per head
    neurons: MaskSite  # on output.dense, one score per FFN neuron

    def names(self) -> dict[str, str]:
        p = self.prefix
        return {"query": p + "attention.self.query", "key": p + "attention.self.key",
                "value": p + "attention.self.value", "attn_out": p + "attention.output.dense",
                "intermediate": p + "intermediate.dense", "ffn_out": p + "output.dense"}


class StructuredMaskSet(MaskSet):
    removes_structures = True  # the export writes compact_model/ too
    def __init__(self, model: nn.Module, layers: list[StructuredLayer], sparsity: float,
                 dense_shapes: dict[str, torch.Size]):
        super().__init__([s for layer in layers for s in (layer.heads, layer.neurons)], sparsity)
        self.layers, self.dense_shapes = layers, dense_shapes
        self.modules = {name: model.get_submodule(name) for layer in layers for name in layer.names().values()}
        self.file_sites = [MaskSite(name, module) for name, module in self.modules.items()]  # what a mask file covers
        self.num_heads = sharding.full_numel(layers[0].heads.score)
        self.num_neurons = sharding.full_numel(layers[0].neurons.score)
        self.pruned_heads = round(sparsity * self.num_heads * len(layers))  # over all layers
        self.pruned_neurons = round(sparsity * self.num_neurons)  # in every layer

    def removed_fraction(self, pruned_heads: int, pruned_neurons: int) -> float:
        """The fraction of head + FFN weights removed by these counts (neurons: over all layers)."""
        hidden = sharding.full_shape(self.layers[0].heads.weight)[0]
        per_head = 4 * hidden * (hidden // self.num_heads)
        total = len(self.layers) * (self.num_heads * per_head + self.num_neurons * 2 * hidden)
        return (pruned_heads * per_head + pruned_neurons * 2 * hidden) / total

    def _cut(self, shards_h, shards_n, reduce: bool) -> list[Cut]:
        heads = bottom_k_cuts(shards_h, self.pruned_heads, reduce=reduce)
        neurons = bottom_k_cuts(shards_n, [self.pruned_neurons] * len(self.layers), reduce=reduce)
        return [c for pair in zip(heads, neurons) for c in pair]  # site order: heads, neurons of each layer

    def reset_thresholds(self) -> None:
        shards = [sharding.local_shard(s) for s in self.scores]
        for site, cut in zip(self.sites, self._cut(shards[0::2], shards[1::2], self._reduce())):
            site.module.mask_cut = cut

    def require_counts_of(self, mask_file: dict[str, torch.Tensor], path: str) -> None:
        keeps = self._structures_of_file(mask_file, path)
        pruned_h = sum(int((~k).sum()) for k in keeps[0::2])
        pruned_n = [int((~k).sum()) for k in keeps[1::2]]
        if pruned_h != self.pruned_heads or any(p != self.pruned_neurons for p in pruned_n):
            raise MaskError(f"--mask_init {path} prunes {pruned_h} heads and {pruned_n} neurons per layer, --sparsity "
                            f"{self.sparsity} prunes {self.pruned_heads} heads and {self.pruned_neurons} neurons in "
                            f"each layer: pass the file's --sparsity or another mask file")

    def _structures_of_file(self, mask_file: dict[str, torch.Tensor], path: str) -> list[torch.Tensor]:
        """Per site, which heads / neurons a weight-layout mask keeps (all of a structure's
        weights kept, or all pruned, in every matrix of the structure)."""
        out = []
        for layer in self.layers:
            names = layer.names()
            for site, rows, cols in ((layer.heads, ("query", "key", "value"), "attn_out"),
                                     (layer.neurons, ("intermediate",), "ffn_out")):
                count = sharding.full_numel(site.score)
                keep = mask_file[names[cols]].reshape(mask_file[names[cols]].shape[0], count, -1)[0, :, 0]
                expected = {names[cols]: keep.repeat_interleave(mask_file[names[cols]].shape[1] // count)[None, :],
                            **{names[r]: keep.repeat_interleave(mask_file[names[r]].shape[0] // count)[:, None]
                               for r in rows}}
                for name, want in expected.items():
                    if name in mask_file and not torch.equal(mask_file[name].bool(), want.expand_as(mask_file[name])):
                        raise MaskError(f"--mask_init {path}: {name} is not a mask of whole heads and FFN neurons: "
                                        f"pass a mask from a --sparsity_pattern structured search")
                out.append(keep.bool())
        return out

    @torch.no_grad()
    def _full_rank_values(self, method: str, seed: int) -> list[torch.Tensor]:
        """Per site (heads, neurons of each layer), over all structures: the structure's weight
        norm (magnitude: OMP by structure), seeded noise, or 0/1 from a mask file."""
        out = []
        for i, layer in enumerate(self.layers):
            names = layer.names()
            for j, (site, rows, cols) in enumerate(((layer.heads, ("query", "key", "value"), "attn_out"),
                                                    (layer.neurons, ("intermediate",), "ffn_out"))):
                count = sharding.full_numel(site.score)
                if method == "random":
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * i + j)
                    out.append(torch.rand(count, generator=gen))
                    continue
                if method == "file":
                    out.append(self.init_args["structures"][2 * i + j].float())
                    continue
                squares = torch.zeros(count, dtype=torch.float64)
                for name in (*rows, cols):
                    w = self.modules[names[name]].weight
                    with sharding.gathered([w]):
                        full = w.data.double().cpu()
                    by_structure = full.reshape(count, -1) if name in rows else full.t().reshape(count, -1)
                    squares += by_structure.square().sum(1)
                out.append(squares.sqrt().float())  # cuts compare float32 values (thresholds._sort_keys)
        return out

    @torch.no_grad()
    def initial_keep(self) -> list[torch.Tensor]:
        a = self.init_args
        values = [sharding.Shard(v, 0, v.numel()) for v in self._full_rank_values(a["method"], a["seed"])]
        cuts = self._cut(values[0::2], values[1::2], reduce=False)  # every rank has every value
        out = []
        for site, v, cut in zip(self.sites, values, cuts):
            shard = sharding.local_shard(site.score)
            out.append(cut.keep(v.values)[shard.offset:shard.offset + shard.values.numel()].to(shard.values.device))
        return out

    @torch.no_grad()
    def set_ranking(self, values: list[torch.Tensor]) -> None:
        """Scores := `values` (per site, whole: one process, no ZeRO), cut by this pattern's rules."""
        shards = [sharding.Shard(v, 0, v.numel()) for v in values]
        for site, v, cut in zip(self.sites, values, self._cut(shards[0::2], shards[1::2], reduce=False)):
            site.score.data.copy_(v)
            site.module.mask_cut = cut

    @torch.no_grad()
    def init_scores(self, method: str, *, seed: int = 0, mask_file: dict[str, torch.Tensor] | None = None) -> None:
        structures = None if mask_file is None else self._structures_of_file(mask_file, "mask file")
        self.init_args = {"method": method, "seed": seed, "mask_file": mask_file, "structures": structures}
        for site, keep in zip(self.sites, self.initial_keep()):
            sharding.local_shard(site.score).values.copy_(keep.to(site.score.dtype) * INIT_SCORE)
            site.module.mask_cut = Cut(INIT_SCORE / 2)
        self.mark_initial()

    @torch.no_grad()
    def stats(self, update_last: bool = True) -> dict:
        """As MaskSet.stats, per structure; `sparsity` is the fraction of head + FFN weights removed."""
        out = super().stats(update_last)
        per = out["per_matrix"]
        heads = sum(round(per[l.heads.name]["sparsity"] * self.num_heads) for l in self.layers)
        neurons = sum(round(per[l.neurons.name]["sparsity"] * self.num_neurons) for l in self.layers)
        out["sparsity"] = self.removed_fraction(heads, neurons)
        return out

    @torch.no_grad()
    def full_masks(self) -> dict[str, torch.Tensor]:
        """The weight-layout masks of every TAMT matrix: a pruned head's query/key/value rows and
        attention-output columns, a pruned neuron's intermediate row and output column."""
        out = {name: torch.ones(shape, dtype=torch.bool) for name, shape in self.dense_shapes.items()}
        for layer in self.layers:
            names = layer.names()
            for site, rows, cols in ((layer.heads, ("query", "key", "value"), "attn_out"),
                                     (layer.neurons, ("intermediate",), "ffn_out")):
                with sharding.gathered([site.score]):
                    keep = site.module.mask_cut.keep(site.score.data).cpu()
                for name in (*rows, cols):
                    shape = sharding.full_shape(self.modules[names[name]].weight)
                    if name in rows:
                        out[names[name]] = keep.repeat_interleave(shape[0] // keep.numel())[:, None].expand(shape).clone()
                    else:
                        out[names[name]] = keep.repeat_interleave(shape[1] // keep.numel())[None, :].expand(shape).clone()
        return out


def _dense_shapes(model: nn.Module, patterns: Iterable[str], skip: set[str]) -> dict[str, torch.Size]:
    """Full weight shapes of the TAMT matrices not in `skip`: all kept in mask.pt's layout."""
    regexes = [re.compile(p) for p in patterns]
    return {n: sharding.full_shape(m.weight) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and any(r.search(n) for r in regexes) and n not in skip}


def attach_structured(model: nn.Module, sparsity: float) -> StructuredMaskSet:
    check_settings(sparsity, "per_matrix")
    layers = []
    for name, module in model.named_modules():
        found = LAYER_PREFIX.match(name)
        if found is None or type(module) is not nn.Linear:
            continue
        prefix = found[1]
        sites = []
        for site_name, count in ((name, model.config.num_attention_heads),
                                 (prefix + "output.dense", model.config.intermediate_size)):
            target = model.get_submodule(site_name)
            w = target.weight
            attach_score(target, ColumnGatedLinear, nn.Parameter(torch.zeros(count, dtype=w.dtype, device=w.device)))
            sites.append(MaskSite(site_name, target))
        layers.append(StructuredLayer(prefix, *sites))
    if not layers:
        raise MaskError(f"{type(model).__name__} has no BERT / RoBERTa layers (layer.<i>.attention.output.dense): "
                        f"--sparsity_pattern structured needs one")
    skip = {n for layer in layers for n in layer.names().values()}
    return StructuredMaskSet(model, layers, sparsity, _dense_shapes(model, TAMT_PATTERNS, skip))


def attach_nm(model: nn.Module, pattern: SparsityPattern, patterns: Iterable[str]) -> NMMaskSet:
    """Scores on every masked Linear; the matrices' input size must be a multiple of M."""
    patterns = list(patterns)
    for name, module in model.named_modules():
        if type(module) is nn.Linear and any(re.search(p, name) for p in patterns):
            if sharding.full_shape(module.weight)[1] % pattern.m:
                raise MaskError(f"{name} has {sharding.full_shape(module.weight)[1]} inputs, not a multiple of "
                                f"{pattern.m}: pick M dividing it, or leave it out of --mask_patterns")
    # Only Linear matrices: the regexes that name the word embeddings are left out of the search.
    linear = [p for p in patterns if not re.search(p, "embeddings.word_embeddings")]
    masks = attach_masks(model, linear, sparsity=0.0)
    sites = [GatheredMaskSite(s.name, s.module) for s in masks.sites]
    return NMMaskSet(sites, pattern, _dense_shapes(model, patterns, {s.name for s in sites}))


def prepare_pattern_search(model: nn.Module, *, pattern: SparsityPattern, sparsity: float,
                           patterns: Iterable[str] = TAMT_PATTERNS, scope: str = "per_matrix", init: str = "magnitude",
                           seed: int = 0, mask_file: dict[str, torch.Tensor] | None = None
                           ) -> tuple[MaskSet, list[nn.Parameter]]:
    """masking.prepare_search for any pattern: the masks and the parameters to train."""
    if pattern.kind == "unstructured":
        return prepare_search(model, sparsity=sparsity, patterns=patterns, scope=scope, init=init, seed=seed,
                              mask_file=mask_file)
    if pattern.kind == "structured":
        return prepare_search(model, sparsity=sparsity, init=init, seed=seed, mask_file=mask_file,
                              attach=lambda m: attach_structured(m, sparsity))
    return prepare_search(model, sparsity=sparsity, init=init, seed=seed, mask_file=mask_file,
                          attach=lambda m: attach_nm(m, pattern, patterns))
