"""Dealing the rest of an epoch to another layout of readers (world size or workers changed).

A saved data position is exact for the readers that saved it. On another number of
readers it goes on like this:

1. Replay each old reader: re-read its packer's chunk to find the document the last
   consumed block ended in (`Packer.unconsumed`). The tokens read but not consumed --
   the rest of that document, or text carried over -- are the reader's *leftover*;
   each of its source cursors then stands right after the last document it handed out.
2. Per source, what each old reader has not read of its pass in progress is a list of
   `Part`s (`DocCursor.remaining`): the rest of the stream it was in, then its later
   streams.
3. Deal it all to the N new readers. Parts over one shard go whole, round-robin, when
   there are at least N of them; otherwise reader j shares shard j % P with the other
   readers of that shard (each takes every m-th kept example of it). Scans of a whole
   source (strided mode, merged over the old readers) are shared by all N readers. The leftovers go round-robin, as the new readers' first text.
4. Each new reader reads its leftovers and dealt parts (its *transition*), then its own
   share of the new layout, epoch after epoch.

No document of the pass in progress is read twice or skipped. The order is not that of
an uninterrupted run on the new layout (that run would have dealt the epoch otherwise
from its start), and MLM corruption stays unique per block (`key_base` in corpus.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .packing import Packer
from .sources import Part


@dataclass
class OldReader:
    """Where one reader of the saved layout stands."""

    leftover: np.ndarray  # tokens read, not yet in a consumed block
    remaining: list[list[Part]]  # per source: what is left of the pass in progress
    epochs: list[int]  # per source: the pass in progress


@dataclass
class Dealt:
    """What one reader of the new layout reads before its own share."""

    carry: list[np.ndarray] = field(default_factory=list)
    parts: list[list[Part]] = field(default_factory=list)  # per source
    epochs: list[int] = field(default_factory=list)  # per source: the pass the parts finish


def old_reader(packer: Packer) -> OldReader:
    """Replay a packer restored to an old reader's position (see step 1 above)."""
    leftover, docs_state = packer.unconsumed()
    packer.docs.load_state_dict(docs_state)
    cursors = packer.docs.cursors
    return OldReader(leftover, [c.remaining() for c in cursors], [c.epoch for c in cursors])


def _merge(parts: list[Part]) -> Part:
    """One scan of a whole source for several old readers' parts (disjoint offsets)."""
    starts = sorted(s for p in parts for s in p.starts)
    assert len({o for o, _ in starts}) == len(starts), "two readers kept the same examples"
    earliest = min(parts, key=lambda p: p.resume_at)
    return dataclasses.replace(earliest, starts=tuple(starts))


def deal(old: list[OldReader], n_new: int) -> list[Dealt]:
    """Split the old readers' leftovers and remaining parts over `n_new` readers."""
    n_sources = len(old[0].remaining)
    dealt = [Dealt(parts=[[] for _ in range(n_sources)], epochs=[min(o.epochs[i] for o in old) for i in range(n_sources)])
             for _ in range(n_new)]
    for r, o in enumerate(old):
        if len(o.leftover):
            dealt[r % n_new].carry.append(o.leftover)
    for i in range(n_sources):
        whole: list[Part] = []
        scans: dict[tuple, list[Part]] = {}
        for o in old:
            for part in o.remaining[i]:
                if part.shard is not None:
                    whole.append(part)
                else:
                    scans.setdefault((part.stride, part.skip, part.split, part.split_index), []).append(part)
        if len(whole) >= n_new:
            for k, part in enumerate(whole):
                dealt[k % n_new].parts[i].append(part)
        elif whole:
            # Too few shards to go round: reader j shares shard j % P with the other readers
            # of that shard, so each reader opens one shard (2,048 readers each opening all of
            # 2,000 shards to keep one example in 2,048 would be 4M stream opens).
            for j in range(n_new):
                k = j % len(whole)
                dealt[j].parts[i].append(_share(whole[k], len(range(k, n_new, len(whole))), j // len(whole)))
        for part in (_merge(group) for group in scans.values()):
            for j in range(n_new):
                dealt[j].parts[i].append(_share(part, n_new, j))
    return dealt


def _share(part: Part, n: int, index: int) -> Part:
    """The index-th of n interleaved shares of what `part` keeps."""
    return dataclasses.replace(part, split=part.split * n, split_index=part.split_index + part.split * index)
