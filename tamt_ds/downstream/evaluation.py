"""Evaluation on full dev splits under ZeRO-3: every rank runs the same number of
forwards on its block of features; rank 0 computes the metrics once and shares them."""
from __future__ import annotations

import math

import numpy as np
import torch

from tamt_ds import sharding
from tamt_ds.downstream.data import MODEL_INPUTS, TaskData
from tamt_ds.downstream.metrics import split_metrics
from tamt_ds.downstream.squad import postprocess_predictions, squad_metrics
from tamt_ds.engine import to_device


def gather_to_rank0(rows: list) -> list | None:
    """Every rank's rows, concatenated in rank order on rank 0 (None elsewhere)."""
    parts = sharding.gather_objects(rows, dst=0)
    return [r for part in parts for r in part] if parts is not None else None


@torch.no_grad()
def predict(engine, features, collate, batch_size: int, squad: bool) -> list | None:
    """Model outputs for every feature, in order, on rank 0.

    Rank r takes the contiguous block r of the features, padded to the same length on
    every rank (with copies of feature 0): under ZeRO-3 each forward gathers parameters
    collectively, so all ranks must run the same number of forward passes.  Within its
    block a rank runs the features shortest first (less padding per batch) and puts the
    outputs back in feature order.
    """
    n, world, rank = len(features), sharding.world_size(), sharding.rank()
    per = math.ceil(n / world)
    mine = range(rank * per, min(n, (rank + 1) * per))
    lengths = [len(ids) for ids in features.select(mine)["input_ids"]]
    order = sorted(range(len(mine)), key=lengths.__getitem__)
    index = [mine[i] for i in order] + [0] * (per - len(mine))
    inputs = features.select_columns([c for c in MODEL_INPUTS if c in features.column_names]).select(index)
    rows = []
    engine.eval()
    for start in range(0, per, batch_size):
        batch = collate([inputs[i] for i in range(start, min(per, start + batch_size))])
        out = engine(**to_device(batch, engine.device))
        if squad:
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            rows += [(s, e) for s, e in zip(starts, ends)]
        else:
            rows += list(out.logits.float().cpu().numpy())
    engine.train()
    in_feature_order = [None] * len(mine)
    for row, i in zip(rows, order):  # the padding rows (beyond len(mine)) drop out here
        in_feature_order[i] = row
    return gather_to_rank0(in_feature_order)


def evaluate(engine, data: TaskData, collate, batch_size: int) -> dict[str, float]:
    """Metrics of every eval split on the full split, computed once (rank 0) and shared."""
    spec = data.spec
    metrics: dict[str, float] = {}
    for split, (examples, features) in data.evals.items():
        rows = predict(engine, features, collate, batch_size, spec.kind == "squad")
        if rows is None:
            continue  # not rank 0
        if spec.kind == "squad":
            answers = postprocess_predictions(examples, features, [s for s, _ in rows], [e for _, e in rows],
                                              version_2=spec.version_2)
            metrics.update(squad_metrics(answers, examples, version_2=spec.version_2))
        else:
            metrics.update(split_metrics(spec, split, np.stack(rows), examples["label"]))
    return sharding.broadcast_object(metrics)

