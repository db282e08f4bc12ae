"""Disk size of one search checkpoint, three ways, from the same engine after one step:

    deepspeed save_checkpoint                                  (what search wrote before)
    deepspeed save_checkpoint(exclude_frozen_parameters=True)
    tamt_ds.checkpoint.save                                    (what search writes now)

The engine is the search's: the model with scores next to every masked weight (ZeRO-3,
the config's dtype), AdamW over the scores (objective kd: no head).

    torchrun --nproc_per_node 2 benchmarks/checkpoint_size.py [--model NAME] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tamt_ds import checkpoint, engine as eng, sharding  # noqa: E402
from tamt_ds.masking import attach_masks  # noqa: E402
from tamt_ds.models import DEFAULT_MODEL, load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402


def folder_bytes(path: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = os.path.getsize(full)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--out", default="/tmp/tamt_checkpoint_size")
    args = parser.parse_args()
    eng.init_distributed()
    sharding.quiet_deprecations()
    torch.manual_seed(0)
    cfg = eng.load_ds_config(args.deepspeed, micro_batch=4, grad_accum=1, grad_clip=1.0)
    model = load_model(args.model, with_mlm_head=False, ds_config=cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = attach_masks(model, sparsity=0.7)
    masks.init_scores("magnitude")
    engine, _ = eng.build_engine(model, cfg, params=masks.scores, lr=1e-3, weight_decay=0.0, total_steps=10)
    ids = torch.randint(1000, 2000, (4, 64), generator=torch.Generator().manual_seed(sharding.rank()))
    batch = {"input_ids": ids.to(engine.device), "attention_mask": torch.ones_like(ids).to(engine.device)}
    engine.backward(compute_loss("kd", engine, masks, batch)["loss"])
    engine.step()  # the optimizer state exists from here

    if sharding.rank() == 0:
        shutil.rmtree(args.out, ignore_errors=True)
    sharding.barrier()
    engine.save_checkpoint(os.path.join(args.out, "deepspeed"), tag="step1")
    engine.save_checkpoint(os.path.join(args.out, "deepspeed_exclude_frozen"), tag="step1",
                           exclude_frozen_parameters=True)
    checkpoint.save(engine, os.path.join(args.out, "tamt"), 1, {"cuts": masks.cuts()}, data={},
                    model=checkpoint.model_fingerprint(args.model), keep=0)
    if sharding.rank() == 0:
        frozen = sum(sharding.full_numel(p) for p in model.parameters() if not p.requires_grad)
        trainable = sum(sharding.full_numel(p) for p in model.parameters() if p.requires_grad)
        print(f"model {args.model}: {frozen:,} frozen elements, {trainable:,} trainable (scores); "
              f"world size {sharding.world_size()}, {eng.precision(cfg)}")
        for name in ("deepspeed", "deepspeed_exclude_frozen", "tamt"):
            sizes = folder_bytes(os.path.join(args.out, name, "step1"))
            total = sum(sizes.values())
            detail = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items()))
            print(f"RESULT {name}: {total / 1e6:.1f} MB per checkpoint ({detail})")


if __name__ == "__main__":
    main()
