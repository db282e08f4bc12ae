"""Pre-training objectives for mask search: MLM, KD from the dense model, or both.

Nothing here knows about ZeRO or ranks: the teacher is the same module with its
masks bypassed (`masks_disabled`), so there is never a second copy of the model.  The
student's forward after the teacher's runs in `zero.same_step` (ZeRO-3 sees one step).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tamt_ds import zero
from tamt_ds.masking import MaskSet, masks_disabled

OBJECTIVES = ("mlm", "kd", "mlm_kd")


def kd_loss(student_hidden, teacher_hidden, attention_mask) -> torch.Tensor:
    """Mean over layers of mean over real tokens of 1 - cos(h_student, h_teacher).

    The embedding output (index 0) is excluded, and padding never counts.
    """
    real = attention_mask.bool()
    per_layer = []
    for hs, ht in zip(student_hidden[1:], teacher_hidden[1:]):
        cos = F.cosine_similarity(hs[real].float(), ht[real].float(), dim=-1)
        per_layer.append((1.0 - cos).mean())
    return torch.stack(per_layer).mean()


def kd_loss_sum(student_hidden, teacher_hidden, attention_mask) -> torch.Tensor:
    """kd_loss summed over the real tokens instead of averaged (float64, 0 without a real token).

    Summed over batches and ranks and divided by their real tokens, it is the KD loss of the
    whole held-out set, whatever its split into batches and ranks (a mean of per-batch means
    would weigh a short batch like a full one)."""
    real = attention_mask.bool()
    per_layer = [1.0 - F.cosine_similarity(hs[real].float(), ht[real].float(), dim=-1)
                 for hs, ht in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(per_layer).double().mean(0).sum()


def _backbone_kwargs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


@torch.no_grad()
def teacher_hidden_states(model, masks: MaskSet, batch):
    """Hidden states of the dense pre-trained model: masks off, eval mode (no dropout).

    The mode is read from and restored to the wrapped module: a DeepSpeed engine's train()
    and eval() set only its module's flag, so the engine's own `training` stays True and
    restoring from it would switch dropout back on for an evaluation's student forward."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        with masks_disabled(masks):
            out = model(**_backbone_kwargs(batch), output_hidden_states=True)
    finally:
        module.train(was_training)
    return out.hidden_states


def compute_loss(objective: str, model, masks: MaskSet, batch) -> dict[str, torch.Tensor]:
    """{'loss': total, and each term}.  For mlm the batch carries corrupted input_ids and labels."""
    need_kd = objective in ("kd", "mlm_kd")
    need_mlm = objective in ("mlm", "mlm_kd")
    teacher = teacher_hidden_states(model, masks, batch) if need_kd else None
    kwargs = _backbone_kwargs(batch)
    if need_mlm:
        kwargs["labels"] = batch["labels"]
    with zero.same_step(model) if need_kd else contextlib.nullcontext():
        out = model(**kwargs, output_hidden_states=need_kd)
    terms = {}
    if need_mlm:
        terms["mlm_loss"] = out.loss
    if need_kd:
        terms["kd_loss"] = kd_loss(out.hidden_states, teacher, batch["attention_mask"])
    terms["loss"] = sum(terms.values())
    return terms


@torch.no_grad()
def mlm_accuracy(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed MLM loss, correct predictions, predicted tokens) on one batch."""
    out = model(**_backbone_kwargs(batch))
    labels = batch["labels"]
    picked = labels != -100
    logits = out.logits[picked].float()
    loss = F.cross_entropy(logits, labels[picked], reduction="sum")
    correct = (logits.argmax(-1) == labels[picked]).sum()
    return loss, correct, picked.sum()
