"""The study's figures (matplotlib, PNG), each readable on its own: title, axes with units, legend.

    fig_downstream_vs_sparsity.png   score against sparsity, one line per method, one panel per task
    fig_downstream_vs_kd_loss.png    score against held-out KD loss, one panel per sparsity (+ pooled),
                                     Spearman rho and its bootstrap interval on each panel
    fig_downstream_vs_mlm_loss.png   the same against MLM loss (models with a pre-trained MLM head)
    fig_mask_overlap_s<S>.png        overlap of kept weights between methods, per matrix type and layer
    fig_sparsity_profile.png         each mask's sparsity per layer, and how far it moved from OMP per layer
    fig_search_efficiency.png        score per task and held-out KD loss against search cost (FLOPs, log),
                                     one line per method, one row per sparsity (search_budget axis)
    fig_data_scarcity.png            score against train examples N, and TAMT minus OMP / IMP against N
                                     (mean ± std over fine-tuning seeds), per task and sparsity (train_examples axis)
"""
from __future__ import annotations

import itertools
import os
import re
import textwrap

import numpy as np

from tamt_ds.study.config import DENSE, TAMT_METHODS, StudyConfig, split_method
from tamt_ds.study.report import AVERAGE
from tamt_ds.study.runner import mask_path

COLORS = {"tamt-kd": "#d62728", "tamt-mlm": "#9467bd", "tamt-mlm_kd": "#8c564b", "imp": "#1f77b4",
          "omp": "#2ca02c", "random": "#7f7f7f", DENSE: "#000000"}
MARKERS = {"tamt-kd": "o", "tamt-mlm": "s", "tamt-mlm_kd": "D", "imp": "^", "omp": "v", "random": "x"}
TYPES = [("query", r"attention\.self\.query"), ("key", r"attention\.self\.key"), ("value", r"attention\.self\.value"),
         ("attn-out", r"attention\.output\.dense"), ("ffn-in", r"intermediate\.dense"), ("ffn-out", r"\d+\.output\.dense")]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric_label(rows: list[dict], split: str) -> str:
    names = {r["metric"] for r in rows if r["split"] == split and r["task"] != AVERAGE}
    base = names.pop().removeprefix("test_") if len(names) == 1 else "main metric"
    return f"{'test' if split == 'test' else 'dev'} {base} (%)"


def finish(fig, path: str, title: str, **savefig) -> str:
    """Title the figure (wrapped to its width: a one-task or one-sparsity study is narrow), write
    it to `path`, free it."""
    fig.suptitle(textwrap.fill(title, width=max(40, int(fig.get_figwidth() * 11))), fontsize=11)
    fig.savefig(path, dpi=110, **savefig)
    _plt().close(fig)
    return path


def downstream_vs_sparsity(cfg: StudyConfig, rows: list[dict], split: str, path: str) -> str | None:
    plt = _plt()
    tasks = [t for t in [*cfg.finetune.tasks, AVERAGE] if any(r["task"] == t and r["split"] == split for r in rows)]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.2), squeeze=False,
                             layout="constrained")
    label = _metric_label(rows, split)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and r["split"] == split]
        for method in [m for m in cfg.methods if any(r["method"] == m for r in mine)]:
            pts = sorted((r["sparsity"], r["mean"], r["std"]) for r in mine if r["method"] == method)
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, label=method, color=COLORS.get(method), marker=MARKERS.get(method, "o"),
                        capsize=3, linewidth=1.6)
        dense = [r for r in mine if r["method"] == DENSE]
        if dense:
            ax.axhline(dense[0]["mean"], color="black", linestyle="--", linewidth=1,
                       label=f"dense ({dense[0]['mean']:.1f})")
        ax.set_title(task if task != AVERAGE else f"average over {len(cfg.finetune.tasks)} tasks")
        ax.set_xlabel("sparsity (fraction of masked weights pruned)")
        ax.set_ylabel(label if task != AVERAGE else f"mean of tasks' {label}")
        ax.set_xticks(sorted(cfg.sparsities))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    n_runs = max((r["n"] for r in rows), default=0)
    return finish(fig, path, f"Downstream score against sparsity ({cfg.model_name_or_path}); mean ± std over {n_runs} runs "
                  f"(fine-tuning seeds x mask seeds)")


def downstream_vs_loss(cfg: StudyConfig, points: list[dict], corr: list[dict], loss: str, split: str,
                       rows: list[dict], path: str) -> str | None:
    plt = _plt()
    usable = [p for p in points if p[loss] is not None]
    if not usable:
        return None
    panels = [*sorted({p["sparsity"] for p in usable}), None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False,
                             layout="constrained")
    name = {"kd_loss": "held-out KD loss (mean over layers of 1 − cos to the dense model)",
            "mlm_loss": "held-out MLM loss (cross-entropy, nats)"}[loss]
    for ax, s in zip(axes[0], panels):
        mine = [p for p in usable if s is None or p["sparsity"] == s]
        for method in dict.fromkeys(p["method"] for p in mine):
            pts = [p for p in mine if p["method"] == method]
            ax.errorbar([p[loss] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                        linestyle="none", marker=MARKERS.get(method, "o"), color=COLORS.get(method), capsize=3,
                        label=method, markersize=7)
        c = next(c for c in corr if c["loss"] == loss and c["sparsity"] == (s if s is not None else "all"))
        text = (f"Spearman ρ = {c['rho']:.2f}\n95% CI [{c['low']:.2f}, {c['high']:.2f}]\nn = {c['n']} masks"
                if c["rho"] is not None and c["low"] is not None else f"n = {c['n']} masks: too few for ρ")
        ax.text(0.97, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
        ax.set_title(f"sparsity {s:g}" if s is not None else "all sparsities pooled")
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(f"average {_metric_label(rows, split)} over tasks")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    return finish(fig, path, f"Downstream score against pre-training {loss.replace('_', ' ')}: one point per mask, "
                  f"error bars = std over fine-tuning seeds")


# ------------------------------------------------------------------- mask structure


def _layout(keys: list[str]) -> tuple[int, dict[str, tuple[str, int | None]]]:
    """Matrix key -> (type, layer); layer None for the word embeddings and the pooler."""
    where, layers = {}, 0
    for key in keys:
        if "word_embeddings" in key:
            where[key] = ("embeddings", None)
        elif "pooler" in key:
            where[key] = ("pooler", None)
        else:
            layer = int(re.search(r"layer\.(\d+)\.", key).group(1))
            layers = max(layers, layer + 1)
            where[key] = (next(t for t, rx in TYPES if re.search(rx, key)), layer)
    return layers, where


def _load(path: str | None):
    import torch

    return torch.load(path, weights_only=True) if path and os.path.isfile(path) else None


def masks_at(cfg: StudyConfig, collected: list[dict], sparsity: float) -> dict[str, dict]:
    """method -> its mask at this sparsity (the first mask seed's)."""
    out = {}
    for entry in collected:
        cell = entry["cell"]
        if cell.sparsity == sparsity and cell.method != DENSE and cell.method not in out:
            mask = _load(mask_path(cfg, cell))
            if mask is not None:
                out[cell.method] = mask
    return out


def overlap(a, b) -> float:
    """|kept in a and b| / |kept in a|: 1 = the same weights kept; a random pair at sparsity s: ~ 1 - s."""
    kept = int(a.sum())
    return float((a & b).sum()) / kept if kept else float("nan")


def mask_overlap(cfg: StudyConfig, masks: dict[str, dict], sparsity: float, path: str) -> str | None:
    plt = _plt()
    pairs = list(itertools.combinations([m for m in cfg.methods if m in masks], 2))
    if not pairs:
        return None
    layers, where = _layout(list(next(iter(masks.values()))))
    cols = min(3, len(pairs))
    rows_n = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(1.0 * layers * cols + 3.5, 3.4 * rows_n), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    image = None
    for ax, (a, b) in zip(axes.flat, pairs):
        grid = np.full((len(TYPES), layers), np.nan)
        extra = {}
        for key, (kind, layer) in where.items():
            value = overlap(masks[a][key], masks[b][key])
            if layer is None:
                extra[kind] = value
            else:
                grid[[t for t, _ in TYPES].index(kind), layer] = value
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(layers), [f"L{i}" for i in range(layers)])
        ax.set_yticks(range(len(TYPES)), [t for t, _ in TYPES])
        ax.set_xlabel("transformer layer")
        ax.set_title(f"{a} vs {b}\nembeddings {extra.get('embeddings', float('nan')):.2f}, "
                     f"pooler {extra.get('pooler', float('nan')):.2f}", fontsize=9)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="overlap of kept weights |A ∩ B| / |A|")
    return finish(fig, path, f"Mask overlap between methods at sparsity {sparsity:g} (two independent random masks: "
                  f"≈ {1 - sparsity:.2f}; identical masks: 1)", bbox_inches="tight")


def sparsity_profile(cfg: StudyConfig, collected: list[dict], path: str) -> str | None:
    """Top: fraction pruned per layer of each mask; bottom: fraction of its kept weights that
    OMP prunes (how far a learned mask moved from magnitude pruning), per layer."""
    plt = _plt()
    sparsities = sorted(cfg.sparsities)
    per_s = {s: masks_at(cfg, collected, s) for s in sparsities}
    if not any(per_s.values()):
        return None
    fig, axes = plt.subplots(2, len(sparsities), figsize=(4.6 * len(sparsities), 7.0), squeeze=False,
                             layout="constrained")
    for col, s in enumerate(sparsities):
        masks = per_s[s]
        if not masks:
            continue
        layers, where = _layout(list(next(iter(masks.values()))))
        slots = ["emb"] + [f"L{i}" for i in range(layers)] + ["pooler"]

        def slot(key):
            kind, layer = where[key]
            return 0 if kind == "embeddings" else (len(slots) - 1 if kind == "pooler" else layer + 1)

        for method, mask in masks.items():
            pruned, total, moved, kept = (np.zeros(len(slots)) for _ in range(4))
            for key, keep in mask.items():
                i = slot(key)
                pruned[i] += float((~keep).sum())
                total[i] += keep.numel()
                if "omp" in masks:
                    moved[i] += float((keep & ~masks["omp"][key]).sum())
                    kept[i] += float(keep.sum())
            style = dict(color=COLORS.get(method), marker=MARKERS.get(method, "o"), label=method)
            axes[0][col].plot(range(len(slots)), pruned / total, **style)
            if "omp" in masks and method != "omp":
                axes[1][col].plot(range(len(slots)), moved / np.maximum(kept, 1), **style)
        for row, ylabel in ((0, "fraction pruned in the layer"), (1, "kept weights that OMP prunes")):
            ax = axes[row][col]
            ax.set_xticks(range(len(slots)), slots)
            ax.set_xlabel("layer (emb = word embeddings)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_title(f"sparsity {s:g}: per-layer sparsity")
        axes[0][col].set_ylim(max(0.0, s - 0.1), min(1.0, s + 0.1))
        axes[1][col].set_title(f"sparsity {s:g}: distance from OMP per layer")
    return finish(fig, path, "Per-layer sparsity profile of each mask (per-matrix thresholds keep every matrix at the target) "
                  "and where masks depart from magnitude pruning")


def draw_all(cfg: StudyConfig, collected, rows, points, corr, split: str) -> list[str]:
    out = cfg.out
    written = [
        downstream_vs_sparsity(cfg, rows, split, os.path.join(out, "fig_downstream_vs_sparsity.png")),
        downstream_vs_loss(cfg, points, corr, "kd_loss", split, rows, os.path.join(out, "fig_downstream_vs_kd_loss.png")),
        downstream_vs_loss(cfg, points, corr, "mlm_loss", split, rows,
                           os.path.join(out, "fig_downstream_vs_mlm_loss.png")),
    ]
    for s in sorted(cfg.sparsities):
        written.append(mask_overlap(cfg, masks_at(cfg, collected, s), s, os.path.join(out, f"fig_mask_overlap_s{s:g}.png")))
    written.append(sparsity_profile(cfg, collected, os.path.join(out, "fig_sparsity_profile.png")))
    return [w for w in written if w]


# ------------------------------------------------------------------- the two axes


def _point_rows(rows: list[dict], split: str, task: str, sparsity: float, axes: tuple[str, ...]) -> list[dict]:
    return [r for r in rows if r["split"] == split and r["task"] == task and r["axis"] in axes
            and (r["sparsity"] == sparsity or r["method"] == DENSE)]


def search_efficiency(cfg: StudyConfig, rows: list[dict], split: str, path: str) -> str | None:
    """Score and held-out KD loss against what the search cost (FLOPs, log x), one line per method;
    OMP (and random) cost nothing: horizontal lines."""
    plt = _plt()
    sparsities, tasks = sorted(cfg.budget_sparsities), cfg.budget_tasks
    if not any(r["axis"] == "search_budget" and r["split"] == split for r in rows):
        return None
    fig, axes = plt.subplots(len(sparsities), len(tasks) + 1, figsize=(4.6 * (len(tasks) + 1), 4.0 * len(sparsities)),
                             squeeze=False, layout="constrained")
    searched = [m for m in cfg.methods if split_method(m)[0] in TAMT_METHODS or m == "imp"]
    for i, s in enumerate(sparsities):
        for j, task in enumerate([*tasks, None]):
            ax = axes[i][j]
            mine = _point_rows(rows, split, task or tasks[0], s, ("main", "search_budget"))
            value = "mean" if task else "kd_loss"
            for method in searched:
                pts = sorted((r["search_flops"], r[value], r["std"] if task else 0.0, r["search_steps"])
                             for r in mine if r["method"] == method and r["search_flops"] and r[value] is not None)
                if not pts:
                    continue
                x, y, e, steps = zip(*pts)
                ax.errorbar(x, y, yerr=e if task else None, label=method, color=COLORS.get(method),
                            marker=MARKERS.get(method, "o"), capsize=3, linewidth=1.6)
                for xi, yi, n in zip(x, y, steps):
                    ax.annotate(f"{n}", (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7,
                                color=COLORS.get(method))
            for method in ("omp", "random", DENSE):
                r = next((r for r in mine if r["method"] == method and r[value] is not None), None)
                if r is not None and (task or method != DENSE):
                    ax.axhline(r[value], color=COLORS[method], linestyle="--" if method == DENSE else ":",
                               linewidth=1.2, label=f"{method} (no search)" if method != DENSE else "dense")
            ax.set_xscale("log")
            ax.set_xlabel("search cost: forward-backward FLOPs (log; labels: search steps)", fontsize=8)
            ax.set_ylabel(_metric_label(rows, split) if task else "held-out KD loss (1 − cos, mean over layers)",
                          fontsize=8)
            ax.set_title(f"sparsity {s:g}: {task}" if task else f"sparsity {s:g}: held-out KD loss")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7, loc="best")
    return finish(fig, path, f"Search efficiency ({cfg.model_name_or_path}): TAMT masks taken along one search, IMP at "
                  f"several prune intervals; mean ± std over fine-tuning seeds x mask seeds")


def _per_seed(row: dict, n_seeds: int) -> np.ndarray:
    """A row's values as one number per fine-tuning seed (mean over mask seeds): values are
    listed mask seed by mask seed, each with every fine-tuning seed in order."""
    return np.asarray(row["values"], float).reshape(-1, n_seeds).mean(axis=0)


def data_scarcity(cfg: StudyConfig, rows: list[dict], split: str, path: str) -> str | None:
    """Score against the number of train examples, one line per method; and TAMT minus OMP / IMP
    against it, paired by fine-tuning seed (the same subset for both), mean ± std over seeds."""
    from tamt_ds.study.runner import train_size

    plt = _plt()
    sparsities, tasks, sizes = sorted(cfg.data_sparsities), cfg.data_tasks, sorted(cfg.train_examples.sizes)
    if not sizes or not any(r["axis"] == "train_examples" and r["split"] == split for r in rows):
        return None
    n_seeds = len(cfg.finetune.seeds)
    fig, axes = plt.subplots(len(sparsities), 2 * len(tasks), figsize=(4.6 * 2 * len(tasks), 4.0 * len(sparsities)),
                             squeeze=False, layout="constrained")
    for i, s in enumerate(sparsities):
        for j, task in enumerate(tasks):
            full = train_size(cfg, task) or 2 * sizes[-1]
            where = {None: full, **{n: n for n in sizes}}
            mine = [r for r in _point_rows(rows, split, task, s, ("main", "train_examples"))
                    if r["method"] in cfg.data_methods]
            score, diff = axes[i][2 * j], axes[i][2 * j + 1]
            by = {}
            for r in mine:
                by.setdefault(r["method"], {})[r["train_examples"]] = r
            for method, at in by.items():
                pts = sorted((where[n], r["mean"], r["std"]) for n, r in at.items() if n in where)
                x, y, e = zip(*pts)
                score.errorbar(x, y, yerr=e, label=method, color=COLORS.get(method), marker=MARKERS.get(method, "o"),
                               capsize=3, linewidth=1.6, linestyle="--" if method == DENSE else "-")
            for tamt in [m for m in by if split_method(m)[0] in TAMT_METHODS]:
                pattern = split_method(tamt)[1]  # against the baselines of its own pattern
                for base, style in ((f"omp[{pattern}]" if pattern != "unstructured" else "omp", "-"), ("imp", "--")):
                    if base not in by:
                        continue
                    pts = sorted((where[n], *(lambda d: (d.mean(), d.std(ddof=1) if n_seeds > 1 else 0.0))(
                        _per_seed(by[tamt][n], n_seeds) - _per_seed(by[base][n], n_seeds)))
                        for n in by[tamt] if n in by[base] and n in where)
                    if pts:
                        x, y, e = zip(*pts)
                        diff.errorbar(x, y, yerr=e, label=f"{tamt} − {base}", color=COLORS.get(base), linestyle=style,
                                      marker=MARKERS.get(tamt, "o"), capsize=3, linewidth=1.6)
            diff.axhline(0.0, color="black", linewidth=0.8)
            ticks = [*sizes, full]
            for ax in (score, diff):
                ax.set_xscale("log")
                ax.set_xticks(ticks, [*map(str, sizes), f"all ({full})" if train_size(cfg, task) else "all"], fontsize=7)
                ax.minorticks_off()
                ax.set_xlabel("fine-tuning train examples N (log)", fontsize=8)
                ax.grid(alpha=0.3)
            score.set_ylabel(_metric_label(rows, split), fontsize=8)
            diff.set_ylabel("difference in points (same subset, per fine-tuning seed)", fontsize=8)
            score.set_title(f"sparsity {s:g}: {task}")
            diff.set_title(f"sparsity {s:g}: {task}, TAMT minus baseline")
            score.legend(fontsize=7, loc="best")
            diff.legend(fontsize=7, loc="best")
    return finish(fig, path, f"Data scarcity ({cfg.model_name_or_path}): every mask fine-tuned on the same seeded subsets of N "
                  f"train examples; error bars = std over {n_seeds} fine-tuning seed(s)")


def draw_axes(cfg: StudyConfig, rows: list[dict], split: str) -> list[str]:
    written = [search_efficiency(cfg, rows, split, os.path.join(cfg.out, "fig_search_efficiency.png")),
               data_scarcity(cfg, rows, split, os.path.join(cfg.out, "fig_data_scarcity.png"))]
    return [w for w in written if w]
