"""Runs under torchrun (2 ranks, ZeRO-3, gloo) or as one plain process (the reference).

usage: core_worker.py MODEL_DIR OUT_FILE OBJECTIVE STEPS zero3|plain
Trains masks on fixed seeded batches and saves, from rank 0: per-step losses, the
initial and final consolidated masks, thresholds, partition facts, and (ZeRO-3) whether
every masked weight and score was released between forward and backward.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tamt_ds.errors import exit_process, run_cli  # noqa: E402
from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402

MICRO, SEQ, SPARSITY, LR, RESET = 4, 16, 0.7, 5e-3, 3


def batches(step: int, vocab: int, world: int):
    """The global batch of a step: one micro-batch per rank, fixed by the step number."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, vocab, (world * MICRO, SEQ), generator=g)
    attn = torch.ones_like(ids)
    attn[:, -(step % 5):] = 0 if step % 5 else 1  # some padding, never counted by KD
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.3
    labels[pick] = ids[pick]
    return [{"input_ids": ids[r * MICRO:(r + 1) * MICRO], "attention_mask": attn[r * MICRO:(r + 1) * MICRO],
             "labels": labels[r * MICRO:(r + 1) * MICRO]} for r in range(world)]


def train(mode, objective, model, masks, params, cfg, steps: int, world: int, between=None) -> list[float]:
    """STEPS mask-training steps on the fixed batches: ZeRO-3 (one micro-batch per rank) or
    one plain process over the whole 2-rank global batch; the per-step global losses."""
    vocab = model.config.vocab_size
    losses = []
    if mode == "zero3":
        engine, _ = eng.build_engine(model, cfg, params=params, lr=LR, weight_decay=0.01, total_steps=steps)
        for step in range(steps):
            terms = compute_loss(objective, engine, masks, batches(step, vocab, world)[sharding.rank()])
            if between is not None:
                between()
            engine.backward(terms["loss"])
            engine.step()
            loss = sharding.all_reduce_(terms["loss"].detach().clone())
            losses.append(float(loss) / world)
            if (step + 1) % RESET == 0:
                masks.reset_thresholds()
    else:
        opt = eng.adamw(params, lr=LR, weight_decay=0.01)  # the engine's AdamW (fused)
        sched = eng.linear_decay(opt, steps)
        for step in range(steps):
            opt.zero_grad()
            total = 0.0
            for micro in batches(step, vocab, world):  # DeepSpeed averages rank gradients
                loss = compute_loss(objective, model, masks, micro)["loss"] / world
                loss.backward()
                total += float(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(total)
            if (step + 1) % RESET == 0:
                masks.reset_thresholds()
    return losses


def main():
    model_dir, out, objective, steps, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    world = 2  # the reference reproduces a 2-rank global batch
    torch.manual_seed(0)
    use_mlm = "mlm" in objective
    if mode == "zero3":
        eng.init_distributed()
        cfg = eng.load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3_cpu.json"),
                                 micro_batch=MICRO, grad_accum=1, grad_clip=1.0)
        # Release every gathered parameter right after its module's forward (no reuse, no
        # prefetch), so that each backward runs on parameters ZeRO-3 gathered again.
        cfg["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_max_live_parameters=0,
                                        stage3_prefetch_bucket_size=0)
        model = load_model(model_dir, with_mlm_head=use_mlm, ds_config=cfg)
    else:
        model = load_model(model_dir, with_mlm_head=use_mlm)
    masks, params = prepare_search(model, sparsity=SPARSITY)
    facts = {"partitioned": [(s.name, sharding.is_partitioned(s.score), sharding.is_partitioned(s.weight),
                              sharding.local_shard(s.score).values.numel(), s.score.ds_numel if sharding.is_partitioned(s.score) else s.score.numel())
                             for s in masks]}
    init_masks = masks.full_masks()
    released = []

    def check_released():  # between forward and backward: weights and scores back to their empty placeholders
        released.append(all(p.data.numel() == 0 for s in masks for p in (s.weight, s.score)))

    losses = train(mode, objective, model, masks, params, cfg if mode == "zero3" else None, steps, world,
                   between=check_released)
    # The distributed k-th value against torch.kthvalue on the full tensor.
    masks.reset_thresholds()
    full_scores = {}
    for s in masks:
        with sharding.gathered([s.score]):
            full_scores[s.name] = s.score.data.detach().clone().float().cpu()
    result = {"losses": losses, "released": released, "init_masks": init_masks, "final_masks": masks.full_masks(), "cuts": masks.cuts(),
              "scores": full_scores, "stats": masks.stats(update_last=False), **facts}
    if sharding.rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    exit_process(run_cli(main))  # the launchers' exit path: a clean run ends its process group
