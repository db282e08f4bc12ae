"""Model FLOPs of a search step (tamt_ds/mfu.py) against torch's own FLOP counter, and the peaks."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tamt_ds import mfu
from tamt_ds.masking import prepare_search
from tamt_ds.models import load_model
from tamt_ds.objectives import compute_loss


@pytest.mark.parametrize("objective,mlm_head", [("kd", False), ("mlm_kd", True), ("mlm", True)])
def test_flops_per_token_equal_the_counted_matmuls_of_one_step(tiny_bert, tiny_roberta_mlm, objective, mlm_head):
    """Every matmul the step runs (teacher forward, student forward, backward through the
    straight-through layers), as torch counts them, equals the formula times the tokens."""
    torch.manual_seed(0)
    model = load_model(tiny_roberta_mlm if mlm_head else tiny_bert, with_mlm_head=mlm_head,
                       attn_implementation="eager")  # attention as matmuls, which the counter sees
    masks, _ = prepare_search(model, sparsity=0.5)
    ids = torch.randint(5, model.config.vocab_size, (3, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.where(torch.rand(ids.shape) < 0.3, ids, -100)}
    with FlopCounterMode(display=False) as counter:
        compute_loss(objective, model, masks, batch)["loss"].backward()
    expected = mfu.search_flops_per_token(model, objective, seq_len=16) * ids.numel()
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_gpu_peaks_come_from_the_table_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[0])
    cuda = torch.device("cuda", 0)
    names = ["NVIDIA H100 PCIe"]
    assert mfu.peak_flops(cuda, torch.bfloat16) == 756e12  # not the SXM part's 989
    names[0] = "NVIDIA H100 80GB HBM3"
    assert mfu.peak_flops(cuda, torch.bfloat16) == 989e12
    assert mfu.peak_flops(cuda, torch.float32) == (494e12 if torch.backends.cuda.matmul.allow_tf32 else 67e12)
    names[0] = "NVIDIA A100-SXM4-80GB"
    assert mfu.peak_flops(cuda, torch.float16) == 312e12
    names[0] = "Tesla T4"
    assert mfu.peak_flops(cuda, torch.float16) is None
    assert mfu.percent(1e12, None) == "n/a"


def test_cpu_peak_is_a_probe_taken_once_per_dtype():
    first = mfu.peak_flops(torch.device("cpu"), torch.float32)
    assert first > 0
    assert mfu.peak_flops(torch.device("cpu"), torch.float32) == first  # cached, not probed again
