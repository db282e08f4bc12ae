"""Ties at the k-th score under bf16 ZeRO-3 (2 real ranks): exactly k pruned, the same cut as
one process computes on the full tensors, and the pruned ties spread evenly over rows
(embedding rows are token ids) instead of filling the first rows."""
import pytest
import torch

from tamt_ds.sharding import Shard
from tamt_ds.thresholds import bottom_k_cuts
from tests.conftest import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "ties_worker.py"
SPARSITY = 0.7


@pytest.fixture(scope="module")
def ties(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("ties") / "ties.pt"
    torchrun(WORKER, tiny_bert, out)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", ["all", "bf16"])
def test_exactly_k_and_the_same_cut_as_one_process(ties, case):
    r = ties[case]
    for (name, keep), (tau, tie_key) in zip(r["masks"].items(), r["cuts"]):
        scores = r["scores"][name].to(torch.bfloat16)
        k = int(keep.numel() * SPARSITY)
        assert int((~keep).sum()) == k and r["sparsity"][name] == k / keep.numel(), name
        (ref,) = bottom_k_cuts([Shard(scores.view(-1), 0, scores.numel())], [k], reduce=False)
        assert (ref.tau, ref.tie_key) == (tau, tie_key), name
        assert torch.equal(ref.keep(scores), keep), name
        ties_at_tau = int((scores == tau).sum())
        assert ties_at_tau > (1000 if case == "all" or "word_embeddings" in name else 50), (name, ties_at_tau)


@pytest.mark.parametrize("case", ["all", "bf16"])
def test_pruned_entries_spread_evenly_over_row_quarters(ties, case):
    for name, keep in ties[case]["masks"].items():
        quarters = (~keep).sum(1).double().tensor_split(4)
        k = sum(float(q.sum()) for q in quarters)
        for q in quarters:
            expected = k * len(q) / keep.shape[0]
            # a quarter's count spreads like a binomial's: 6 standard deviations
            assert abs(float(q.sum()) - expected) <= 6 * (expected * (1 - SPARSITY)) ** 0.5, (name, expected)
            if "word_embeddings" in name:  # rows are token ids: low ids are not pruned first
                assert abs(float(q.sum()) - expected) <= 0.015 * expected, (float(q.sum()), expected)
