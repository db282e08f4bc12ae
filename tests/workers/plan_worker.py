"""Runs under torchrun: one TAMT-KD search step of MODEL_DIR under ZeRO-3 (DS_CONFIG), then
writes what this rank holds, in bytes, to OUT_DIR/rank<r>.json, measured on the live engine:
frozen weight and score partitions, the gradient partition, the optimizer's fp32 master
partition and Adam moments.

usage: plan_worker.py MODEL_DIR DS_CONFIG OUT_DIR
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402
from tests.workers.core_worker import MICRO, batches  # noqa: E402


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    model_dir, config, out = sys.argv[1:4]
    eng.init_distributed()
    cfg = eng.load_ds_config(config, micro_batch=MICRO, grad_accum=1, grad_clip=1.0)
    model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    masks, params = prepare_search(model, sparsity=0.7)
    engine, _ = eng.build_engine(model, cfg, params=params, lr=1e-3, weight_decay=0.0, total_steps=1)
    terms = compute_loss("kd", engine, masks, batches(0, model.config.vocab_size, 2)[sharding.rank()])
    engine.backward(terms["loss"])
    engine.step()
    opt = engine.optimizer
    adam = [v for state in opt.optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    measured = {
        "frozen weights": nbytes(p.ds_tensor for p in model.parameters() if not p.requires_grad),
        "scores": nbytes(s.ds_tensor for s in masks.scores),
        "gradients": nbytes([opt.grad_partitions_flat_buffer]),
        "optimizer states": nbytes(opt.fp32_partitioned_groups_flat) + nbytes(adam),
        "adam moments": len(adam),
        "partitioned": all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()),
    }
    with open(os.path.join(out, f"rank{sharding.rank()}.json"), "w") as f:
        json.dump(measured, f)
    eng.shutdown()


if __name__ == "__main__":
    main()
