"""Seed aggregation and the study table (task x metric, mean +- std, paper average).

API
---
aggregate_seeds(per_seed) -> {metric: {"mean", "std", "values"}}
    per_seed: one flat metric dict per seed (e.g. each run's best-dev metrics).
    std is the sample std (ddof=1), 0.0 for a single seed. All seeds must report
    the same metrics.
study_table(results, main_metrics=None) -> (markdown, json_obj)
    results: {task: aggregate_seeds(...)}. Each task's main metric comes from
    main_metrics, else tasks.MAIN_METRICS (local tasks: pass spec.main_metric).
    "average" is the mean over all tasks of their main metric's mean (metrics are
    in points, so this is the paper's average when the table holds its tasks);
    "paper_average" is added when every task of PAPER_AVERAGE_TASKS is present.
write_study(stem, markdown, table) -> (stem.md, stem.json)
    Written atomically (temp file in the same directory + os.replace), so a reader
    never sees half a table.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from tamt_ds.downstream.tasks import MAIN_METRICS, TaskError

# The TAMT paper's headline average (its figure of average downstream score).
PAPER_AVERAGE_TASKS: tuple[str, ...] = ("cola", "sst2", "mnli", "stsb", "squad")


def aggregate_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    if not per_seed:
        raise TaskError("aggregate_seeds needs at least one seed's metrics")
    keys = list(per_seed[0])
    for i, m in enumerate(per_seed[1:], start=1):
        if set(m) != set(keys):
            raise TaskError(f"seed #{i} reports {sorted(m)} but seed #0 reports {sorted(keys)}; "
                            f"aggregate runs of one task and one evaluation setup only")
    out = {}
    for k in keys:
        values = [float(m[k]) for m in per_seed]
        out[k] = {"mean": statistics.fmean(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "values": values}
    return out


def _fmt(stat: Mapping[str, Any]) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def study_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                main_metrics: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    if not results:
        raise TaskError("study_table needs at least one task's aggregated results")
    main_of = {**MAIN_METRICS, **(main_metrics or {})}
    tasks: dict[str, Any] = {}
    lines = ["| task | metric | mean ± std | seeds |", "| --- | --- | --- | --- |"]
    for task, agg in results.items():
        main = main_of.get(task)
        if main is None:
            raise TaskError(f"no main metric known for task {task!r}; pass main_metrics={{{task!r}: ...}}")
        if main not in agg:
            raise TaskError(f"task {task!r}: main metric {main!r} not among {sorted(agg)}")
        order = [main, *(k for k in agg if k != main)]  # main metric first
        n_seeds = len(agg[main]["values"])
        tasks[task] = {"main_metric": main, "n_seeds": n_seeds, "metrics": {k: dict(agg[k]) for k in order}}
        for k in order:
            name = f"**{k}**" if k == main else k
            lines.append(f"| {task} | {name} | {_fmt(agg[k])} | {len(agg[k]['values'])} |")

    def average(names: Sequence[str]) -> dict[str, Any]:
        return {"value": statistics.fmean(tasks[t]["metrics"][tasks[t]["main_metric"]]["mean"] for t in names),
                "tasks": list(names)}

    table: dict[str, Any] = {"tasks": tasks, "average": average(list(tasks))}
    lines += ["", f"Average of main metrics (**bold**) over {len(tasks)} task(s) "
                  f"({', '.join(tasks)}): {table['average']['value']:.2f}"]
    if all(t in tasks for t in PAPER_AVERAGE_TASKS):
        table["paper_average"] = average(PAPER_AVERAGE_TASKS)
        lines.append(f"Paper average ({', '.join(PAPER_AVERAGE_TASKS)}): {table['paper_average']['value']:.2f}")
    return "\n".join(lines) + "\n", table


def _json_safe(x: Any) -> Any:
    """NaN / inf are not JSON: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_study(stem: str | os.PathLike, markdown: str, table: Mapping[str, Any]) -> tuple[Path, Path]:
    stem = Path(stem)
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    _atomic_write(md, markdown)
    _atomic_write(js, json.dumps(_json_safe(table), indent=2, allow_nan=False) + "\n")
    return md, js
