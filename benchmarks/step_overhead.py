"""Step time of mask training against dense fine-tuning: same model, batch and engine.

Both engines live in one process and their steps alternate, so machine noise hits
both alike.  The dense step trains every weight with MLM; the masked step trains the
scores (and the MLM head) with `--objective`.  Prints per-step medians and
`ratio=<masked/dense>` last.

    python benchmarks/step_overhead.py --objective mlm     # target ratio <= 1.10
    python benchmarks/step_overhead.py --objective kd      # target ratio <= 1.45 (one extra teacher forward)
    deepspeed --num_accelerators 2 benchmarks/step_overhead.py ...   # 2 ranks
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.masking import attach_masks  # noqa: E402
from tamt_ds.models import DEFAULT_MODEL, load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402


def build(args, cfg, masked: bool):
    model = load_model(args.model, with_mlm_head=True, ds_config=cfg)
    if not masked:
        return eng.build_engine(model, cfg, params=model.parameters(), lr=1e-5, weight_decay=0.0,
                                total_steps=10**6)[0], None
    head = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
    for p in model.parameters():
        p.requires_grad_(False)
    masks = attach_masks(model, sparsity=0.7)
    masks.init_scores("magnitude")
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    params = masks.scores + [p for p in head if id(p) not in tied]
    for p in params:
        p.requires_grad_(True)
    return eng.build_engine(model, cfg, params=params, lr=1e-5, weight_decay=0.0, total_steps=10**6)[0], masks


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--objective", default="mlm", choices=["mlm", "kd", "mlm_kd"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    eng.init_distributed()
    cfg = eng.load_ds_config(args.deepspeed, micro_batch=args.batch, grad_accum=1, grad_clip=1.0)
    dense, _ = build(args, cfg, masked=False)
    masked, masks = build(args, cfg, masked=True)
    device = masked.device
    g = torch.Generator().manual_seed(sharding.rank())
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}

    def dense_step():
        loss = dense(**batch).loss
        dense.backward(loss)
        dense.step()

    def masked_step():
        loss = compute_loss(args.objective, masked, masks, batch)["loss"]
        masked.backward(loss)
        masked.step()

    times = {"dense": [], "masked": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("dense", dense_step), ("masked", masked_step)) if i % 2 else \
                (("masked", masked_step), ("dense", dense_step)):
            sharding.barrier()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            sharding.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    if sharding.rank() == 0:
        print(f"model={args.model} objective={args.objective} batch={args.batch}x{args.seq} "
              f"world={sharding.world_size()} precision={eng.precision(cfg)} device={device}")
        print(f"dense_step_s={d:.4f} masked_step_s={m:.4f}")
        print(f"ratio={m / d:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
