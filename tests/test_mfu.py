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


@pytest.mark.parametrize("objective,mlm_head", [("kd", False), ("mlm_kd", True), ("mlm", True)])
def test_a_planned_search_counts_what_the_built_search_counts(tiny_bert, tiny_roberta_mlm, objective, mlm_head):
    """IMP's cost and the study's GPU-hours count a job from its config (the model on the meta
    device): the same FLOPs as the search's own model with its masks attached."""
    model = load_model(tiny_roberta_mlm if mlm_head else tiny_bert, with_mlm_head=mlm_head)
    prepare_search(model, sparsity=0.5)
    planned = mfu.meta_model(model.config, objective)
    assert mfu.search_flops_per_token(planned, objective, seq_len=16) == mfu.search_flops_per_token(
        model, objective, seq_len=16)


def test_imp_and_finetune_counts_equal_the_counted_matmuls_of_a_training_step(tiny_roberta_mlm):
    """Every weight trains (IMP: the MLM head too): torch's FLOP counter over one step."""
    from transformers import AutoModel

    from tamt_ds.models import attach_backbone_pooler, model_config

    config = model_config(tiny_roberta_mlm)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees
    ids = torch.randint(5, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    mlm = load_model(tiny_roberta_mlm, with_mlm_head=True, attn_implementation="eager").train()
    attach_backbone_pooler(mlm, tiny_roberta_mlm)
    with FlopCounterMode(display=False) as counter:
        mlm(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == pytest.approx(
        mfu.search_flops_per_token(mfu.meta_model(config, "imp"), "imp", seq_len=16) * ids.numel(), rel=1e-9)
    backbone = AutoModel.from_pretrained(tiny_roberta_mlm, attn_implementation="eager").train()
    with FlopCounterMode(display=False) as counter:
        backbone(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
    assert counter.get_total_flops() == pytest.approx(
        mfu.search_flops_per_token(mfu.meta_model(config, "finetune"), "finetune", seq_len=16) * ids.numel(),
        rel=1e-9)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(input_ids=ids)
    assert counter.get_total_flops() == pytest.approx(
        mfu.forward_flops_per_token(mfu.meta_model(config, "finetune"), seq_len=16) * ids.numel(), rel=1e-9)
