"""`mask.pt`: the contract between search, fine-tuning and anyone else.

A dict {state-dict key of the weight in the saved backbone: bool tensor of the full
shape, True = kept}.  Masks in the TAMT authors' layout (keys with a `bert.` /
`roberta.` prefix, `...weight` or `...weight_mask`, float 0/1 values) load too.
"""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from tamt_ds import sharding
from tamt_ds.masking import MaskError, MaskSet
from tamt_ds.models import export_name


def atomic_torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: torch's zip writer refuses some temp names
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _canonical(key: str) -> str:
    if key.endswith("_mask"):
        key = key[: -len("_mask")]
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_mask_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise MaskError(f"mask file {path!r} not found: pass --mask_init magnitude, random, or the path of a mask.pt")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MaskError(f"cannot read mask file {path!r} ({type(e).__name__}): it must be a torch.save'd "
                        f"dict of tensors such as a search's mask.pt") from e
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise MaskError(f"mask file {path!r} is not a dict of tensors: pass a search's mask.pt")
    return {_canonical(k): v for k, v in raw.items()}


def masks_for_model(raw: dict[str, torch.Tensor], model: nn.Module, masks: MaskSet, path: str) -> dict[str, torch.Tensor]:
    """Map a loaded mask file onto the model's masked modules (keyed by module name), checking fit."""
    out = {}
    for site in masks:
        key = _canonical(export_name(model, site.name))
        if key not in raw:
            raise MaskError(f"mask file {path!r} has no mask for {key} (it has {len(raw)} entries such as "
                            f"{next(iter(raw), 'none')}): it was made for another model; pass a mask from a "
                            f"search on this model")
        shape = tuple(sharding.full_shape(site.weight))
        if tuple(raw[key].shape) != shape:
            raise MaskError(f"mask file {path!r}: {key} has shape {tuple(raw[key].shape)} but the model's is "
                            f"{shape}: it was made for another model")
        out[site.name] = raw[key].bool()
    return out


def save_mask_file(full_masks: dict[str, torch.Tensor], model: nn.Module, path: str) -> None:
    atomic_torch_save({export_name(model, name): m.bool() for name, m in full_masks.items()}, path)
