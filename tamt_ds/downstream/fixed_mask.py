"""The fixed mask of fine-tuning: pruned weights are exactly 0 and get no gradient.

The forward is the plain dense model: a pruned weight is 0, so W is W * m bit for bit,
and no score is attached or gathered, so a masked step costs what a dense one does.
Each rank keeps only its own shard of each mask (bool, aligned with its ZeRO-3 shard
of the weight) and uses it twice:
- before deepspeed.initialize, to write the zeros into its weight shard (so the fp32
  master copies DeepSpeed makes start from them);
- after each accumulation boundary's backward and before the optimizer step, to mask
  its gradient partition, so gradient clipping's norm and AdamW see exactly the
  straight-through gradient of W * m: dL/dW = dL/dW_eff * m.
With zero gradient, AdamW's moments and update of a pruned weight stay 0 and decoupled
weight decay multiplies 0: a pruned weight stays exactly 0, in fp32 and bf16.

The masks themselves: a mask file (kept exactly, whatever its per-matrix counts), or
one-shot magnitude / random pruning at sparsity S per matrix, built exactly as the
search's initial mask (masking.initial_keep).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from tamt_ds import sharding, zero
from tamt_ds.downstream.arguments import FinetuneArguments, MaskSpec
from tamt_ds.downstream.tasks import TaskSpec
from tamt_ds.masking import TAMT_PATTERNS, MaskError, initial_keep
from tamt_ds.models import ModelError, export_name, resolve_model_path, task_model_class, zero3_init


def tamt_matrices(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules TAMT masks (as masking.attach_masks picks them): where sparsity is counted."""
    regexes = [re.compile(p) for p in TAMT_PATTERNS]
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and any(r.search(n) for r in regexes)]


@dataclass
class MaskedMatrix:
    name: str  # module name in the task model
    weight: nn.Parameter
    keep: torch.Tensor  # this rank's shard of the mask: flat bool, the elements of its weight shard


class FixedMask:
    def __init__(self, matrices: list[MaskedMatrix]):
        self.matrices = matrices

    def __iter__(self):
        return iter(self.matrices)

    def __len__(self):
        return len(self.matrices)

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, mask: MaskSpec, mask_file: dict | None, seed: int = 0) -> FixedMask | None:
        """The mask `mask` on `model` (None for dense), with the pruned weights zeroed."""
        if mask.kind == "dense":
            return None
        if mask.kind == "file":  # exactly the matrices the file covers (checked by mask_for_task)
            named = [(n, m.weight) for n, m in tamt_matrices(model) if export_name(model, n) in mask_file]
            keeps = []
            for name, weight in named:
                shard = sharding.local_shard(weight)
                full = mask_file[export_name(model, name)].reshape(-1)
                keeps.append(full[shard.offset:shard.offset + shard.values.numel()].to(shard.values.device).bool())
        else:
            named = [(n, m.weight) for n, m in tamt_matrices(model)]
            ks = [int(sharding.full_numel(w) * mask.sparsity) for _, w in named]
            keeps = initial_keep(named, "magnitude" if mask.kind == "omp" else "random", ks, seed=seed)
        fixed = cls([MaskedMatrix(n, w, k) for (n, w), k in zip(named, keeps)])
        fixed.zero_pruned_weights()
        return fixed

    @torch.no_grad()
    def zero_pruned_weights(self) -> None:
        for m in self.matrices:
            w = sharding.local_shard(m.weight)
            w.values.mul_(m.keep.to(w.values.dtype))

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """dL/dW := dL/dW * m on this rank's gradients: call after the backward of an
        accumulation boundary (the gradient summed over its micro-batches), before the step."""
        for m in self.matrices:
            if sharding.is_partitioned(m.weight):  # ZeRO-3 holds this rank's partition of the gradient
                grad = zero.local_grad(m.weight)  # on the accelerator, even with offload
                grad.view(-1)[:m.keep.numel()].mul_(m.keep.to(grad.device, non_blocking=True))  # beyond: padding
                zero.set_local_grad(m.weight, grad)
            elif m.weight.grad is not None:
                m.weight.grad.mul_(m.keep.view_as(m.weight.grad))
            else:
                raise RuntimeError(f"{m.name}: no gradient to mask (fine-tune a mask under ZeRO-3 or without ZeRO)")


def mask_for_task(args: FinetuneArguments, spec: TaskSpec, mask: MaskSpec, mask_file: dict | None) -> MaskSpec:
    """Check a mask file against weightless (meta-device) copies of the model, before anything
    is written: every entry must be one of the backbone's TAMT matrices, with its shape (else
    the file was made for another model).  Matrices the file does not cover stay dense (a QA
    model has no pooler; a hand-made mask may skip the embeddings).  The file's sparsity is
    counted over the matrices it masks in this task's model."""
    if mask.kind != "file":
        return mask
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(args.model_name_or_path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {args.model_name_or_path!r} ({str(e).strip().splitlines()[0]}): pass "
                         f"--model_name_or_path with a local model directory or a reachable hub name") from e
    with zero3_init(None), torch.device("meta"):
        backbone, model = AutoModel.from_config(config), task_model_class(spec.head).from_config(config)
    maskable = {export_name(backbone, n): tuple(m.weight.shape) for n, m in tamt_matrices(backbone)}
    for key, keep in mask_file.items():
        if key not in maskable and key in dict(backbone.named_parameters()):
            raise MaskError(f"mask file {mask.path!r} has a mask for {key}, which TAMT does not mask (it masks the "
                            f"attention, feed-forward, pooler and word-embedding matrices): drop that entry")
        if key not in maskable:
            raise MaskError(f"mask file {mask.path!r} has a mask for {key}, which is not one of the model's "
                            f"{len(maskable)} masked matrices (such as {next(iter(maskable))}): it was made for "
                            f"another model; pass a mask from a search on this model")
        if tuple(keep.shape) != maskable[key]:
            raise MaskError(f"mask file {mask.path!r}: {key} has shape {tuple(keep.shape)} but the model's is "
                            f"{maskable[key]}: it was made for another model")
    keys = [export_name(model, n) for n, _ in tamt_matrices(model)]
    covered = [k for k in keys if k in mask_file]
    if not covered:
        raise MaskError(f"mask file {mask.path!r} masks none of the matrices of the {spec.name} model: pass a mask "
                        f"with entries such as {keys[0]}")
    zeros = sum(int((~mask_file[k].bool()).sum()) for k in covered)
    return dataclasses.replace(mask, sparsity=zeros / sum(mask_file[k].numel() for k in covered),
                               unmasked=tuple(k for k in keys if k not in mask_file))

