"""A byte-level BPE tokenizer trained on real text, for tiny RoBERTa tests (no hub)."""
from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    sample = Path(__file__).resolve().parents[1] / "tamt_ds" / "data" / "sample" / "train.txt"
    lines = sample.read_text(encoding="utf-8").splitlines()[:2000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    import tempfile

    d = tempfile.mkdtemp()
    bpe.save_model(d)
    return RobertaTokenizerFast(vocab_file=f"{d}/vocab.json", merges_file=f"{d}/merges.txt")
