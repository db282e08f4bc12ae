"""Search outputs that plain `transformers` and other tools read: mask.pt and pruned_model/.

Kept weights are copied from the original checkpoint in its stored dtype (not read
back from the engine, which holds frozen weights only in the training dtype), so
they are bit-identical to the pre-trained ones; pruned entries are exactly 0.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from tamt_ds import sharding
from tamt_ds.maskfile import save_mask_file
from tamt_ds.models import RANDOM_WEIGHTS_KEY, export_name, load_original_backbone


def replace_dir(tmp: str, final: str) -> None:
    """Swap a finished directory into place; the old one is removed only after."""
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def save_pruned_model(masks_by_key: dict[str, torch.Tensor], source: str, tokenizer, out_dir: str) -> None:
    model = load_original_backbone(source)
    state = model.state_dict()
    for key, keep in masks_by_key.items():
        w = state[key]
        w.copy_(torch.where(keep, w, torch.zeros((), dtype=w.dtype)))
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".tmp-pruned-")
    model.save_pretrained(tmp)  # config.json keeps the source's `tamt_random_weights` entry, if any
    tokenizer.save_pretrained(tmp)
    random_weights = getattr(model.config, RANDOM_WEIGHTS_KEY, None)
    if random_weights:
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"# RANDOM WEIGHTS\n\nA TAMT mask over {random_weights['source']} (seed {random_weights['seed']}): "
                    f"{random_weights['note']}.\n")
    replace_dir(tmp, out_dir)


def export_search_outputs(output_dir: str, model, masks, source: str, tokenizer) -> None:
    full = masks.full_masks()  # collective: every rank takes part
    if sharding.rank() == 0:
        save_mask_file(full, model, os.path.join(output_dir, "mask.pt"))
        by_key = {export_name(model, name): keep for name, keep in full.items()}
        save_pruned_model(by_key, source, tokenizer, os.path.join(output_dir, "pruned_model"))
    sharding.barrier()
