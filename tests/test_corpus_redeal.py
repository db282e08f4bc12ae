"""Resuming a data position on another layout (world size, workers): the rest of the epoch
is dealt to the new readers, no document read twice or skipped (docs/data.md)."""

from __future__ import annotations

import collections
import pickle

import numpy as np
import pytest
import torch

from tests.conftest_data import (
    bodies,
    deadline,
    distinct_docs,
    loader,
    make_args,
    pydoc_lines,
    take,
    tok,  # noqa: F401 - fixture
    write_jsonl,
    write_text,
)

N_SHARDS = 6


@pytest.fixture(scope="module")
def docs(tok):
    # ~38k tokens: readers get past their first read chunk (64 kept examples) and, on one
    # reader, the packer's first tokenisation chunk (256 documents) before the change.
    return distinct_docs(tok, pydoc_lines()[:600])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp("redeal")
    single = write_text(d / "all.txt", docs)  # 1 shard: strided mode
    parts = d / "parts"  # 6 files: shard mode for up to 6 readers
    parts.mkdir()
    bounds = np.linspace(0, len(docs), N_SHARDS + 1).astype(int)
    shards = []
    for i in range(N_SHARDS):
        write_text(parts / f"part-{i:02d}.txt", docs[bounds[i] : bounds[i + 1]])
        shards.append(list(range(bounds[i], bounds[i + 1])))
    return {"strided": (str(single), None), "shards": (str(parts), shards)}


def _own_share(mode_shards, reader: int, readers: int, n_docs: int) -> list[int]:
    """The documents a reader of the new layout reads in each later epoch, in order."""
    if mode_shards is None or len(mode_shards) < readers:  # strided: raw examples r, r + R, ...
        return list(range(reader, n_docs, readers))
    return [i for s in range(reader, len(mode_shards), readers) for i in mode_shards[s]]


def _pieces(stream: np.ndarray, sep: int) -> tuple[list[tuple], tuple]:
    """A running text cut at every SEP: the pieces, and what follows the last SEP."""
    cuts = np.flatnonzero(stream == sep)
    out, start = [], 0
    for c in cuts:
        out.append(tuple(stream[start:c].tolist()))
        start = c + 1
    return out, tuple(stream[start:].tolist())


def _reader_streams(batches, readers: int) -> list[np.ndarray]:
    # Batches come round-robin from a rank's readers, the first from worker 0.
    return [bodies(batches[w::readers]) for w in range(readers)]


CASES = {
    # name: (mode, (world, workers) before, (world, workers) after, batches per rank before)
    # (an epoch is ~150 batches of 4 x 64 tokens on one reader: each old reader reads ~60% of its share)
    "strided, 2 ranks -> 1": ("strided", (2, 0), (1, 0), 45),
    "strided, 1 rank -> 2": ("strided", (1, 0), (2, 0), 90),
    "shards, 2 ranks -> 1": ("shards", (2, 0), (1, 0), 45),
    "shards, 1 rank -> 2": ("shards", (1, 0), (2, 0), 90),
    "shards, 1 rank x 2 workers -> 3 ranks": ("shards", (1, 2), (3, 0), 90),
    "strided, 2 ranks -> 1 rank x 2 workers": ("strided", (2, 0), (1, 2), 45),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_document_of_the_epoch_exactly_once_across_a_layout_change(case, layouts, docs, tok):
    mode, (w0, k0), (w1, k1), n_before = CASES[case]
    path, shards = layouts[mode]
    table = {tuple(ids): i for i, ids in enumerate(tok(docs, add_special_tokens=False)["input_ids"])}
    sep = tok.sep_token_id
    seen = collections.Counter()
    begun = []  # old readers' last, partly consumed documents
    with deadline(240):
        before = [loader(make_args(train_files=[path], dataloader_num_workers=k0), tok, rank=r, world_size=w0)
                  for r in range(w0)]
        saved = []
        for ld in before:  # every rank takes the same number of steps
            batches = take(ld, n_before)
            assert ld.epoch == 0, "the position must be inside the first epoch"
            saved.append(pickle.loads(pickle.dumps(ld.state_dict())))  # what a checkpoint holds
            for stream in _reader_streams(batches, max(1, k0)):
                pieces, rest = _pieces(stream, sep)
                seen.update(table[p] for p in pieces)  # a KeyError would be a broken document
                if rest:
                    begun.append(rest)
        assert sum(seen.values()) > 0

        readers = w1 * max(1, k1)
        for r in range(w1):
            ld = loader(make_args(train_files=[path], dataloader_num_workers=k1), tok, rank=r, world_size=w1)
            ld.load_state_dict(saved)  # every saved rank's position
            batches, extra = [], 0
            for batch in ld:  # until every reader is past the dealt rest of epoch 0, and a bit more
                batches.append(batch)
                extra += ld.epoch >= 1
                if extra == 4:
                    break
            assert ld.epoch == 1
            for w, stream in enumerate(_reader_streams(batches, max(1, k1))):
                reader = r * max(1, k1) + w
                pieces, _ = _pieces(stream, sep)  # what follows the last SEP is cut off by the stop
                ids = []
                for p in pieces:
                    if p in table:
                        ids.append(table[p])
                        continue
                    # The rest of a document an old reader had begun: it comes first, once.
                    match = [h for h in begun if h + p in table]
                    assert len(match) == 1, f"{case}: reader {reader} reads text that is no document"
                    begun.remove(match[0])
                    seen[table[match[0] + p]] += 1
                # Then the reader's dealt part of epoch 0, then its own share from the start.
                own = _own_share(shards, reader, readers, len(docs))
                start = len(ids) - 1 - ids[::-1].index(own[0]) if own[0] in ids else len(ids)
                assert ids[start:] == own[: len(ids) - start], f"{case}: reader {reader}'s second epoch"
                seen.update(ids[:start])
    assert not begun, f"{case}: a begun document was not finished"
    twice = sorted(i for i, c in seen.items() if c > 1)
    skipped = sorted(set(range(len(docs))) - set(seen))
    assert not twice and not skipped, f"{case}: read twice {twice[:5]}, skipped {skipped[:5]}"


def test_a_position_saved_during_the_handover_resumes_exactly(layouts, docs, tok, tmp_path):
    """After a layout change, a checkpoint on the new layout (mid-handover) resumes bit for bit;
    a mixture of two sources; 2 ranks -> 1 rank x 2 workers -> back to 2 ranks."""
    path, _ = layouts["shards"]
    other = str(write_jsonl(tmp_path / "other.jsonl", docs[:40]))
    args = lambda k: make_args(train_files=[path, other], mix_weights=[0.7, 0.3], dataloader_num_workers=k)  # noqa: E731
    with deadline(240):
        first = [loader(args(0), tok, rank=r, world_size=2, seed=3, mlm=True) for r in range(2)]
        for ld in first:
            take(ld, 30)
        saved = [ld.state_dict() for ld in first]
        one = loader(args(2), tok, rank=0, world_size=1, seed=3, mlm=True)
        one.load_state_dict(saved)
        take(one, 3)
        mid = pickle.loads(pickle.dumps(one.state_dict()))
        ref = take(one, 12)
        again = loader(args(2), tok, rank=0, world_size=1, seed=3, mlm=True)
        again.load_state_dict(mid)
        for j, (a, b) in enumerate(zip(ref, take(again, 12))):
            for key in ("input_ids", "labels"):
                assert torch.equal(a[key], b[key]), f"batch {j} {key} differs"
        assert again.blocks_seen == one.blocks_seen == (2 * 30 + 3 + 12) * 4  # totals carried over
        # And on to 2 ranks again, from the 1-rank position taken mid-handover.
        back = [loader(args(0), tok, rank=r, world_size=2, seed=3, mlm=True) for r in range(2)]
        for ld in back:
            ld.load_state_dict([mid])
        blocks = [take(ld, 6) for ld in back]
    assert all(b["input_ids"].shape == (4, 64) for bs in blocks for b in bs)


def test_only_world_size_and_workers_may_change(layouts, tok):
    from tamt_ds.data import CorpusError

    path, _ = layouts["strided"]
    saved = [loader(make_args(train_files=[path]), tok, rank=r, world_size=2).state_dict() for r in range(2)]
    other = loader(make_args(train_files=[path]), tok, batch_size=8)
    with pytest.raises(CorpusError, match="batch_size 4 -> 8"):
        other.load_state_dict(saved)
