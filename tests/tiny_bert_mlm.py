"""A tiny BERT checkpoint laid out like bert-base-uncased: backbone, pre-trained MLM head and pooler."""
from __future__ import annotations

import os

import torch


def make_tiny_bert_mlm(path: str, *, dropout: float = 0.0, seed: int = 0) -> str:
    from safetensors.torch import load_file, save_file

    from tests.tiny_models import make_tiny

    make_tiny(path, "bert", dropout=dropout, mlm_head=True, seed=seed)
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = state["bert.embeddings.word_embeddings.weight"].shape[1]
    # AutoModelForMaskedLM saves no pooler; bert-base-uncased's checkpoint has one (from NSP pre-training).
    state["bert.pooler.dense.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.05
    state["bert.pooler.dense.bias"] = torch.randn(hidden, generator=gen) * 0.01
    save_file(state, file, metadata={"format": "pt"})
    return path
