"""BERT masked-language-model corruption, reproducible per block.

Each non-special, non-padding token is selected with probability p (15%); a selected
token becomes the label and its input is replaced by [MASK] 80% of the time, by a random
ordinary token 10% and left unchanged 10% (Devlin et al. 2019). Special tokens and
padding are never selected, so they never carry a label.

The random draws of a block come from a generator seeded by (stream, seed, the block's
global position), never from a shared running generator: the corruption of a block
does not depend on which worker built it, what came before it, or whether the run was
resumed in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import CorpusError

IGNORE_INDEX = -100  # label of positions that are not predicted (torch cross_entropy default)
TRAIN_STREAM, VALIDATION_STREAM = 0, 1


@dataclass(frozen=True)
class MaskingSpec:
    probability: float
    mask_id: int
    special: np.ndarray  # bool per vocabulary id: never selected
    replacements: np.ndarray  # ordinary ids drawn for the 10% random replacement


def masking_spec(tokenizer, probability: float = 0.15) -> MaskingSpec:
    if tokenizer.mask_token_id is None:
        raise CorpusError(f"MLM needs a tokenizer with a mask token; {type(tokenizer).__name__} has none (use mlm=False)")
    if not 0.0 < probability < 1.0:
        raise CorpusError(f"mlm_probability must be in (0, 1), got {probability}")
    special_ids = [i for i in tokenizer.all_special_ids if i is not None]
    size = max(len(tokenizer), max(special_ids) + 1)
    special = np.zeros(size, dtype=bool)
    special[special_ids] = True
    return MaskingSpec(probability, int(tokenizer.mask_token_id), special, np.flatnonzero(~special).astype(np.int64))


def block_rng(seed: int, stream: int, key: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed % (1 << 63), key])


def corrupt(
    input_ids: np.ndarray, attention_mask: np.ndarray, keys: Sequence[int], *, seed: int, stream: int, spec: MaskingSpec
) -> tuple[np.ndarray, np.ndarray]:
    """MLM-corrupt a batch [B, T]: returns (corrupted input_ids, labels)."""
    ids = input_ids.copy()
    batch, length = ids.shape
    sel_u = np.empty((batch, length))
    act_u = np.empty((batch, length))
    pick = np.empty((batch, length), dtype=np.int64)
    for b, key in enumerate(keys):
        rng = block_rng(seed, stream, int(key))
        sel_u[b] = rng.random(length)
        act_u[b] = rng.random(length)
        pick[b] = rng.integers(0, len(spec.replacements), length)
    candidate = (attention_mask == 1) & ~spec.special[ids]
    selected = candidate & (sel_u < spec.probability)
    labels = np.where(selected, ids, IGNORE_INDEX)
    to_mask = selected & (act_u < 0.8)
    to_random = selected & (act_u >= 0.8) & (act_u < 0.9)
    ids[to_mask] = spec.mask_id
    ids[to_random] = spec.replacements[pick[to_random]]
    return ids, labels
