"""The held-out set at any world size: every block evaluated exactly once, the same number of
forwards on every rank (ZeRO-3 gathers are collective), and the evaluation over all ranks equal
to the one-process evaluation of all blocks.

World sizes up to 1024 are simulated in one process: the per-rank code runs once per rank, and
its all-reduces return the sum of every rank's contribution, as the real one hands every rank.
The real 2-rank ZeRO-3 path is tests/test_evaluate_mask.py."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tamt_ds import sharding
from tamt_ds.data.mlm import masking_spec
from tamt_ds.data.packing import TextEncoder, block_format
from tamt_ds.data.sources import local_source, open_source
from tamt_ds.data.validation import rank_batches, read_blocks
from tests.conftest_data import pydoc_lines, tok, write_text  # noqa: F401 - fixture

pytestmark = pytest.mark.sim

WORLD_SIZES = (1, 2, 3, 7, 8, 64, 512, 1024)
SEQ = 32


def synthetic_blocks(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n blocks whose tokens name the block (ids 1000 + i, past the special ids), the last half padded."""
    ids = [np.full(SEQ, 1000 + i, dtype=np.int64) for i in range(n)]
    masks = [np.ones(SEQ, dtype=np.int64) for _ in range(n)]
    masks[-1][SEQ // 2:] = 0
    return ids, masks


def split(world: int) -> list[int]:
    return sorted({0, world // 2, world - 1})  # first, middle, last rank


@pytest.mark.parametrize("n_blocks, batch_size", [(1, 1), (13, 4), (32, 16), (32, 1), (33, 8)])
@pytest.mark.parametrize("mlm", [False, True])
def test_every_block_once_and_the_same_number_of_batches_on_every_rank(n_blocks, batch_size, mlm, tok):
    ids, masks = synthetic_blocks(n_blocks)
    masking = masking_spec(tok) if mlm else None
    whole = rank_batches(ids, masks, batch_size=batch_size, rank=0, world_size=1, seed=3, masking=masking)
    whole_ids = torch.cat([b["input_ids"] for b in whole])
    for world in WORLD_SIZES:
        parts = [rank_batches(ids, masks, batch_size=batch_size, rank=r, world_size=world, seed=3, masking=masking)
                 for r in range(world)]
        counts = {len(p) for p in parts}
        assert counts == {-(-(-(-n_blocks // world)) // batch_size)}, (world, counts)  # ceil(ceil(n / W) / batch)
        real, padding = [], []
        for p in parts:
            for b in p:
                rows = b["attention_mask"].sum(1) > 0
                real.append(b["input_ids"][rows])
                padding.append(b if not rows.any() else None)
                assert rows.all() or not rows.any()  # a batch is all real blocks or one padding block
        joined = torch.cat(real)
        # Every block once, in order (the ranks' parts are contiguous), corrupted as on one rank.
        assert torch.equal(joined, whole_ids), world
        blocks_per_rank = [sum(int((b["attention_mask"].sum(1) > 0).sum()) for b in p) for p in parts]
        assert max(blocks_per_rank) - min(blocks_per_rank) <= 1
        for b in filter(None, padding):
            assert b["input_ids"].shape == (1, SEQ) and not b["attention_mask"].any()
            assert ("labels" in b) == mlm and (not mlm or bool((b["labels"] == -100).all()))


# ---------------------------------------------------------------------------
# The evaluation over all simulated ranks equals the one-process evaluation.


@contextmanager
def recording(sent: list):
    """all_reduce_ that records what this rank contributes (and reduces nothing)."""
    real = sharding.all_reduce_

    def record(tensor, op="sum", enabled=True):
        if enabled:
            sent.append(tensor.clone())
        return tensor

    sharding.all_reduce_ = record
    try:
        yield
    finally:
        sharding.all_reduce_ = real


@contextmanager
def reduced(totals: list):
    """all_reduce_ that hands back the sum over all ranks, call by call."""
    real, calls = sharding.all_reduce_, iter(totals)

    def reduce(tensor, op="sum", enabled=True):
        return tensor.copy_(next(calls)) if enabled else tensor

    sharding.all_reduce_ = reduce
    try:
        yield
    finally:
        sharding.all_reduce_ = real


def _key(batches) -> bytes:
    if isinstance(batches, tuple):
        return b"|".join(_key(b) for b in batches)
    return b"|".join(k.encode() + t.numpy().tobytes() + str(tuple(t.shape)).encode()
                     for b in batches for k, t in sorted(b.items()))


def over_world(measure, parts: list[list[dict]]) -> list[dict]:
    """`measure(batches)` on every rank of a simulated world; the results of its first, middle
    and last rank, each seeing the all-reduced sums (every rank makes the same all-reduces)."""
    sent, seen = [], {}
    for batches in parts:
        # Ranks with the same batches (those holding only padding) contribute the same: measured once.
        key = _key(batches)
        if key not in seen:
            seen[key] = []
            with recording(seen[key]):
                measure(batches)
        sent.append(seen[key])
    assert len({len(s) for s in sent}) == 1  # the same collectives on every rank
    totals = [torch.stack(call).sum(0) for call in zip(*sent)]
    out = []
    for r in split(len(parts)):
        with reduced(totals):
            out.append(measure(parts[r]))
    return out


@pytest.fixture(scope="module")
def searched_model(tmp_path_factory):
    """A tiny BERT with an MLM head and a 50% magnitude mask: KD to the dense model is not 0."""
    from tamt_ds.masking import prepare_search
    from tamt_ds.models import load_model
    from tests.tiny_models import make_tiny

    path = make_tiny(str(tmp_path_factory.mktemp("tiny_bert_mlm_val")), "bert", mlm_head=True)
    model = load_model(path, with_mlm_head=True)
    masks, _ = prepare_search(model, sparsity=0.5)
    model.eval()
    return model, masks


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tok):
    """13 real blocks of held-out text, the last one padded (its source runs out)."""
    fmt = block_format(tok, SEQ)
    docs, tokens = [], 0
    for doc in pydoc_lines("validation"):  # text for 12 and a part blocks
        n = len(tok(doc, add_special_tokens=False)["input_ids"]) + 1  # and its separator
        if tokens + n >= 13 * fmt.body:
            continue
        docs.append(doc)
        tokens += n
        if tokens > 12 * fmt.body + 2:
            break
    path = write_text(tmp_path_factory.mktemp("heldout") / "val.txt", docs)
    ids, masks = read_blocks([open_source(local_source(str(path)))], TextEncoder(tok), fmt, 13, label="val")
    assert len(ids) == 13 and 0 < masks[-1].sum() < SEQ, (len(ids), masks[-1].sum())
    return ids, masks


def test_search_evaluation_is_the_same_at_every_world_size(searched_model, held_out, tok):
    from tamt_ds.search import evaluate

    model, masks = searched_model
    ids, mask = held_out
    spec = masking_spec(tok)

    def measure(batches):
        return evaluate(model, masks, batches, "cpu", "mlm_kd")

    def parts(world):
        return [rank_batches(ids, mask, batch_size=4, rank=r, world_size=world, seed=9, masking=spec)
                for r in range(world)]

    (one,) = over_world(measure, parts(1))
    assert one["eval/kd_loss"] > 1e-3 and one["eval/mlm_loss"] > 0
    for world in WORLD_SIZES[1:]:
        for got in over_world(measure, parts(world)):
            assert got.keys() == one.keys()
            for key in one:  # the same sums in another order: float rounding only
                assert got[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), (world, key)


def test_evaluate_mask_is_the_same_at_every_world_size(searched_model, held_out, tok):
    from tamt_ds.evaluate_mask import measure as measure_masks
    from tamt_ds.objectives import teacher_hidden_states

    model, masks = searched_model
    ids, mask = held_out
    spec = masking_spec(tok)

    def measure(rank_parts):
        clean, corrupted = rank_parts
        teachers = [teacher_hidden_states(model, masks, b) for b in clean]
        with torch.no_grad():
            return measure_masks(model, masks, clean, teachers, corrupted, "cpu")

    def parts(world):
        return [(rank_batches(ids, mask, batch_size=4, rank=r, world_size=world, seed=9, masking=None),
                 rank_batches(ids, mask, batch_size=4, rank=r, world_size=world, seed=9, masking=spec))
                for r in range(world)]

    (one,) = over_world(measure, parts(1))
    assert one["tokens"] == sum(int(m.sum()) for m in mask) and one["kd_loss"] > 1e-3
    for world in WORLD_SIZES[1:]:
        for got in over_world(measure, parts(world)):
            assert got["tokens"] == one["tokens"], world
            for key in ("kd_loss", "mlm_loss", "mlm_accuracy"):
                assert got[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), (world, key)
