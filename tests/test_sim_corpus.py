"""Which raw examples each reader reads, at 1 to 1024 ranks x 1 or 2 workers, and after a
change of layout mid-epoch (512 -> 8 ranks, 7 -> 1024, ...): every example of the epoch is
read exactly once across all readers, the held-out head never.  Simulated in one process
from the per-reader functions the loader runs (corpus._Plan's reader ids, sources.reader_share,
DocCursor.remaining, redeal.deal, Part.keeps); the real loaders at 1-3 ranks are
tests/test_corpus_sharding.py and tests/test_corpus_redeal.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tamt_ds.data import redeal
from tamt_ds.data.corpus import _Plan
from tamt_ds.data.sources import DocCursor, Part, reader_share
from tests.simworld import WORLD_SIZES

pytestmark = pytest.mark.sim

WORKERS = (0, 2)  # DataLoader workers: 0 (in-process, one reader per rank) and 2


def _sources() -> dict[str, tuple[list[int], list[int]]]:
    """name: (examples per shard, held-out head of each shard: the first examples of the stream)."""
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4, 4500).tolist()  # >= 2048 shards, some empty: shard mode at every layout
    some = rng.integers(1, 60, 40).tolist()  # shard mode up to 40 readers, strided past that
    return {
        "one file": ([4099], [40]),
        "4500 shards": (many, [many[0], many[1], min(1, many[2])] + [0] * (len(many) - 3)),
        "40 shards": (some, [some[0], 1] + [0] * (len(some) - 2)),
    }


SOURCES = _sources()


def plan(rank: int, world: int, workers: int) -> _Plan:
    """The layout part of a loader's plan (what reader_id and num_readers read)."""
    return _Plan(specs=[], datasets=[], sizes=[], held_out=None, weights=None, encoder=None, fmt=None, masking=None,
                 batch_size=1, rank=rank, world_size=world, num_workers=workers, seed=0)


def readers(world: int, workers: int) -> list[tuple[int, int]]:
    """(rank, reader id) of every reader of the layout, checked to number them 0..R-1 once each."""
    out = [(r, plan(r, world, workers).reader_id(w)) for r in range(world) for w in range(max(1, workers))]
    assert sorted(i for _, i in out) == list(range(plan(0, world, workers).num_readers))
    return out


def stream_len(part: Part, sizes: list[int]) -> int:
    return sum(sizes) if part.shard is None else sizes[part.shard]


def kept(part: Part, sizes: list[int], start: int = 0, stop: int | None = None) -> np.ndarray:
    """Raw examples of the part's stream a reader keeps, reading [start, stop), as global indices."""
    raw = np.arange(start, stream_len(part, sizes) if stop is None else stop)
    first = 0 if part.shard is None else sum(sizes[: part.shard])
    return first + raw[part.keeps(raw)]


def expected_once(sizes: list[int], held: list[int]) -> np.ndarray:
    """1 for every example of the epoch, 0 for the held-out heads."""
    want = np.ones(sum(sizes), dtype=np.int64)
    for s, h in enumerate(held):
        start = sum(sizes[:s])
        want[start:start + h] = 0
    return want


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_example_read_once_across_readers(world, workers):
    for name, (sizes, held) in SOURCES.items():
        count = np.zeros(sum(sizes), dtype=np.int64)
        n_readers = plan(0, world, workers).num_readers
        for _, reader in readers(world, workers):
            for part in reader_share(len(sizes), reader, n_readers, held, sizes).parts:
                np.add.at(count, kept(part, sizes), 1)
        assert np.array_equal(count, expected_once(sizes, held)), (name, world, workers)


def halfway(share, sizes: list[int], reader: int) -> tuple[redeal.OldReader, np.ndarray]:
    """An old reader stopped in the middle of its epoch (a different point for each reader):
    what DocCursor.remaining gives for that position, and the examples it had read."""
    parts = share.parts
    stream = reader % len(parts) if len(parts) > 1 else 0
    length = stream_len(parts[stream], sizes)
    done_raw = (length * (reader % 5 + 1)) // 6  # behind the last document handed out
    cursor = DocCursor(None, share, label="sim")
    cursor.load_state_dict({"epoch": 0, "stream": stream, "chunk_state": None, "chunk_start": 0, "taken": 0,
                            "raw_done": 0, "kept_in_epoch": 1, "done_raw": done_raw, "raw_per_epoch": None,
                            "transition": None})
    read = [kept(p, sizes) for p in parts[:stream]] + [kept(parts[stream], sizes, stop=done_raw)]
    leftover = np.array([reader], dtype=np.int32) if reader % 3 else np.empty(0, dtype=np.int32)  # a begun document
    return redeal.OldReader(leftover, [cursor.remaining()], [0]), np.concatenate(read)


CHANGES = [((512, 0), (8, 2)), ((8, 2), (3, 0)), ((7, 0), (1024, 2)), ((1024, 2), (1, 0)), ((3, 2), (64, 0)),
           ((1, 0), (7, 2)), ((64, 0), (512, 0)), ((2, 0), (1, 2))]


@pytest.mark.parametrize("before, after", CHANGES, ids=[f"{a[0]}x{a[1]}->{b[0]}x{b[1]}" for a, b in CHANGES])
def test_the_rest_of_a_half_read_epoch_is_read_once_on_another_layout(before, after):
    for name, (sizes, held) in SOURCES.items():
        n_old = plan(0, *before).num_readers
        count = np.zeros(sum(sizes), dtype=np.int64)
        old = []
        for _, reader in sorted(readers(*before), key=lambda x: x[1]):  # the saved order: rank, then worker
            o, read = halfway(reader_share(len(sizes), reader, n_old, held, sizes), sizes, reader)
            old.append(o)
            np.add.at(count, read, 1)
        n_new = plan(0, *after).num_readers
        dealt = redeal.deal(old, n_new)
        shards_left = sum(p.shard is not None for o in old for p in o.remaining[0])
        carried = []
        for _, reader in readers(*after):
            mine = dealt[reader]
            assert mine.epochs == [0]
            # a reader opens its own few shards, not every one left (4M opens at 7 -> 2048 readers)
            assert sum(p.shard is not None for p in mine.parts[0]) <= -(-shards_left // n_new), (name, before, after)
            carried += [int(t) for c in mine.carry for t in c]
            for part in mine.parts[0]:
                np.add.at(count, kept(part, sizes, start=part.resume_at), 1)
        assert np.array_equal(count, expected_once(sizes, held)), (name, before, after)
        begun = [int(o.leftover[0]) for o in old if len(o.leftover)]
        assert sorted(carried) == begun, (name, before, after)  # every begun document finished once


def test_a_reader_past_its_share_would_be_seen():
    """The check above counts: a part read from its stream's start again is caught."""
    sizes, held = SOURCES["one file"]
    share = reader_share(1, 0, 2, held, sizes)
    o, read = halfway(share, sizes, 1)
    again = dataclasses.replace(o.remaining[0][0], starts=((0, 0),))
    count = np.zeros(sum(sizes), dtype=np.int64)
    np.add.at(count, read, 1)
    np.add.at(count, kept(again, sizes), 1)
    assert count.max() == 2
