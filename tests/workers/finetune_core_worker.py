"""Runs under torchrun (2 ranks, ZeRO-3, gloo) or as one plain process (the reference).

usage: finetune_core_worker.py MODEL_DIR OUT_FILE zero3|plain
Fine-tunes a classifier under a fixed OMP mask on fixed seeded batches, with gradient
accumulation (2 micro-batches per rank per step) and a clipping norm small enough to
act every step.  zero3: the harness's mechanism (dense forward, FixedMask masks each
rank's gradient partition before engine.step).  plain: the reference, the mask inside
the forward (W_eff = W * m via torch parametrize, so dL/dW = dL/dW_eff * m by autograd),
one process summing the same global batch.  Rank 0 saves per-step losses and gradient
norms and the final weights of the masked matrices.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from tamt_ds.errors import exit_process, run_cli  # noqa: E402
from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.downstream.arguments import MaskSpec  # noqa: E402
from tamt_ds.downstream.finetune import param_groups  # noqa: E402
from tamt_ds.downstream.fixed_mask import FixedMask  # noqa: E402
from tamt_ds.downstream.saving import full_weight  # noqa: E402
from tamt_ds.models import load_task_model  # noqa: E402

MICRO, SEQ, ACCUM, WORLD, STEPS, CLIP, LR, DECAY = 4, 12, 2, 2, 4, 0.05, 1e-3, 0.1


class TimesMask(torch.nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, w):
        return w * self.keep


def micro_batches(step: int):
    """The global batch of one step: ACCUM micro-batches of WORLD * MICRO examples."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(ACCUM):
        ids = torch.randint(1000, 3000, (WORLD * MICRO, SEQ), generator=g)
        out.append({"input_ids": ids, "labels": torch.randint(0, 3, (WORLD * MICRO,), generator=g)})
    return out


def rank_slice(batch: dict, r: int) -> dict:
    return {k: v[r * MICRO:(r + 1) * MICRO] for k, v in batch.items()}


def main():
    model_dir, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = None
    if mode == "zero3":
        eng.init_distributed()
        cfg = eng.load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3_cpu.json"),
                                 micro_batch=MICRO, grad_accum=ACCUM, grad_clip=CLIP)
    torch.manual_seed(0)  # the new head: the same on every rank and in the reference
    model = load_task_model(model_dir, head="classification", ds_config=cfg, num_labels=3)
    fixed = FixedMask.build(model, MaskSpec("omp", 0.5), None)
    losses, norms = [], []
    if mode == "zero3":
        engine, _ = eng.build_engine(model, cfg, params=param_groups(model, DECAY), lr=LR, weight_decay=DECAY,
                                     total_steps=STEPS)
        for step in range(STEPS):
            total = torch.zeros(())
            for batch in micro_batches(step):
                loss = engine(**rank_slice(batch, sharding.rank())).loss
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    fixed.mask_gradients()
                engine.step()
                total += loss.detach()
            sharding.all_reduce_(total)
            losses.append(float(total) / (WORLD * ACCUM))
            norms.append(float(engine.get_global_grad_norm()))
    else:
        for m in fixed:
            parametrize.register_parametrization(model.get_submodule(m.name), "weight",
                                                 TimesMask(m.keep.view_as(m.weight)))
        groups = param_groups(model, DECAY)
        params = [p for g in groups for p in g["params"]]
        opt = eng.adamw(groups, lr=LR, weight_decay=DECAY)  # the engine's AdamW (fused)
        sched = eng.linear_decay(opt, STEPS)
        for step in range(STEPS):
            total = 0.0
            for batch in micro_batches(step):
                for r in range(WORLD):  # DeepSpeed averages over ranks and micro-batches
                    loss = model(**rank_slice(batch, r)).loss
                    (loss / (WORLD * ACCUM)).backward()
                    total += float(loss)
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(total / (WORLD * ACCUM))
    weights = {}
    for m in fixed:
        if mode == "zero3":
            weights[m.name] = full_weight(m.weight)
        else:
            weights[m.name] = model.get_submodule(m.name).weight.detach().clone()  # W * m
    if sharding.rank() == 0:
        torch.save({"losses": losses, "norms": norms, "weights": weights}, out)


if __name__ == "__main__":
    exit_process(run_cli(main))  # the launchers' exit path: a clean run ends its process group
