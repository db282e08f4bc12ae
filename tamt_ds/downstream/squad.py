"""SQuAD post-processing (window logits -> answer text) and the official EM / F1.

API
---
postprocess_predictions(examples, features, start_logits, end_logits, *, n_best=20,
                        max_answer_length=30, version_2=False, null_threshold=0.0)
    -> {question id: answer text}
    examples: the eval split from tasks.load_task (id, context, ...); features: the
    eval features from tasks.tokenize_split(train=False) (example_id,
    offset_mapping); start/end_logits: one row per feature, either an (F, L) array
    or a list of 1-D arrays (rows may be padded past the feature's length).
    As in BERT's run_squad: per window, the n_best best starts x n_best best ends,
    kept when both lie in the context, end >= start and the span is at most
    max_answer_length tokens; the best start+end logit sum over all windows wins.
    v2: null score = the smallest start+end logit at [CLS] (index 0) over the
    windows; predict "" when null score - best span score > null_threshold.
squad_metrics(predictions, examples, version_2) -> dict[str, float]
    The official evaluation scripts (v1.1 / v2.0), in points: exact_match, f1;
    v2 adds HasAns_exact_match, HasAns_f1, HasAns_total, NoAns_exact_match,
    NoAns_f1, NoAns_total (a part is left out when it has no questions).
normalize_answer(s) -> str
    Lowercase, drop punctuation, drop articles a/an/the, squeeze whitespace.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tamt_ds.downstream.tasks import TaskError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _columns(rows: Any, *names: str) -> list[list]:
    """Columns of a datasets.Dataset or of a list of dicts."""
    if hasattr(rows, "column_names"):
        return [list(rows[n]) for n in names]
    rows = list(rows)
    return [[r[n] for r in rows] for n in names]


def postprocess_predictions(
    examples: Any,
    features: Any,
    start_logits: np.ndarray | Sequence[np.ndarray],
    end_logits: np.ndarray | Sequence[np.ndarray],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    ex_ids, contexts = _columns(examples, "id", "context")
    feat_ex_ids, offsets = _columns(features, "example_id", "offset_mapping")
    if not len(start_logits) == len(end_logits) == len(feat_ex_ids):
        raise TaskError(f"{len(start_logits)} start / {len(end_logits)} end logit rows for "
                        f"{len(feat_ex_ids)} features; pass one row per feature, in feature order")
    by_example: dict[str, list[int]] = defaultdict(list)
    for f, eid in enumerate(feat_ex_ids):
        by_example[eid].append(f)

    predictions: dict[str, str] = {}
    for eid, context in zip(ex_ids, contexts):
        best_score, best_span = -np.inf, None
        null_score = np.inf
        if not by_example[eid]:
            raise TaskError(f"example {eid!r} has no features; tokenize the same eval split you post-process")
        for f in by_example[eid]:
            offs = offsets[f]
            start = np.asarray(start_logits[f], dtype=np.float64)[: len(offs)]
            end = np.asarray(end_logits[f], dtype=np.float64)[: len(offs)]
            null_score = min(null_score, start[0] + end[0])  # [CLS] is token 0 (right padding)
            for s in np.argsort(start)[::-1][:n_best]:
                if offs[s] is None:
                    continue
                for e in np.argsort(end)[::-1][:n_best]:
                    if offs[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    if start[s] + end[e] > best_score:
                        best_score, best_span = start[s] + end[e], (offs[s][0], offs[e][1])
        text = context[best_span[0]:best_span[1]] if best_span else ""
        if version_2 and (best_span is None or null_score - best_score > null_threshold):
            text = ""
        predictions[eid] = text
    return predictions


# ------------------------------------------------------------ official scoring


def _exact(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def _f1(gold: str, pred: str, *, version_2: bool) -> float:
    gold_toks, pred_toks = normalize_answer(gold).split(), normalize_answer(pred).split()
    if version_2 and (not gold_toks or not pred_toks):
        # v2.0 script: an empty answer scores 1 only against an empty answer.
        return float(gold_toks == pred_toks)
    num_same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], examples: Any, version_2: bool) -> dict[str, float]:
    ids, answers = _columns(examples, "id", "answers")
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise TaskError(f"{len(missing)} question(s) without a prediction (e.g. {missing[0]!r}); "
                        f"predict every question of the eval split")
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_answer: dict[str, bool] = {}
    for qid, ans in zip(ids, answers):
        golds = list(ans["text"])
        if version_2:
            # v2.0 script: answers that normalise to nothing don't count; none left
            # means the question is unanswerable and the gold answer is "".
            golds = [g for g in golds if normalize_answer(g)] or [""]
        elif not golds:
            raise TaskError(f"question {qid!r} has no gold answer; score SQuAD 2.0 data with version_2=True")
        has_answer[qid] = golds != [""]
        pred = predictions[qid]
        exact[qid] = max(_exact(g, pred) for g in golds)
        f1[qid] = max(_f1(g, pred, version_2=version_2) for g in golds)

    def part(qids: Iterable[str]) -> tuple[float, float, int]:
        qids = list(qids)
        return (100 * sum(exact[q] for q in qids) / len(qids), 100 * sum(f1[q] for q in qids) / len(qids), len(qids))

    em_all, f1_all, _ = part(ids)
    out = {"exact_match": em_all, "f1": f1_all}
    if version_2:
        for name, want in (("HasAns", True), ("NoAns", False)):
            qids = [q for q in ids if has_answer[q] == want]
            if qids:
                em, f, n = part(qids)
                out.update({f"{name}_exact_match": em, f"{name}_f1": f, f"{name}_total": float(n)})
    return out
