"""Runs under torchrun (ZeRO-3, gloo, persistence threshold 0): after one KD backward, the
streamlined optimizer step (tamt_ds/zero.py, streamline_step) against DeepSpeed's own methods on the same
gradients, per sub-group, at each of two whole steps.

usage: zero3_step_worker.py MODEL_DIR OUT_FILE
Saves from rank 0, per config, every rank's facts: whether the overrides were installed, the
number of sub-groups, (streamlined norm, DeepSpeed's fp64 norm) per sub-group, whether the
fp32 gradients are bit-identical, and whether the scores trained.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tamt_ds import engine as eng, sharding, zero  # noqa: E402
from tamt_ds.errors import exit_process, run_cli  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402

CONFIGS = ("zero3_cpu.json", "zero3_cpu_bf16.json")


def kd_backward(engine, masks, vocab: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + sharding.rank())
    ids = torch.randint(5, vocab, (4, 16), generator=g)
    engine.backward(compute_loss("kd", engine, masks, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})["loss"])


def check(model_dir: str, config: str) -> dict:
    cfg = eng.load_ds_config(str(eng.CONFIG_DIR / config), micro_batch=4, grad_accum=1, grad_clip=1.0)
    # several sub-groups, so that each is a segment of the flat gradient buffer
    cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, sub_group_size=20_000)
    torch.manual_seed(0)
    model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    masks, params = prepare_search(model, sparsity=0.7)
    engine, _ = eng.build_engine(model, cfg, params=params, lr=5e-3, weight_decay=0.0, total_steps=10)
    engine.train()
    opt = engine.optimizer
    installed = (opt.get_grad_norm_direct.__func__ is zero._grad_norm
                 and opt._prepare_fp32_grad_for_sub_group.__func__ is zero._prepare_fp32_grad)
    before = [sharding.local_shard(s).values.clone() for s in masks.scores]
    norms, grads_equal = [], []
    for step in range(2):  # the second step's fp32 gradients go where the first one's went (the CPU's kept buffer)
        kd_backward(engine, masks, model.config.vocab_size, step)
        for i, params_i in enumerate(opt.fp16_groups):
            grads = list(opt.averaged_gradients[i])
            norms.append((float(opt.get_grad_norm_direct(grads, params_i)),
                          float(type(opt).get_grad_norm_direct(opt, grads, params_i))))
            master = opt.fp32_partitioned_groups_flat[i]
            opt._prepare_fp32_grad_for_sub_group(i)
            streamlined = master.grad.clone()
            opt.averaged_gradients[i] = grads
            type(opt)._prepare_fp32_grad_for_sub_group(opt, i)
            grads_equal.append(master.grad.dtype == streamlined.dtype and torch.equal(master.grad, streamlined))
            opt.averaged_gradients[i], master.grad = grads, None
        engine.step()
    trained = any(not torch.equal(b, sharding.local_shard(s).values) for b, s in zip(before, masks.scores))
    return {"installed": installed, "sub_groups": len(opt.fp16_groups), "norms": norms, "grads_equal": grads_equal,
            "trained": trained, "dtype": str(eng.precision(cfg))}


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    eng.init_distributed()
    facts = {config: check(model_dir, config) for config in CONFIGS}
    every_rank = sharding.gather_objects(facts)
    if sharding.rank() == 0:
        torch.save(every_rank, out)


if __name__ == "__main__":
    exit_process(run_cli(main))
