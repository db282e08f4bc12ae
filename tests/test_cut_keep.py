"""Cut.keep against its definition: an entry is kept when its value is > tau, or == tau and
its tie key (a hash of its flat index) is > tie_key.  keep computes it in fewer passes (one
comparison, then the pruned ties: compared as integers, hashing only the ties on the CPU);
here every form (whole matrix, flat shard, gathered rows) and every path (cached keys, ties
hashed alone, every entry hashed: the accelerator's) must give the definition's mask bit for
bit, in bf16, fp16 and fp32, with NaN, +-inf, +0 and -0 among the values."""
from __future__ import annotations

import pytest
import torch

from tamt_ds import thresholds
from tamt_ds.thresholds import ALL_TIES, NO_TIES, Cut, tie_keys

SHAPE = (48, 40)


def scores(dtype: torch.dtype) -> torch.Tensor:
    """A few levels (many ties at each), -0 beside +0, NaN, +-inf, and rounded noise."""
    g = torch.Generator().manual_seed(3)
    m = torch.randint(-3, 4, SHAPE, generator=g).float() * 0.0125
    noise = torch.rand(SHAPE, generator=g) < 0.3
    m[noise] = torch.randn(int(noise.sum()), generator=g) * 0.02
    flat = m.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:200]] = -0.0
    flat[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -float("nan")])
    return m.to(dtype)


def definition(values: torch.Tensor, flat_index: torch.Tensor, cut: Cut) -> torch.Tensor:
    keys = tie_keys(flat_index)
    return (values > cut.tau) | ((values == cut.tau) & (keys > cut.tie_key))


def cuts(m: torch.Tensor) -> list[Cut]:
    """tau: each level (0 among them, compared as floats), a noise value, one the dtype does not
    hold; tie_key: none, all, and two in between."""
    levels = [float(torch.tensor(level).to(m.dtype)) for level in (0.0125, -0.025, 0.0375)]
    taus = [0.0, *levels, float(m.view(-1)[10]), 0.0125 + 1e-9]
    return [Cut(tau, key) for tau in taus for key in (NO_TIES, ALL_TIES, 1 << 29, 1_500_000_000)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("path", ["cached", "ties_hashed", "all_hashed"])
def test_keep_is_the_definition_in_every_form(dtype, path, monkeypatch):
    if path != "cached":
        monkeypatch.setattr(thresholds, "_CACHED_KEYS_MAX", 0)
    if path == "all_hashed":  # what an accelerator runs (no nonzero: its count would wait for the device)
        monkeypatch.setattr(thresholds, "host_counts_are_free", lambda device: False)
    m = scores(dtype)
    index = torch.arange(m.numel()).view(SHAPE)
    rows = torch.tensor([[5, 0, 47], [5, 12, 30]])
    for cut in cuts(m):
        want = definition(m, index, cut)
        assert torch.equal(cut.keep(m), want), cut
        for lo, hi in ((0, 700), (700, 1501), (1501, m.numel())):
            assert torch.equal(cut.keep(m.view(-1)[lo:hi], lo), want.view(-1)[lo:hi]), (cut, lo)
        assert torch.equal(cut.keep(m[rows], rows=rows), want[rows]), cut
