"""2:4 tickets as semi-structured sparse weights (tamt_ds/semi_structured.py): which Linear layers
convert, decided from the exported weights alone; the conversion itself needs a CUDA GPU
(scripts/gpu_check.sh runs it), so here a recording backend stands in for torch's."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from tamt_ds import semi_structured as ss

Rule = namedtuple("Rule", "sparse_min_rows sparse_min_cols dense_min_rows dense_min_cols")


def recording_backend(min_rows: int, min_cols: int):
    class Recording:  # the two things of torch's backend classes the conversion uses
        _DTYPE_SHAPE_CONSTRAINTS = {torch.bfloat16: Rule(min_rows, min_cols, 8, 8)}
        seen: list[torch.Tensor] = []

        @classmethod
        def from_dense(cls, dense):
            cls.seen.append(dense)
            return dense.clone()

    return Recording


@pytest.fixture(scope="module")
def two_four_model(tiny_bert, tmp_path_factory):
    """A 2:4 magnitude ticket of the tiny BERT, exported as a search exports it, loaded back with transformers."""
    from transformers import AutoModel

    from tamt_ds.export import save_pruned_model
    from tamt_ds.models import load_tokenizer
    from tamt_ds.pattern_baselines import baseline_masks

    out = str(tmp_path_factory.mktemp("two_four") / "pruned_model")
    save_pruned_model(baseline_masks(tiny_bert, "2:4", 0.5), tiny_bert, load_tokenizer(tiny_bert), out)
    return out, AutoModel.from_pretrained(out, torch_dtype=torch.bfloat16)


def test_is_two_four_counts_each_group_of_four():
    w = torch.zeros(2, 8)
    w[0, :2] = w[0, 5] = w[0, 7] = w[1, 2:4] = 1.0
    assert ss.is_two_four(w)
    w[1, 0] = 1.0  # a third non-zero in row 1's first group
    assert not ss.is_two_four(w)
    assert not ss.is_two_four(torch.zeros(2, 6))  # rows not made of whole groups
    assert not ss.is_two_four(torch.zeros(8))


def test_an_exported_two_four_ticket_converts_every_masked_linear(two_four_model, monkeypatch):
    monkeypatch.setattr(ss, "check_device", lambda device: None)  # (a CPU model: the conversion's choice only)
    _, model = two_four_model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    masked = {n for n in linears if any(k in n for k in ("query", "key", "value", "dense"))}
    assert masked and {n for n, m in linears.items() if ss.is_two_four(m.weight)} == masked
    backend = recording_backend(16, 16)
    before = {n: linears[n].weight.detach().clone() for n in masked}
    converted = ss.to_semi_structured(model, backend)
    assert sorted(converted) == sorted(masked)
    for n in masked:  # the weights handed to the backend are the exported ones, unchanged
        assert torch.equal(linears[n].weight, before[n]) and not linears[n].weight.requires_grad
    assert len(backend.seen) == len(masked)


def test_only_weights_that_fit_the_backends_block_convert(two_four_model, tiny_bert, monkeypatch):
    monkeypatch.setattr(ss, "check_device", lambda device: None)
    from transformers import AutoModel

    out, _ = two_four_model
    model = AutoModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    # CUTLASS's bf16 block is 32 x 64: of the tiny model's [32, 32], [64, 32] and [32, 64] weights only the last fit
    converted = ss.to_semi_structured(model, recording_backend(32, 64))
    assert converted and all(n.endswith("output.dense") and "attention" not in n for n in converted)
    with pytest.raises(ss.SemiStructuredError, match="no 2:4 weight fits .* torch.bfloat16"):
        ss.to_semi_structured(AutoModel.from_pretrained(out, torch_dtype=torch.bfloat16),
                              recording_backend(128, 128))
    with pytest.raises(ss.SemiStructuredError, match="no Linear weight of the model is 2:4"):
        ss.to_semi_structured(AutoModel.from_pretrained(tiny_bert, torch_dtype=torch.bfloat16),
                              recording_backend(16, 16))


def test_a_cpu_model_is_refused_in_one_line(two_four_model):
    _, model = two_four_model
    with pytest.raises(ss.SemiStructuredError, match=r"run on CUDA GPUs .* model is on cpu: move it with model.cuda\(\)"):
        ss.to_semi_structured(model)
