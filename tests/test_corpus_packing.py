"""Packing (block boundaries, special tokens, several tokenizer families) and MLM corruption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tamt_ds.data import build_validation_batches
from tamt_ds.data.mlm import IGNORE_INDEX
from tamt_ds.data.packing import block_format
from tests.conftest_data import (
    bodies,
    loader,
    make_args,
    pydoc_lines,
    stream_of,
    take,
    tok,  # noqa: F401 - fixture
    write_text,
)

DOCS = pydoc_lines()[:300]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("pack") / "train.txt", DOCS)


# ---------------------------------------------------------------------------
# Tokenizer families, built offline from real text in the formats the models ship.


def _bpe_roberta(root):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pydoc_lines()[:1500], vocab_size=800, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(root))
    return RobertaTokenizer.from_pretrained(str(root))


def _sentencepiece(root, cls_name):
    import sentencepiece as spm
    import transformers

    model = root / "spiece.model"
    if not model.exists():
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(pydoc_lines()[:1500]), model_prefix=str(root / "spiece"), vocab_size=1000,
            model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
            control_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2,
        )
        # the file name each model family looks for
        for name in ("sentencepiece.bpe.model", "spm.model"):
            (root / name).write_bytes(model.read_bytes())
    return getattr(transformers, cls_name).from_pretrained(str(root))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tokenizers")
    (root / "bpe").mkdir()
    (root / "spm").mkdir()
    return {
        "wordpiece-bert": tok,
        "bpe-roberta": _bpe_roberta(root / "bpe"),
        "sentencepiece-albert": _sentencepiece(root / "spm", "AlbertTokenizer"),
        "sentencepiece-xlmr": _sentencepiece(root / "spm", "XLMRobertaTokenizer"),
        "sentencepiece-debertav3": _sentencepiece(root / "spm", "DebertaV2Tokenizer"),
    }


TEMPLATES = {  # (first token, last token, document separator) of each family
    "wordpiece-bert": ("[CLS]", "[SEP]", "[SEP]"),
    "bpe-roberta": ("<s>", "</s>", "</s>"),
    "sentencepiece-albert": ("[CLS]", "[SEP]", "[SEP]"),
    "sentencepiece-xlmr": ("<s>", "</s>", "</s>"),
    "sentencepiece-debertav3": ("[CLS]", "[SEP]", "[SEP]"),
}


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_blocks_are_running_text_between_the_models_special_tokens(family, tokenizers, train_file):
    t = tokenizers[family]
    first, last, sep = (t.convert_tokens_to_ids(x) for x in TEMPLATES[family])
    fmt = block_format(t, 48)
    assert (fmt.prefix, fmt.suffix, fmt.doc_sep) == ((first,), (last,), sep)
    batches = take(loader(make_args(train_files=[str(train_file)], max_seq_length=48), t, batch_size=8), 40)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape[1] == 48
    assert (ids[:, 0] == first).all() and (ids[:, -1] == last).all()
    assert (torch.cat([b["attention_mask"] for b in batches]) == 1).all()  # no padding in training
    assert not (ids == t.pad_token_id).any()
    # Bodies concatenated = every document's tokens followed by the separator, in order,
    # nothing dropped at block boundaries, nothing repeated.
    got = bodies(batches)
    want = stream_of(t, DOCS)
    assert np.array_equal(got, want[: len(got)])
    assert len(got) == 40 * 8 * 46


def test_max_seq_length_is_checked_against_the_model(tok):
    from tamt_ds.data import CorpusError

    with pytest.raises(CorpusError, match="--max_seq_length 512"):
        block_format(tok, 1024)


# ---------------------------------------------------------------------------
# MLM corruption.


def _clean_and_corrupt(tok, train_file, n, *, seed=3, batch_size=16, length=128):
    args = make_args(train_files=[str(train_file)], max_seq_length=length)
    clean = take(loader(args, tok, batch_size=batch_size, seed=seed, mlm=False), n)
    masked = take(loader(args, tok, batch_size=batch_size, seed=seed, mlm=True), n)
    cat = lambda bs, k: torch.cat([b[k] for b in bs]).numpy()  # noqa: E731
    return cat(clean, "input_ids"), cat(masked, "input_ids"), cat(masked, "labels")


def test_mlm_rates_15_percent_80_10_10(tok, train_file):
    clean, inputs, labels = _clean_and_corrupt(tok, train_file, 100)  # ~200k tokens
    special = np.isin(clean, tok.all_special_ids)
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any()  # never a label on [CLS] / [SEP]
    assert np.array_equal(labels[selected], clean[selected])  # the label is the original token
    assert np.array_equal(inputs[~selected], clean[~selected])  # unselected tokens untouched
    rate = selected.sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.005, rate
    n = selected.sum()
    masked = (inputs[selected] == tok.mask_token_id).sum() / n
    kept = (inputs[selected] == clean[selected]).sum() / n
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01, (masked, kept, replaced)
    # random replacements are ordinary tokens, never special ones
    rnd = selected & (inputs != tok.mask_token_id) & (inputs != clean)
    assert not np.isin(inputs[rnd], tok.all_special_ids).any()


def test_mlm_is_reproducible_and_depends_only_on_seed_and_position(tok, train_file):
    _, a_in, a_lab = _clean_and_corrupt(tok, train_file, 10, seed=5, batch_size=8)
    _, b_in, b_lab = _clean_and_corrupt(tok, train_file, 10, seed=5, batch_size=8)
    assert np.array_equal(a_in, b_in) and np.array_equal(a_lab, b_lab)
    # another batching of the same block stream: same corruption block for block
    _, c_in, c_lab = _clean_and_corrupt(tok, train_file, 20, seed=5, batch_size=4)
    assert np.array_equal(a_in, c_in) and np.array_equal(a_lab, c_lab)
    _, d_in, d_lab = _clean_and_corrupt(tok, train_file, 10, seed=6, batch_size=8)
    assert not np.array_equal(a_lab, d_lab)


def test_no_labels_on_padding_or_special_tokens_in_the_validation_set(tok, tmp_path):
    # A validation text shorter than the 8 blocks asked for: its last block is padded.
    val = write_text(tmp_path / "val.txt", pydoc_lines("validation")[:4])
    args = make_args(validation_files=[str(val)], validation_blocks=8, max_seq_length=128)
    batches = build_validation_batches(args, tok, batch_size=8, rank=0, world_size=1, seed=0, mlm=True)
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert (mask == 0).any(), "the test needs a padded block"
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert (ids[mask == 0] == tok.pad_token_id).all()
    clean = torch.cat([b["input_ids"] for b in build_validation_batches(args, tok, batch_size=8, rank=0, world_size=1, seed=0, mlm=False)])
    special = torch.isin(clean, torch.tensor(tok.all_special_ids))
    assert (labels[special] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).any()
    # fixed: the same set, corrupted the same way, every time it is built
    again = build_validation_batches(args, tok, batch_size=8, rank=0, world_size=1, seed=0, mlm=True)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)
