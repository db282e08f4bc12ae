"""Search outputs that plain `transformers` and other tools read: mask.pt and pruned_model/.

Kept weights are copied from the original checkpoint in its stored dtype (not read
back from the engine, which holds frozen weights only in the training dtype), so
they are bit-identical to the pre-trained ones; pruned entries are exactly 0.  They are
streamed tensor by tensor, read from the checkpoint and written into model.safetensors in
the layout `save_pretrained` gives it, so the export holds one tensor at a time, not the
model: it runs at the end of a long search, beside the engine's whole state.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from tamt_ds import sharding
from tamt_ds.maskfile import save_mask_file
from tamt_ds.models import RANDOM_WEIGHTS_KEY, export_name, load_original_backbone, original_backbone_layout
from tamt_ds.search_cost import write_cost


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


# safetensors' names, and its order: larger dtypes first, then by name (as safetensors' own writer does)
_SAFETENSORS_NAMES = {torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
                      torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
_SAFETENSORS_ORDER = list(_SAFETENSORS_NAMES)


def write_safetensors(path: str, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], tensor_of) -> None:
    """A safetensors file written one tensor at a time: the header from the layout
    {key: (dtype, shape)}, then `tensor_of(key)` for each key, each freed once written."""
    keys = sorted(layout, key=lambda k: (_SAFETENSORS_ORDER.index(layout[k][0]), k))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in keys:
        dtype, shape = layout[k]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[k] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in keys:
            t = tensor_of(k)
            assert (t.dtype, tuple(t.shape)) == layout[k], k
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


@torch.no_grad()
def save_pruned_weights(masks_by_key: dict[str, torch.Tensor], source: str, out_dir: str) -> dict:
    """model.safetensors + config.json of the pruned backbone into out_dir; its config (a dict).

    Streamed where the checkpoint holds the backbone's tensors as from_pretrained would load
    them; otherwise (legacy names, missing or cast tensors) the backbone is loaded whole."""
    found = original_backbone_layout(source)
    if found is None:
        model = load_original_backbone(source)
        state = model.state_dict()
        for key, keep in masks_by_key.items():
            w = state[key]
            w.copy_(torch.where(keep, w, torch.zeros((), dtype=w.dtype)))
        model.save_pretrained(out_dir)
        return model.config.to_dict()
    model, sources, weights = found

    def pruned(key: str) -> torch.Tensor:
        w = weights.read(sources[key])
        keep = masks_by_key.get(key)
        return w if keep is None else w.masked_fill_(~keep, 0)

    state = model.state_dict()  # meta tensors: names, shapes and dtypes only
    if not set(masks_by_key) <= set(state):
        raise KeyError(f"masks for tensors the backbone lacks: {sorted(set(masks_by_key) - set(state))[:5]}")
    write_safetensors(os.path.join(out_dir, "model.safetensors"),
                      {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}, pruned)
    model.config.dtype = str(model.dtype).split(".")[1]  # what save_pretrained records
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    return model.config.to_dict()


def save_pruned_model(masks_by_key: dict[str, torch.Tensor], source: str, tokenizer, out_dir: str) -> None:
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=".tmp-pruned-")
    try:
        config = save_pruned_weights(masks_by_key, source, tmp)  # keeps the source's `tamt_random_weights`, if any
        tokenizer.save_pretrained(tmp)
        random_weights = config.get(RANDOM_WEIGHTS_KEY)
        if random_weights:
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(f"# RANDOM WEIGHTS\n\nA TAMT mask over {random_weights['source']} (seed {random_weights['seed']}): "
                        f"{random_weights['note']}.\n")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_search_outputs(output_dir: str, model, masks, source: str, tokenizer) -> None:
    full = masks.full_masks()  # collective: every rank takes part
    if sharding.rank() == 0:
        save_mask_file(full, model, os.path.join(output_dir, "mask.pt"))
        by_key = {export_name(model, name): keep for name, keep in full.items()}
        save_pruned_model(by_key, source, tokenizer, os.path.join(output_dir, "pruned_model"))
        if getattr(masks, "removes_structures", False):  # patterns.StructuredMaskSet
            from tamt_ds.compact import save_compact_model

            save_compact_model(by_key, source, tokenizer, os.path.join(output_dir, "compact_model"))
    sharding.barrier()


SNAPSHOTS = "snapshots"


def snapshot_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, SNAPSHOTS, str(step))


def export_mask_snapshot(output_dir: str, step: int, model, masks, cost: dict) -> None:
    """OUTPUT/snapshots/STEP/mask.pt: the mask a search stopped here would export (cut at exactly
    the target sparsity from the live scores), and its cost.json.  The live thresholds are put
    back bit for bit, and nothing else of the run (scores, optimizer, RNG, data) is touched:
    one search gives the whole search-budget curve (collective: every rank calls it)."""
    live = masks.cuts()
    masks.reset_thresholds()
    try:
        full = masks.full_masks()
    finally:
        masks.load_cuts(live)
    if sharding.rank() == 0:
        folder = snapshot_dir(output_dir, step)
        write_cost(folder, cost)
        save_mask_file(full, model, os.path.join(folder, "mask.pt"))  # last: a snapshot with mask.pt is complete
    sharding.barrier()
