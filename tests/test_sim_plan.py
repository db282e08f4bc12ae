"""The planner's per-rank shares at 1 to 1024 ranks against ZeRO-3's layout: the scores,
gradients and optimizer states it predicts per rank are the ranks' real shares of every
masked tensor (preflight.zero_share, what sharding.local_shard reads off a live parameter) to
within ZeRO's padding, and add up over the ranks to the whole.  The 2-rank measured step is
tests/test_plan.py."""
from __future__ import annotations

import pytest

from tamt_ds import plan, preflight
from tests.simworld import WORLD_SIZES, split

pytestmark = pytest.mark.sim

# bert-base's shape (the published one is config:bert-base-uncased; fixed here: no file read)
SHAPE = plan.Shape(hidden=768, layers=12, intermediate=3072, heads=12, vocab=30522, positions=512, token_types=2)
ZERO = plan.ZeroSettings(dtype_bytes=2, reduce_bucket_size=5 * 10**8, prefetch_bucket_size=5 * 10**7,
                         max_live_parameters=10**9, max_reuse_distance=10**9, param_persistence_threshold=0,
                         sub_group_size=10**9, offload_param=False, offload_optimizer=False)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_planned_shares_are_the_ranks_real_shares(world):
    inp = plan.PlanInput(model="sim", world_size=world, per_device_train_batch_size=8, max_seq_length=128)
    p = plan.estimate(inp, shape=SHAPE, zero=ZERO, masked_bytes=(3.0, 1.0, 2.0))
    part = {x.name: x.gb * plan.GB for x in p.parts}
    masked = plan.masked_tensors(plan.parameter_tensors(SHAPE, pooler=True))
    b, slack = ZERO.dtype_bytes, len(masked)  # padding: at most one element per tensor per rank
    real = [preflight.rank_elements(masked, r, world) for r in range(world)]
    assert sum(real) == sum(masked.values())  # the shares partition the scores
    assert part["scores"] * world == pytest.approx(sum(masked.values()) * b, rel=1e-12)
    # Rank 0 holds the largest share (P = ceil(n / N) of each tensor; the last ranks hold the rest):
    # the plan's n / N is at most one element per tensor below it, and no rank holds more.
    assert real[0] == max(real)
    for r in split(world):
        for name, per_element in (("scores", b), ("gradients", b), ("optimizer states", 12)):  # 12: fp32 + Adam
            assert real[r] * per_element <= part[name] + slack * per_element, (world, r, name)
    for name, per_element in (("scores", b), ("gradients", b), ("optimizer states", 12)):
        assert real[0] * per_element >= part[name] - 1e-6, (world, name)
