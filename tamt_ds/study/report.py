"""A study's results as rows, correlations, study.md and figures (also alone: --plot-only).

study.json is a list of rows, one per (method, sparsity, task, metric):
    method, sparsity, task, metric, split (dev | test), mean, std, n, values (every
    mask seed x fine-tuning seed), kd_loss, mlm_loss, mlm_accuracy (means over mask
    seeds; None where not measured), mask_seeds, measured_sparsity,
    axis (main | search_budget | train_examples), search_steps, search_tokens, search_flops,
    search_device_seconds (what finding the mask cost: means over mask seeds; 0 for OMP and random,
    None for the dense model), train_examples (N of the train-examples axis; None: the whole set).
The task "average" is the mean over tasks of the main metric, per run.  The score of a
run is its best dev evaluation (all its metrics from that evaluation, as the paper
reports; with evaluation at the end only, the final one); test_* metrics are those of
the same evaluation, where a task has a labelled test split.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

import numpy as np

from tamt_ds.study.config import BUILT_BASELINES, DENSE, STAGES, MaskCell, StudyConfig, budget_cells, data_cells, \
    mask_cells
from tamt_ds.study.runner import eval_path, finetune_results, mask_path, read_json

AVERAGE = "average"


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def search_cost(cfg: StudyConfig, cell: MaskCell) -> dict | None:
    """What the cell's mask cost to find (the cost.json its search or IMP level wrote)."""
    from tamt_ds.search_cost import read_cost

    if cell.method == DENSE:
        return None
    if cell.base in BUILT_BASELINES:  # a sort of the weights, of noise or of gradients: no training
        return {"search_steps": 0, "search_tokens": 0, "search_flops": 0.0, "search_device_seconds": 0.0}
    return read_cost(os.path.dirname(mask_path(cfg, cell)))


def collect(cfg: StudyConfig) -> list[dict]:
    """One entry per mask cell (and per train-examples subset) with whatever results exist."""
    def entry(cell, axis, tasks, n=None):
        return {"cell": cell, "axis": axis, "task_names": tasks, "train_examples": n, "cost": search_cost(cfg, cell),
                "eval": read_json(eval_path(cfg, cell)), "tasks": finetune_results(cfg, cell, n)}

    return [*(entry(cell, "main", cfg.finetune.tasks) for cell in mask_cells(cfg)),
            *(entry(cell, "search_budget", cfg.budget_tasks) for cell in budget_cells(cfg)),
            *(entry(cell, "train_examples", cfg.data_tasks, n) for cell, n in data_cells(cfg))]


COST_KEYS = ("search_steps", "search_tokens", "search_flops", "search_device_seconds")


def _mean_count(values) -> float | int:
    """The mean, as an int where it is whole (steps and tokens of one mask seed, or of equal ones)."""
    mean = statistics.fmean(values)
    return int(mean) if float(mean).is_integer() else mean


def metric_names(result: dict) -> list[tuple[str, str]]:
    """(metric, split) of a task's results: the main dev metric, and its test twin if there is one."""
    main = result["main_metric"]
    names = [(main, "dev")]
    if f"test_{main}" in result["best"]:
        names.append((f"test_{main}", "test"))
    return names


def build_rows(cfg: StudyConfig, collected: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for entry in collected:
        cell = entry["cell"]
        groups.setdefault((entry["axis"], cell.method, cell.sparsity, cell.budget, entry["train_examples"]), []).append(entry)
    rows = []
    for (axis, method, sparsity, _, n), entries in groups.items():
        evals = [e["eval"] for e in entries if e["eval"]]
        costs = [e["cost"] for e in entries if e["cost"]]
        task_names = entries[0]["task_names"]

        def mean_of(key):
            vals = [e[key] for e in evals if e.get(key) is not None]
            return statistics.fmean(vals) if vals else None

        common = {"method": method, "sparsity": sparsity, "kd_loss": mean_of("kd_loss"),
                  "mlm_loss": mean_of("mlm_loss"), "mlm_accuracy": mean_of("mlm_accuracy"),
                  "measured_sparsity": mean_of("sparsity"),
                  "mask_seeds": [e["cell"].seed for e in entries if e["cell"].seed is not None],
                  "axis": axis, "train_examples": n,
                  **{k: (_mean_count(c[k] for c in costs) if len(costs) == len(entries) else None)
                     for k in COST_KEYS}}
        per_split: dict[str, list[list[float]]] = {}  # split -> per task, the per-run main-metric values
        for task in task_names:
            results = [e["tasks"].get(task) for e in entries]
            if not all(r and r.get("complete") for r in results):
                continue  # a task is reported for a method once every mask seed has it
            for metric, split in metric_names(results[0]):
                values = [v for r in results for v in r["best"][metric]["values"]]
                rows.append({**common, "task": task, "metric": metric, "split": split, **_stat(values)})
                per_split.setdefault(split, []).append(values)
        for split, per_task in per_split.items():
            if len(per_task) == len(task_names) and len({len(v) for v in per_task}) == 1:
                runs = [statistics.fmean(vals) for vals in zip(*per_task)]
                rows.append({**common, "task": AVERAGE, "metric": f"mean of main metrics ({split})", "split": split,
                             **_stat(runs)})
    return rows


# ------------------------------------------------------------------- correlations


def spearman_with_interval(x: list[float], y: list[float], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho and a 95% percentile bootstrap interval (points resampled with replacement;
    resamples where either variable is constant have no rho and are dropped)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    out = {"n": n, "rho": None, "low": None, "high": None, "resamples_used": 0}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:  # too few points, or a constant variable: no rho
        return out
    out["rho"] = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        if np.ptp(x[idx]) == 0 or np.ptp(y[idx]) == 0:
            continue
        rhos.append(spearmanr(x[idx], y[idx]).statistic)
    rhos = [r for r in rhos if np.isfinite(r)]
    if rhos:
        out.update(low=float(np.percentile(rhos, 2.5)), high=float(np.percentile(rhos, 97.5)), resamples_used=len(rhos))
    return out


def report_metric(cfg: StudyConfig, rows: list[dict]) -> str:
    """The split the figures show: test where every task has one (and the config asks), else dev."""
    splits = {r["split"] for r in rows if r["task"] == AVERAGE}
    return "test" if cfg.finetune.report_split == "test" and "test" in splits else "dev"


def mask_points(cfg: StudyConfig, collected: list[dict], split: str) -> list[dict]:
    """One point per mask (method, sparsity, mask seed): its losses and its average score over
    tasks (mean over fine-tuning seeds, with their std)."""
    points = []
    for entry in collected:
        cell: MaskCell = entry["cell"]
        if cell.method == DENSE or not entry["eval"] or entry["axis"] != "main":
            continue
        per_task = []
        for task in cfg.finetune.tasks:
            r = entry["tasks"].get(task)
            if not (r and r.get("complete")):
                break
            metric = next(m for m, s in metric_names(r) if s == split)
            per_task.append(r["best"][metric]["values"])
        else:
            runs = [statistics.fmean(v) for v in zip(*per_task)]
            points.append({"method": cell.method, "sparsity": cell.sparsity, "seed": cell.seed,
                           "kd_loss": entry["eval"]["kd_loss"], "mlm_loss": entry["eval"].get("mlm_loss"),
                           **_stat(runs)})
    return points


def correlations(cfg: StudyConfig, points: list[dict]) -> list[dict]:
    out = []
    for loss in ("kd_loss", "mlm_loss"):
        usable = [p for p in points if p[loss] is not None]
        if not usable:
            continue
        for s in [*sorted({p["sparsity"] for p in usable}), None]:
            mine = [p for p in usable if s is None or p["sparsity"] == s]
            stat = spearman_with_interval([p[loss] for p in mine], [p["mean"] for p in mine])
            out.append({"loss": loss, "sparsity": s if s is not None else "all", **stat})
    return out


# ----------------------------------------------------------------------- writing


def _fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown(cfg: StudyConfig, rows: list[dict], corr: list[dict], figures: list[str], split: str,
             timings: list[dict], all_rows: list[dict] = ()) -> str:
    ft = cfg.finetune
    lines = [f"# Study `{cfg.name}`: {cfg.model_name_or_path}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `launchers/study.py --config "
             f"{os.path.relpath(cfg.source, os.getcwd()) if cfg.source else '?'}`.", "",
             f"- methods: {', '.join(cfg.methods)}" + (" (+ the dense model)" if cfg.dense_reference else ""),
             f"- sparsities: {', '.join(f'{s:g}' for s in cfg.sparsities)}; mask seeds: {cfg.mask_seeds}",
             f"- tasks: {', '.join(ft.tasks)}; fine-tuning seeds: {ft.seeds}; fine-tuning arguments (all masks "
             f"alike): `{json.dumps(ft.args)}`" + "".join(f"; {t}: `{json.dumps(a)}`" for t, a in ft.task_args.items()),
             f"- pre-training losses on held-out text: `{json.dumps(cfg.evaluate)}`",
             f"- score: best dev evaluation of each run; table cells are **{split}** mean ± std over "
             f"{len(ft.seeds)} fine-tuning seed(s) x mask seeds (dev in the JSON)", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = [*ft.tasks, AVERAGE]
    have_mlm = any(r["mlm_loss"] is not None for r in rows)
    header = ["method", "sparsity", "KD loss"] + (["MLM loss"] if have_mlm else []) + tasks
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    by = {(r["method"], r["sparsity"], r["task"]): r for r in rows if r["split"] == split}
    keys = sorted({(r["method"], r["sparsity"]) for r in rows}, key=lambda k: (k[1], methods.index(k[0])))
    for method, s in keys:
        any_row = next(r for r in rows if r["method"] == method and r["sparsity"] == s)
        cells = [method, f"{s:g}", _fmt(any_row["kd_loss"], 4)] + ([_fmt(any_row["mlm_loss"], 3)] if have_mlm else [])
        for t in tasks:
            r = by.get((method, s, t))
            cells.append(f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Spearman correlation between a mask's held-out loss and its average downstream score "
                  "(one point per mask; 95% bootstrap interval over masks, 2000 resamples):", "",
              "| loss | sparsity | masks | rho | 95% interval |", "| --- | --- | --- | --- | --- |"]
    for c in corr:
        lines.append(f"| {c['loss']} | {c['sparsity']} | {c['n']} | {_fmt(c['rho'])} | "
                     f"[{_fmt(c['low'])}, {_fmt(c['high'])}] |")
    if not have_mlm:
        lines += ["", "MLM loss: not measured (the model has no pre-trained MLM head)."]
    lines += axes_markdown(cfg, all_rows, split)
    if timings:
        stages = [s for s in STAGES if any(t["stage"] == s for t in timings)]
        wall = {s: sum(t["seconds"] for t in timings if t["stage"] == s and t["job"] == "(stage)") for s in stages}
        cpu = {s: [t["cpu_seconds"] for t in timings if t["stage"] == s and t["job"] != "(stage)" and "cpu_seconds" in t]
               for s in stages}  # none: not measured (SLURM without accounting)
        lines += ["", "Time per stage (timings.json; a resumed study adds up its runs): " + ", ".join(
            f"{s} {wall[s] / 60:.1f} min wall" + (f", {sum(cpu[s]) / 60:.1f} CPU-min" if cpu[s] else "")
            for s in stages) + "."]
    lines += ["", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(lines)


def _fmt_flops(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def axes_markdown(cfg: StudyConfig, rows: list[dict], split: str) -> list[str]:
    """The two axes' tables: each point's cost or train-set size, KD loss and score per task."""
    lines = []
    budget = sorted((r for r in rows if r["split"] == split and r["task"] != AVERAGE and r["method"] != DENSE
                     and r["sparsity"] in cfg.budget_sparsities and r["task"] in cfg.budget_tasks
                     and (r["axis"] == "search_budget" or (r["axis"] == "main" and (cfg.search_budget.snapshot_steps
                                                                                   or cfg.search_budget.imp_prune_intervals)))),
                    key=lambda r: (r["sparsity"], r["task"], r["method"], r["search_flops"] or 0))
    if budget:
        lines += ["", f"Search budget ({split} score; cost = the search's tokens, forward-backward FLOPs, "
                      f"device-seconds of its training steps):", "",
                  "| method | sparsity | task | search steps | tokens | FLOPs | device-s | KD loss | score |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in budget:
            lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['task']} | {r['search_steps']} | "
                         f"{r['search_tokens']} | {_fmt_flops(r['search_flops'])} | "
                         f"{_fmt(r['search_device_seconds'], 0)} | {_fmt(r['kd_loss'], 4)} | "
                         f"{r['mean']:.2f} ± {r['std']:.2f} |")
    data = sorted((r for r in rows if r["split"] == split and r["task"] in cfg.data_tasks and cfg.train_examples.sizes
                   and r["method"] in cfg.data_methods and (r["method"] == DENSE or r["sparsity"] in cfg.data_sparsities)
                   and r["axis"] in ("main", "train_examples")),
                  key=lambda r: (r["sparsity"], r["task"], r["method"], r["train_examples"] or float("inf")))
    if data:
        lines += ["", f"Train examples ({split} score, mean ± std over fine-tuning seeds x mask seeds; "
                      f"N = all: the main study):", "", "| method | sparsity | task | N | score |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['sparsity']:g} | {r['task']} | {r['train_examples'] or 'all'} | "
                  f"{r['mean']:.2f} ± {r['std']:.2f} |" for r in data]
    return lines


def write_report(cfg: StudyConfig) -> dict:
    from tamt_ds.checkpoint import atomic_write_text
    from tamt_ds.study import figures as figs

    collected = collect(cfg)
    all_rows = build_rows(cfg, collected)
    rows = [r for r in all_rows if r["axis"] == "main"]
    split = report_metric(cfg, rows)
    points = mask_points(cfg, collected, split)
    corr = correlations(cfg, points)
    main = [e for e in collected if e["axis"] == "main"]
    written = figs.draw_all(cfg, main, rows, points, corr, split) + figs.draw_axes(cfg, all_rows, split)
    timings = read_json(os.path.join(cfg.out, "timings.json")) or []
    atomic_write_text(os.path.join(cfg.out, "study.json"), json.dumps(all_rows, indent=1) + "\n")
    atomic_write_text(os.path.join(cfg.out, "correlations.json"), json.dumps(corr, indent=1) + "\n")
    md = markdown(cfg, rows, corr, [os.path.basename(f) for f in written], split, timings, all_rows)
    atomic_write_text(os.path.join(cfg.out, "study.md"), md)
    print(f"\n{md}\nwritten: {cfg.out}/study.json, study.md, correlations.json, "
          f"{', '.join(os.path.basename(f) for f in written)}", flush=True)
    return {"rows": all_rows, "correlations": corr, "figures": written}
