"""2:4 tickets as GPU sparse matmuls: torch's semi-structured sparse weights (issue 18 §2).

A 2:4 search keeps 2 of every 4 consecutive weights along a Linear's input dimension, which is
the row layout NVIDIA's sparse tensor cores (compute capability >= 8.0) and
`torch.sparse.to_sparse_semi_structured` take: an exported or fine-tuned 2:4 model's Linear
weights convert as they are.  Which weights convert is decided here from the weights alone
(at most 2 non-zeros in every group of 4 of a row, and the backend's shape rule), so any 2:4
model works, the search's `pruned_model/` or a plain transformers checkpoint.

    model = AutoModel.from_pretrained("run/pruned_model", torch_dtype=torch.bfloat16).cuda()
    converted = to_semi_structured(model)     # names of the Linear layers now 2:4 sparse

Inference only: the converted weights do not train.  `benchmarks/inference.py --device cuda
--two_four` (run by scripts/gpu_check.sh) times it against the dense model.
"""
from __future__ import annotations

import torch
from torch import nn

from tamt_ds.errors import InputError


class SemiStructuredError(InputError):
    pass


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive entries of each row (a row's length a multiple of 4)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def backend() -> type:
    """The subclass torch's to_sparse_semi_structured would pick: cuSPARSELt where torch has it, else CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT, \
        SparseSemiStructuredTensorCUTLASS

    use_cutlass = SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available()
    return SparseSemiStructuredTensorCUTLASS if use_cutlass else SparseSemiStructuredTensorCUSPARSELT


def fits(weight: torch.Tensor, cls: type) -> bool:
    """The backend's shape rule: both dimensions multiples of its minimum sparse block for the dtype."""
    rule = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if rule is None:
        return False
    rows, cols = weight.shape
    return rows % rule.sparse_min_rows == 0 and cols % rule.sparse_min_cols == 0 and rows > 0 and cols > 0


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise SemiStructuredError(f"2:4 semi-structured weights run on CUDA GPUs (compute capability >= 8.0), "
                                  f"the model is on {device}: move it with model.cuda() first")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise SemiStructuredError(f"2:4 semi-structured weights need compute capability >= 8.0 (Ampere or newer), "
                                  f"{torch.cuda.get_device_name(device)} has {major}.{minor}: keep the dense model there")


def to_semi_structured(model: nn.Module, cls: type | None = None) -> list[str]:
    """Replace every 2:4 Linear weight that fits the backend by its semi-structured sparse form, in
    place; returns the converted layers' names.  One-line error where the device cannot run them."""
    first = next(model.parameters(), None)
    if first is None:
        return []
    check_device(first.device)
    cls = cls or backend()
    two_four = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_two_four(m.weight)]
    if not two_four:
        raise SemiStructuredError("no Linear weight of the model is 2:4 (2 non-zeros in every 4 along the input): "
                                  "export a --sparsity_pattern 2:4 search's pruned_model/ and load that")
    converted = []
    for name, module in two_four:
        if fits(module.weight, cls):
            module.weight = nn.Parameter(cls.from_dense(module.weight.detach().contiguous()), requires_grad=False)
            converted.append(name)
    if not converted:
        dtype = two_four[0][1].weight.dtype
        raise SemiStructuredError(f"no 2:4 weight fits {cls.__name__} in {dtype} (dtypes "
                                  f"{sorted(str(d) for d in cls._DTYPE_SHAPE_CONSTRAINTS)}, shapes multiples of its "
                                  f"block): load the model with torch_dtype=torch.bfloat16 or float16")
    return converted
