"""The sparsity audit after fine-tuning: zeros counted in the trained weights themselves."""
from __future__ import annotations

import torch
from torch import nn

from tamt_ds import sharding, zero
from tamt_ds.downstream.fixed_mask import FixedMask, tamt_matrices


def _local_fp32_master(weight: torch.Tensor, n: int) -> torch.Tensor | None:
    """This rank's slice of the optimizer's fp32 copy of a ZeRO-3 weight (None elsewhere)."""
    master = zero.local_fp32_master(weight)
    return None if master is None else master[:n]


@torch.no_grad()
def measure_sparsity(model: nn.Module, mask: FixedMask | None) -> dict:
    """Exact zeros of the masked matrices, counted in the trained weights (each rank its own
    shard, summed); and pruned entries that are not zero, in the weights and in the fp32
    master copy (0 when the mask held)."""
    if mask is not None:
        matrices = [(m.name, m.weight, m.keep) for m in mask]
    else:
        matrices = [(n, m.weight, None) for n, m in tamt_matrices(model)]
    counts = torch.zeros(len(matrices), 3, dtype=torch.int64)  # zeros, pruned nonzero (weight), (fp32 master)
    for i, (_, weight, keep) in enumerate(matrices):
        shard = sharding.local_shard(weight)
        counts[i, 0] = int((shard.values == 0).sum())
        if keep is not None:
            pruned = ~keep
            counts[i, 1] = int((shard.values[pruned] != 0).sum())
            master = _local_fp32_master(weight, shard.values.numel())
            if master is not None:  # (on the CPU with an offloaded optimizer)
                counts[i, 2] = int((master[pruned.to(master.device)] != 0).sum())
    sharding.all_reduce_(counts, enabled=sharding.shards_are_disjoint([w for _, w, _ in matrices]))
    numel = [sharding.full_numel(w) for _, w, _ in matrices]
    return {
        "measured": float(counts[:, 0].sum()) / sum(numel),
        "pruned_nonzero": int(counts[:, 1].sum()),
        "pruned_nonzero_fp32_master": int(counts[:, 2].sum()),
        "matrices": len(matrices),
        "numel": sum(numel),
        "per_matrix": {name: float(counts[i, 0]) / numel[i] for i, (name, _, _) in enumerate(matrices)},
    }
