"""Runs under torchrun (1, 2 or 3 ranks, ZeRO-3, gloo): a pattern's masks from given scores.

usage: pattern_worker.py MODEL_DIR OUT_FILE PATTERN...
For each PATTERN (a model of its own): attaches its scores to the ZeRO-3-partitioned model, writes the same seeded, coarse
(much tied) full score matrices into every rank's shards, cuts them (structured: the exact
global head / per-layer neuron cut over partitioned scores) and saves, from rank 0, the full
scores, the consolidated masks, the initial masks (magnitude init) and the masks' statistics.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402
from tamt_ds.patterns import parse_pattern, prepare_pattern_search  # noqa: E402


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    eng.init_distributed()
    cfg = eng.load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3_cpu.json"),
                             micro_batch=2, grad_accum=1, grad_clip=1.0)
    results = {text: pattern_masks(model_dir, cfg, parse_pattern(text)) for text in sys.argv[3:]}
    if sharding.rank() == 0:
        torch.save(results, out)
    eng.shutdown()


def pattern_masks(model_dir: str, cfg: dict, pattern) -> dict:
    model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    masks, _ = prepare_pattern_search(model, pattern=pattern, sparsity=0.5, init="magnitude")
    assert all(sharding.is_partitioned(s.score) for s in masks)
    initial = masks.full_masks()
    scores = {}
    with torch.no_grad():
        for i, site in enumerate(masks):
            shape = sharding.full_shape(site.score)
            full = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(i)).float() * 0.01
            shard = sharding.local_shard(site.score)
            shard.values.copy_(full.view(-1)[shard.offset:shard.offset + shard.values.numel()])
            scores[site.name] = full
    masks.reset_thresholds()
    return {"scores": scores, "masks": masks.full_masks(), "initial": initial,
            "stats": masks.stats(update_last=False), "world": sharding.world_size()}


if __name__ == "__main__":
    main()
