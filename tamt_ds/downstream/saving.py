"""Saving a fine-tuned model as a plain transformers checkpoint (no ZeRO, no mask)."""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from tamt_ds import sharding, zero
from tamt_ds.export import replace_dir
from tamt_ds.models import task_model_class, zero3_init


@torch.no_grad()
def full_weight(p: nn.Parameter) -> torch.Tensor:
    """The full tensor of a parameter (collective): the optimizer's fp32 copy when it
    has one (bf16 training keeps the exact weights there), else the gathered parameter."""
    if p.requires_grad and zero.has_fp32_master(p):
        return zero.full_fp32_master(p).cpu()
    with sharding.gathered([p]):
        return p.data.detach().float().cpu().clone()


@torch.no_grad()
def save_model(model: nn.Module, tokenizer, head: str, out_dir: str) -> None:
    """Every parameter, consolidated one at a time (the pruned weights are the zeros the
    sparsity audit has just counted, in these very fp32 copies); rank 0 writes, into a
    temporary directory that replaces out_dir only when complete."""
    state = {}
    for name, p in model.named_parameters():
        full = full_weight(p)  # collective
        if sharding.rank() == 0:
            state[name] = full
    if sharding.rank() == 0:
        with zero3_init(None):  # a plain, whole model: the layout save_pretrained writes
            plain = task_model_class(head).from_config(model.config)
        plain.load_state_dict(state, strict=True)  # every parameter, nothing else
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-model-")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    sharding.barrier()
