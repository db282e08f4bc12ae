"""Sharding over ranks x workers, uneven shards, mixing weights, the validation split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tamt_ds.data import build_validation_batches
from tests.conftest_data import (
    bodies,
    deadline,
    distinct_docs,
    first_epoch,
    loader,
    make_args,
    pydoc_lines,
    recover_docs,
    take,
    tok,  # noqa: F401 - fixture
    write_jsonl,
    write_text,
)


@pytest.fixture(scope="module")
def docs(tok):
    return distinct_docs(tok, pydoc_lines()[:200])


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp("shards")
    single = write_text(d / "all.txt", docs)  # 1 shard < 4 readers: strided mode
    parts = d / "parts"  # 6 files >= 4 readers: shard mode, uneven (2, 2, 1, 1 files)
    parts.mkdir()
    bounds = np.linspace(0, len(docs), 7).astype(int)
    for i in range(6):
        write_text(parts / f"part-{i:02d}.txt", docs[bounds[i] : bounds[i + 1]])
    return {"strided": str(single), "shards": str(parts)}


def _reader_streams(args, tok, *, rank, world_size, n_batches):
    """Each logical worker's running text, from a real DataLoader with 2 worker processes."""
    batches = take(loader(args, tok, rank=rank, world_size=world_size), n_batches)
    workers = args.dataloader_num_workers
    # Batches come round-robin from the workers: batch i is worker i % workers's.
    return [bodies(batches[w::workers]) for w in range(workers)]


@pytest.mark.parametrize("mode", ["strided", "shards"])
def test_two_ranks_two_workers_read_every_document_exactly_once(mode, layouts, docs, tok):
    args = make_args(train_files=[layouts[mode]], dataloader_num_workers=2)
    epochs = []
    with deadline(120):
        for rank in range(2):
            for stream in _reader_streams(args, tok, rank=rank, world_size=2, n_batches=40):
                seen = recover_docs(stream, tok, docs)
                epoch = first_epoch(seen)
                assert seen[len(epoch) : 2 * len(epoch)] == epoch[: len(seen) - len(epoch)]  # next epoch: same order
                assert epoch == sorted(epoch)  # read in corpus order
                epochs.append(epoch)
    flat = [i for e in epochs for i in e]
    assert len(flat) == len(set(flat)), "a document was read by two readers"
    assert sorted(flat) == list(range(len(docs))), "a document was skipped"
    assert all(len(e) > 0 for e in epochs)


def test_uneven_shards_every_rank_keeps_step(tmp_path, docs, tok):
    # Shard mode, two ranks: rank 0 owns 190 documents (~40 blocks), rank 1 only 10 (a few blocks).
    write_text(tmp_path / "a.txt", docs[:190])
    write_text(tmp_path / "b.txt", docs[190:])
    args = make_args(train_files=[str(tmp_path)])
    ranks = [loader(args, tok, rank=r, world_size=2) for r in range(2)]
    steps = 0
    with deadline(60):
        for b0, b1 in itertools.islice(zip(*ranks), 30):  # a training loop in lockstep
            assert b0["input_ids"].shape == b1["input_ids"].shape
            steps += 1
    assert steps == 30
    assert ranks[1].epoch >= 5 and ranks[0].epoch == 0  # the short rank cycled its shard
    assert ranks[0].blocks_seen == ranks[1].blocks_seen == 30 * 4


def test_mixing_weights_hold(tmp_path, docs, tok):
    a, b = docs[:100], docs[100:]
    fa, fb = write_text(tmp_path / "a.txt", a), write_jsonl(tmp_path / "b.jsonl", b)
    index_b = set(range(100, len(docs)))
    for weights in ([0.75, 0.25], [0.3, 0.7]):
        args = make_args(train_files=[str(fa), str(fb)], mix_weights=weights, max_seq_length=128)
        seen = recover_docs(bodies(take(loader(args, tok, batch_size=16, seed=1), 60)), tok, docs)
        share_b = sum(i in index_b for i in seen) / len(seen)
        assert len(seen) > 1500
        assert abs(share_b - weights[1]) < 0.04, (weights, share_b)
    args = make_args(train_files=[str(fa), str(fb)], mix_weights=[1.0, 0.0])
    ld = loader(args, tok)
    seen = recover_docs(bodies(take(ld, 30)), tok, docs)
    assert not index_b & set(seen)
    assert ld.epoch == 1  # epochs count the sources that are drawn from


def test_validation_set_is_split_evenly_and_disjointly_over_ranks(layouts, tok):
    args = make_args(train_files=[layouts["strided"]], validation_files=[layouts["strided"]], validation_blocks=32)
    whole = torch.cat([b["input_ids"] for b in build_validation_batches(args, tok, batch_size=4, rank=0, world_size=1, seed=0, mlm=False)])
    assert whole.shape[0] == 32
    parts = [build_validation_batches(args, tok, batch_size=4, rank=r, world_size=3, seed=0, mlm=False) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]  # the same number of batches on every rank
    assert [sum(len(b["input_ids"]) for b in p) for p in parts] == [10, 11, 11]  # 32 blocks, none left out
    joined = torch.cat([b["input_ids"] for p in parts for b in p])
    assert torch.equal(joined, whole)  # in order, none shared


@pytest.mark.parametrize("mode", ["strided", "shards"])
def test_carved_validation_text_is_never_trained_on(mode, layouts, docs, tok):
    # 40 blocks: more than the first file holds in shard mode, so the carve spans two shards.
    args = make_args(train_files=[layouts[mode]], validation_blocks=40, dataloader_num_workers=2)
    val = bodies(build_validation_batches(args, tok, batch_size=8, rank=0, world_size=1, seed=0, mlm=False))
    carved = recover_docs(val, tok, docs)
    held_out = len(carved) + (0 if val[-1] == tok.sep_token_id else 1)  # a partly used document is held out whole
    assert carved == list(range(len(carved)))  # the head of the stream
    trained = []
    with deadline(120):
        for rank in range(2):
            for stream in _reader_streams(args, tok, rank=rank, world_size=2, n_batches=40):
                trained += first_epoch(recover_docs(stream, tok, docs))
    assert sorted(trained) == list(range(held_out, len(docs)))
