"""The streamlined ZeRO-3 optimizer step (tamt_ds/zero.py, streamline_step: the gradient norm without fp64
copies, the fp32 gradient cast once from the flat buffer) against DeepSpeed's own methods on the
same gradients, on 1 and 2 real ranks, fp32 and bf16, several sub-groups.  That the whole search
still trains exactly like the single-process reference is tests/test_zero3_core.py's."""
import pytest
import torch

from tests.conftest import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "zero3_step_worker.py"


@pytest.mark.parametrize("nproc", [1, 2])
def test_streamlined_step_equals_deepspeeds(tiny_bert, tmp_path, nproc):
    torchrun(WORKER, tiny_bert, tmp_path / "out.pt", nproc=nproc)
    every_rank = torch.load(tmp_path / "out.pt", weights_only=False)
    assert len(every_rank) == nproc
    for config in every_rank[0]:
        ranks = [facts[config] for facts in every_rank]
        for facts in ranks:
            assert facts["installed"], config
            assert facts["sub_groups"] > 1, config  # each sub-group is a segment of the flat buffer
            assert all(facts["grads_equal"]), config  # bit-identical fp32 gradients
            assert facts["trained"], config
            for ours, deepspeeds in facts["norms"]:
                assert deepspeeds > 0 and abs(ours - deepspeeds) <= 1e-6 * deepspeeds, (config, ours, deepspeeds)
        # one all-reduced norm: the same bits on every rank
        assert all(facts["norms"] == ranks[0]["norms"] for facts in ranks), config
