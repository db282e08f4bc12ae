"""A byte-level BPE tokenizer trained on real text, for tiny RoBERTa tests (no hub)."""
from __future__ import annotations

from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "tamt_ds" / "data" / "sample" / "train.txt"


def tiny_bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:2000]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
