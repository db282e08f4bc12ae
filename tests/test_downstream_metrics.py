"""Metrics against scikit-learn / SciPy on fixed predictions, and their naming per split."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tamt_ds.downstream.metrics import compute_metrics, main_score, split_metrics
from tamt_ds.downstream.tasks import TaskError, TaskSpec

RNG = np.random.default_rng(1234)
REFS2 = RNG.integers(0, 2, size=200)
PREDS2 = np.where(RNG.random(200) < 0.75, REFS2, 1 - REFS2)  # ~75% right, not symmetric


def spec(name, kind="classification", num_labels=2, main="accuracy", splits=("validation",)):
    labels = tuple(str(i) for i in range(num_labels)) if kind == "classification" else None
    return TaskSpec(name=name, kind=kind, num_labels=num_labels, label_list=labels, text_columns=("sentence",),
                    main_metric=main, eval_splits=splits)


def test_cola_matthews():
    m = compute_metrics(spec("cola", main="mcc"), PREDS2, REFS2)
    assert m == {"mcc": pytest.approx(100 * matthews_corrcoef(REFS2, PREDS2))}
    assert 20 < m["mcc"] < 80  # a real correlation, not a degenerate 0 or 100


def test_stsb_pearson_spearman():
    refs = RNG.uniform(0, 5, size=150)
    preds = refs + RNG.normal(0, 1.0, size=150) ** 3  # monotone-ish with outliers: pearson != spearman
    m = compute_metrics(spec("stsb", "regression", 1, "pearson"), preds.reshape(-1, 1), refs)
    assert m["pearson"] == pytest.approx(100 * pearsonr(preds, refs)[0])
    assert m["spearman"] == pytest.approx(100 * spearmanr(preds, refs)[0])
    assert abs(m["pearson"] - m["spearman"]) > 0.5


@pytest.mark.parametrize("name", ["mrpc", "qqp"])
def test_accuracy_and_f1(name):
    m = compute_metrics(spec(name), PREDS2, REFS2)
    assert m == {"accuracy": pytest.approx(100 * accuracy_score(REFS2, PREDS2)),
                 "f1": pytest.approx(100 * f1_score(REFS2, PREDS2))}
    assert m["accuracy"] != pytest.approx(m["f1"])


def test_logits_are_argmaxed():
    logits = RNG.normal(size=(200, 3))
    refs = RNG.integers(0, 3, size=200)
    m = compute_metrics(spec("rte", num_labels=3), logits, refs)
    assert m == {"accuracy": pytest.approx(100 * accuracy_score(refs, logits.argmax(-1)))}


def test_mnli_matched_and_mismatched_are_reported_apart():
    s = spec("mnli", num_labels=3, main="matched_accuracy", splits=("validation_matched", "validation_mismatched"))
    refs = RNG.integers(0, 3, size=90)
    good = refs.copy()
    bad = (refs + 1) % 3
    bad[:30] = refs[:30]
    metrics = {**split_metrics(s, "validation_matched", good, refs),
               **split_metrics(s, "validation_mismatched", bad, refs)}
    assert metrics == {"matched_accuracy": pytest.approx(100.0), "mismatched_accuracy": pytest.approx(100 / 3)}
    assert main_score(s, metrics) == pytest.approx(100.0)
    assert "f1" not in compute_metrics(s, good, refs) and "macro_f1" not in compute_metrics(s, good, refs)


def test_local_multiclass_adds_macro_f1_binary_does_not():
    refs = RNG.integers(0, 5, size=300)
    preds = np.where(RNG.random(300) < 0.6, refs, RNG.integers(0, 5, size=300))
    m = compute_metrics(spec("local:/x", num_labels=5), preds, refs)
    assert m == {"accuracy": pytest.approx(100 * accuracy_score(refs, preds)),
                 "macro_f1": pytest.approx(100 * f1_score(refs, preds, average="macro"))}
    assert set(compute_metrics(spec("local:/y"), PREDS2, REFS2)) == {"accuracy"}


def test_local_regression_and_test_split_names():
    refs = RNG.normal(size=50)
    preds = refs + RNG.normal(scale=0.5, size=50)
    s = spec("local:/r", "regression", 1, "pearson", ("validation", "test"))
    m = split_metrics(s, "test", preds, refs)
    assert m == {"test_pearson": pytest.approx(100 * pearsonr(preds, refs)[0]),
                 "test_spearman": pytest.approx(100 * spearmanr(preds, refs)[0])}


def test_constant_predictions_score_zero_correlation():
    refs = RNG.normal(size=20)
    m = compute_metrics(spec("stsb", "regression", 1, "pearson"), np.full(20, 2.5), refs)
    assert m == {"pearson": 0.0, "spearman": 0.0}


def test_squad_spec_and_missing_main_metric_are_errors():
    squad = TaskSpec(name="squad", kind="squad", num_labels=2, label_list=None, text_columns=("question", "context"),
                     main_metric="f1", eval_splits=("validation",))
    with pytest.raises(TaskError, match="squad_metrics"):
        compute_metrics(squad, [0], [0])
    with pytest.raises(TaskError, match="matched_accuracy"):
        main_score(spec("mnli", main="matched_accuracy"), {"accuracy": 1.0})
    with pytest.raises(TaskError, match="3 predictions for 2"):
        compute_metrics(spec("sst2"), [0, 1, 1], [0, 1])
