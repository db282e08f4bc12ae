"""Seed aggregation (mean, sample std) and the study table in Markdown and JSON."""

import json
import math

import pytest

from tamt_ds.downstream.study import PAPER_AVERAGE_TASKS, aggregate_seeds, study_table, write_study
from tamt_ds.downstream.tasks import TaskError


def test_aggregate_mean_and_sample_std():
    agg = aggregate_seeds([{"accuracy": 80.0, "f1": 70.0}, {"accuracy": 82.0, "f1": 71.0},
                           {"accuracy": 84.0, "f1": 75.0}])
    assert agg["accuracy"] == {"mean": 82.0, "std": pytest.approx(2.0), "values": [80.0, 82.0, 84.0]}
    # sample std (n-1): population std would be sqrt(14/3) = 2.16
    assert agg["f1"]["std"] == pytest.approx(math.sqrt(((70 - 72) ** 2 + (71 - 72) ** 2 + (75 - 72) ** 2) / 2))
    assert aggregate_seeds([{"mcc": 51.5}])["mcc"] == {"mean": 51.5, "std": 0.0, "values": [51.5]}


def test_aggregate_rejects_mismatched_or_empty_runs():
    with pytest.raises(TaskError, match="seed #1"):
        aggregate_seeds([{"accuracy": 1.0, "f1": 2.0}, {"accuracy": 1.0}])
    with pytest.raises(TaskError):
        aggregate_seeds([])


def five_task_results():
    return {
        "cola": aggregate_seeds([{"mcc": 50.0}, {"mcc": 52.0}, {"mcc": 54.0}]),
        "sst2": aggregate_seeds([{"accuracy": 91.0}, {"accuracy": 92.0}, {"accuracy": 93.0}]),
        "mnli": aggregate_seeds([{"matched_accuracy": 83.0, "mismatched_accuracy": 84.0},
                                 {"matched_accuracy": 84.0, "mismatched_accuracy": 84.5},
                                 {"matched_accuracy": 85.0, "mismatched_accuracy": 85.0}]),
        "stsb": aggregate_seeds([{"pearson": 88.0, "spearman": 87.0}, {"pearson": 88.0, "spearman": 87.5},
                                 {"pearson": 88.0, "spearman": 88.0}]),
        "squad": aggregate_seeds([{"exact_match": 80.0, "f1": 87.0}, {"exact_match": 81.0, "f1": 88.0},
                                  {"exact_match": 82.0, "f1": 89.0}]),
    }


def test_study_table_rows_and_paper_average():
    md, table = study_table(five_task_results())
    assert set(PAPER_AVERAGE_TASKS) == set(table["tasks"])
    # main metrics: cola mcc 52, sst2 acc 92, mnli matched 84, stsb pearson 88, squad f1 88
    assert table["average"]["value"] == pytest.approx((52 + 92 + 84 + 88 + 88) / 5)
    assert table["paper_average"]["value"] == pytest.approx(table["average"]["value"])
    assert table["tasks"]["mnli"]["main_metric"] == "matched_accuracy"
    assert list(table["tasks"]["squad"]["metrics"]) == ["f1", "exact_match"]  # main metric first
    assert table["tasks"]["cola"]["metrics"]["mcc"]["values"] == [50.0, 52.0, 54.0]
    assert "| cola | **mcc** | 52.00 ± 2.00 | 3 |" in md
    assert "| mnli | mismatched_accuracy | 84.50 ± 0.50 | 3 |" in md
    assert "| stsb | **pearson** | 88.00 ± 0.00 | 3 |" in md
    assert "80.80" in md  # the average, to 2 decimals
    assert md.splitlines()[0] == "| task | metric | mean ± std | seeds |"


def test_partial_table_has_no_paper_average_and_local_tasks_need_a_main_metric():
    results = {"rte": aggregate_seeds([{"accuracy": 60.0}, {"accuracy": 64.0}]),
               "local:wic": aggregate_seeds([{"accuracy": 55.0}, {"accuracy": 57.0}])}
    with pytest.raises(TaskError, match="local:wic"):
        study_table(results)
    md, table = study_table(results, main_metrics={"local:wic": "accuracy"})
    assert "paper_average" not in table and "Paper average" not in md
    assert table["average"] == {"value": pytest.approx(59.0), "tasks": ["rte", "local:wic"]}
    with pytest.raises(TaskError, match="pearson"):
        study_table(results, main_metrics={"local:wic": "pearson"})


def test_write_study_is_atomic_and_round_trips(tmp_path):
    results = five_task_results()
    results["cola"]["mcc"]["std"] = float("nan")  # not JSON: becomes null
    md, table = study_table(results)
    md_path, json_path = write_study(tmp_path / "out" / "study", md, table)
    assert md_path.read_text() == md
    loaded = json.loads(json_path.read_text())
    assert loaded["tasks"]["cola"]["metrics"]["mcc"]["std"] is None
    assert loaded["average"]["value"] == pytest.approx(table["average"]["value"])
    assert sorted(p.name for p in md_path.parent.iterdir()) == ["study.json", "study.md"]  # no temp files left
    # rewriting replaces the whole file
    write_study(tmp_path / "out" / "study", "x\n", {"tasks": {}})
    assert md_path.read_text() == "x\n" and json.loads(json_path.read_text()) == {"tasks": {}}
