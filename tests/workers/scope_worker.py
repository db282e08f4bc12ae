"""Runs under torchrun (2 ranks, ZeRO-3, gloo) or as one plain process (the reference).

usage: scope_worker.py MODEL_DIR OUT_FILE STEPS zero3|plain SCOPE
core_worker's training (fixed seeded batches, KD) with a threshold scope of choice; saves,
from rank 0, the per-step losses, the final consolidated masks and the masks' statistics.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402
from tests.workers.core_worker import MICRO, SPARSITY, train  # noqa: E402


def main():
    model_dir, out, steps, mode, scope = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    world = 2  # the reference reproduces a 2-rank global batch
    torch.manual_seed(0)
    if mode == "zero3":
        eng.init_distributed()
        cfg = eng.load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3_cpu.json"),
                                 micro_batch=MICRO, grad_accum=1, grad_clip=1.0)
        model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    else:
        model = load_model(model_dir, with_mlm_head=False)
    masks, params = prepare_search(model, sparsity=SPARSITY, scope=scope)
    losses = train(mode, "kd", model, masks, params, cfg if mode == "zero3" else None, steps, world)
    masks.reset_thresholds()  # as a saved search mask: exactly the target sparsity
    result = {"losses": losses, "final_masks": masks.full_masks(), "stats": masks.stats(update_last=False)}
    if sharding.rank() == 0:
        torch.save(result, out)
    if mode == "zero3":
        eng.shutdown()


if __name__ == "__main__":
    main()
