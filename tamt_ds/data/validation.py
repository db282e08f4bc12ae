"""The fixed held-out validation set: from a validation source, or carved from the stream.

Carving takes the first documents of the training source (shard 0, then shard 1, ...)
until they fill `validation_blocks` blocks, and reports how many raw examples of each
shard it used. The training readers skip exactly those (`ReaderShare.skips`), so the
held-out text is never trained on, and both sides compute the carve the same way from
the same arguments -- no file to share between them.

The set is dealt over ranks in contiguous parts of ceil(n / W) or floor(n / W) blocks, every
block to exactly one rank, at any world size (more ranks than blocks included). Every rank
runs the same number of evaluation batches -- each forward gathers ZeRO-3 partitions, a
collective, so a rank that ran fewer forwards would leave the others waiting: a rank short
of the most batches ends with padding batches, which every measure counts as nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .errors import CorpusError
from .mlm import VALIDATION_STREAM, MaskingSpec, corrupt
from .packing import BlockFormat, TextEncoder, pack_finite
from .sources import column_texts, shard_dataset


@dataclass
class Carve:
    held_out: list[int]  # raw examples reserved at the head of each shard of the source
    input_ids: list[np.ndarray]
    attention_mask: list[np.ndarray]


def _texts(ds, shards: range, positions: list, shard_len: dict, column: str = "text") -> Iterator[str]:
    for s in shards:
        n = 0
        for batch in shard_dataset(ds, s).iter(batch_size=256):
            texts = column_texts(batch, column) or []
            for i, t in enumerate(texts):
                if t and not t.isspace():
                    positions.append((s, n + i))
                    yield t
            n += len(texts)
        shard_len[s] = n


def carve_head(ds, encoder: TextEncoder, fmt: BlockFormat, n_blocks: int, *, label: str, column: str = "text") -> Carve:
    """The first `n_blocks` full blocks of a source, and the raw examples they used per shard."""
    positions: list[tuple[int, int]] = []
    shard_len: dict[int, int] = {}
    docs = _texts(ds, range(ds.num_shards), positions, shard_len, column)
    ids, masks, used = [], [], 0
    for block, mask, used in pack_finite(docs, encoder, fmt, max_blocks=n_blocks, pad_last=False):
        ids.append(block)
        masks.append(mask)
    if len(ids) < n_blocks:
        raise CorpusError(
            f"cannot carve {n_blocks} validation blocks from {label!r}: it holds only {len(ids)} blocks of "
            f"{fmt.length} tokens; pass --validation_files, or a smaller --validation_blocks"
        )
    last_shard, last_index = positions[used - 1]
    held_out = [0] * ds.num_shards
    for s in range(last_shard):
        held_out[s] = shard_len[s]
    held_out[last_shard] = last_index + 1
    return Carve(held_out, ids, masks)


def read_blocks(datasets_in_order: list, encoder: TextEncoder, fmt: BlockFormat, n_blocks: int, *, label: str, column: str = "text"):
    """Up to `n_blocks` blocks from the start of validation sources (last one padded)."""

    def texts():
        for ds in datasets_in_order:
            for batch in ds.iter(batch_size=256):
                yield from (t for t in column_texts(batch, column) or [] if t and not t.isspace())

    out = [(b, m) for b, m, _ in pack_finite(texts(), encoder, fmt, max_blocks=n_blocks, pad_last=True)]
    if not out:
        raise CorpusError(f"validation source {label!r} holds no text; pass other --validation_files")
    return [b for b, _ in out], [m for _, m in out]


def rank_batches(
    input_ids: list[np.ndarray],
    attention_mask: list[np.ndarray],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    masking: MaskingSpec | None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's blocks [rank * n // W, (rank + 1) * n // W) in batches, then padding batches
    up to the number of batches of the ranks with the most blocks."""
    n = len(input_ids)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    most = -(-n // world_size)  # ceil(n / W): the blocks of the fullest ranks
    batches = []
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        ids = np.stack(input_ids[start:stop])
        mask = np.stack(attention_mask[start:stop])
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if masking is not None:
            # Keyed by the block's index in the whole set: the same corruption every evaluation.
            corrupted, labels = corrupt(ids, mask, range(start, stop), seed=seed, stream=VALIDATION_STREAM, spec=masking)
            batch = {"input_ids": torch.from_numpy(corrupted), "attention_mask": batch["attention_mask"], "labels": torch.from_numpy(labels)}
        batches.append(batch)
    while len(batches) < -(-most // batch_size):
        batches.append(padding_batch(input_ids[0], with_labels=masking is not None))
    return batches


def padding_batch(block: np.ndarray, *, with_labels: bool) -> dict[str, torch.Tensor]:
    """One block of real token ids (an ordinary forward) that no measure counts: no token is
    real (attention_mask 0: KD and token counts skip it) and none is predicted (labels -100)."""
    ids = torch.from_numpy(block.copy()).unsqueeze(0)
    batch = {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}
    if with_labels:
        batch["labels"] = torch.full_like(ids, -100)
    return batch
