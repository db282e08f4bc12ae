"""Classification / regression metrics of the downstream tasks, in points (0-100).

API
---
compute_metrics(spec, predictions, references) -> dict[str, float]
    predictions: class ids (N,), class logits (N, C) (argmax is taken) or
    regression outputs (N,) / (N, 1); references: the split's "label" column.
      cola                 mcc
      stsb, local regr.    pearson, spearman
      mrpc, qqp            accuracy, f1 (positive class = equivalent / duplicate)
      local, >2 classes    accuracy, macro_f1
      everything else      accuracy
    Every value is x100 (like the paper's tables and the official SQuAD script),
    so task averages mix like with like. SQuAD is scored by squad.squad_metrics.
split_metrics(spec, split, predictions, references) -> dict[str, float]
    compute_metrics with keys named for the split (tasks.metric_key): MNLI gives
    matched_accuracy and mismatched_accuracy, never one overwriting the other.
main_score(spec, metrics) -> float
    metrics[spec.main_metric], with a clear error when it is missing.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tamt_ds.downstream.tasks import LOCAL_PREFIX, TaskError, TaskSpec, metric_key

_ACC_F1 = {"mrpc", "qqp"}


def _as_ids(predictions) -> np.ndarray:
    p = np.asarray(predictions)
    return p.argmax(axis=-1) if p.ndim == 2 else p.astype(np.int64)


def _corr(fn, x: np.ndarray, y: np.ndarray) -> float:
    # A constant prediction (common early in fine-tuning) has no defined
    # correlation; 0 keeps "best dev score so far" comparisons well-defined.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = float(fn(x, y)[0])
    return 0.0 if np.isnan(r) else r


def compute_metrics(spec: TaskSpec, predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
                    ) -> dict[str, float]:
    if spec.kind == "squad":
        raise TaskError("SQuAD is scored with squad.postprocess_predictions + squad.squad_metrics")
    refs = np.asarray(references)
    if spec.kind == "regression":
        preds = np.asarray(predictions, dtype=np.float64).reshape(len(refs), -1)[:, 0]
        refs = refs.astype(np.float64)
        return {"pearson": 100 * _corr(pearsonr, preds, refs), "spearman": 100 * _corr(spearmanr, preds, refs)}
    preds = _as_ids(predictions)
    if len(preds) != len(refs):
        raise TaskError(f"{len(preds)} predictions for {len(refs)} references")
    if spec.name == "cola":
        return {"mcc": 100 * float(matthews_corrcoef(refs, preds))}
    out = {"accuracy": 100 * float(accuracy_score(refs, preds))}
    if spec.name in _ACC_F1:
        out["f1"] = 100 * float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0))
    elif spec.name.startswith(LOCAL_PREFIX) and spec.num_labels > 2:  # local multi-class tasks, e.g. 15 unbalanced supersenses
        # Averaged over the classes seen in references or predictions (sklearn's
        # default): a class absent from a small dev set must not count as F1 = 0.
        out["macro_f1"] = 100 * float(f1_score(refs, preds, average="macro", zero_division=0))
    return out


def split_metrics(spec: TaskSpec, split: str, predictions, references) -> dict[str, float]:
    return {metric_key(split, k): v for k, v in compute_metrics(spec, predictions, references).items()}


def main_score(spec: TaskSpec, metrics: dict[str, float]) -> float:
    if spec.main_metric not in metrics:
        raise TaskError(f"{spec.name}: main metric {spec.main_metric!r} not in {sorted(metrics)}; "
                        f"evaluate split {spec.eval_splits[0]!r}")
    return metrics[spec.main_metric]
