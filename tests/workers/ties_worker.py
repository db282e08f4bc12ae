"""Runs under torchrun: 2 ranks, bf16 ZeRO-3 (persistence threshold 0), scores that tie massively.

usage: ties_worker.py MODEL_DIR OUT_FILE
Case "all": every score is bf16(0.02).  Case "bf16": scores near 0.02 as bf16 holds them
(~16 distinct values, so thousands tie at the k-th).  The scores are written on each
rank's shard from a function of the flat index, so they do not depend on the sharding.
Rank 0 saves, per case: the consolidated masks, the full scores, the cuts and the
per-matrix sparsity counted on the shards.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tamt_ds.errors import exit_process, run_cli  # noqa: E402
from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402

SPARSITY = 0.7


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    eng.init_distributed()
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3_bf16.json")) as f:
        cfg = json.load(f)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    masks, _ = prepare_search(model, sparsity=SPARSITY)
    assert all(s.score.dtype == torch.bfloat16 and sharding.is_partitioned(s.score) for s in masks)
    result = {}
    for case in ("all", "bf16"):
        with torch.no_grad():
            for s in masks:
                shard = sharding.local_shard(s.score)
                index = torch.arange(shard.offset, shard.offset + shard.values.numel())
                noise = torch.sin(index.double() * 12.9898).frac().abs().float()  # in [0, 1), from the flat index
                shard.values.copy_(torch.full_like(noise, 0.02) if case == "all" else 0.019 + 0.002 * noise)
        masks.reset_thresholds()
        scores = {}
        for s in masks:
            with sharding.gathered([s.score]):
                scores[s.name] = s.score.data.float().cpu().clone()
        stats = masks.stats(update_last=False)
        result[case] = {"masks": masks.full_masks(), "scores": scores, "cuts": masks.cuts(),
                        "sparsity": {n: v["sparsity"] for n, v in stats["per_matrix"].items()}}
    if sharding.rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    exit_process(run_cli(main))  # the launchers' exit path: a clean run ends its process group
