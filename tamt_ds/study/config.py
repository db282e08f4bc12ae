"""A study's configuration (YAML or JSON) and the cells it expands to.

    methods x sparsities x mask seeds -> mask cells (+ the dense model as a reference)
    mask cell x tasks x fine-tuning seeds -> downstream scores

Every path in a config is relative to the repository root unless absolute, so that
`make study` works from any clone; the downstream data of local tasks lives in
`../shared/data` next to the repository unless the config says otherwise.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tamt_ds.errors import InputError
from tamt_ds.study.cost import GPU_PEAK_TFLOPS, GpuAssumptions

REPO_ROOT = Path(__file__).resolve().parents[2]
TAMT_METHODS = {"tamt-kd": "kd", "tamt-mlm": "mlm", "tamt-mlm_kd": "mlm_kd"}  # method -> search objective
METHODS = (*TAMT_METHODS, "imp", "omp", "random")
DENSE = "dense"


class StudyError(InputError):
    pass


@dataclass
class Budget:
    """CPU seconds per unit of work on the reference machine (2 CPU cores), measured with the
    processes' own CPU time, which other jobs on a shared machine do not inflate (figures in
    docs/study.md).  The plan converts them to wall time: one job at a time keeps about
    `single_job_cores` busy (torch's threads), `parallel_jobs` > 1 one core each."""
    minutes: float = 60.0
    cores: int = 2
    single_job_cores: float = 1.7  # measured: a 300-step search, 1081 CPU-s in 633 s on a quiet 2-core machine
    process_start_cpu_s: float = 30.0  # imports, model load, DeepSpeed set-up, per subprocess
    # per unit below: fitted to the embedded study's jobs of 2026-11-26 (docs/study/timings.json)
    search_step_cpu_s: float = 3.0  # one TAMT-KD step of 64 x 32 tokens (teacher + student)
    search_mlm_step_cpu_s: float = 4.0  # one TAMT-MLM(+KD) step
    imp_step_cpu_s: float = 4.0  # one MLM step of all weights
    imp_round_cpu_s: float = 15.0  # fresh engine, pruning, saving, per round
    eval_mask_cpu_s: float = 4.0  # one mask on the held-out blocks
    finetune_step_cpu_s: float = 0.4  # one fine-tuning step's optimizer and ZeRO work, whatever the batch
    finetune_example_cpu_s: float = 0.02  # forward + backward of one short sentence
    finetune_run_cpu_s: float = 15.0  # per task and seed: model load, engine, evaluation of dev and test


@dataclass
class FinetuneSpec:
    tasks: list[str] = field(default_factory=lambda: ["supersense_verb", "supersense_noun"])
    # local tasks: <dir>/<task>/{train,validation[,test]}.tsv, or the project's own (tamt_ds/data/tasks/<task>)
    task_data_dir: str = "../shared/data"
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    args: dict[str, Any] = field(default_factory=dict)  # launchers/finetune.py arguments, same for every mask
    # per-task changes to args, e.g. {wic_wn: {max_steps: 25}}: a task's protocol, still the same for every mask
    task_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    report_split: str = "test"  # figures use test_<metric> where a task has a labelled test split, else dev

    def args_for(self, task: str) -> dict[str, Any]:
        """launchers/finetune.py arguments for one task (a name of `tasks`)."""
        return {**self.args, **self.task_args.get(task, {})}


@dataclass
class StudyConfig:
    name: str = "study"
    output_dir: str = "outputs/study"
    model_name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    launcher: str = "python"  # python (one process) | torchrun | deepspeed
    nproc: int = 1  # ranks (GPUs) of a search, IMP run or evaluation
    finetune_nproc: int | None = None  # ranks of a fine-tuning job (default: nproc); the paper's: 1 GPU each
    parallel_jobs: int = 1  # jobs of one stage run side by side (each with cores / parallel_jobs threads)
    deepspeed: str | None = None  # DeepSpeed config for every stage (default: the machine's)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    mask_seeds: list[int] = field(default_factory=lambda: [1])
    dense_reference: bool = True
    # launchers/search.py arguments; a value may be a mapping {sparsity: value}, e.g. more steps
    # at higher sparsity, as the paper matches each mask's search cost to IMP's at that sparsity
    search: dict[str, Any] = field(default_factory=dict)
    imp: dict[str, Any] = field(default_factory=dict)  # launchers/imp.py arguments
    evaluate: dict[str, Any] = field(default_factory=dict)  # launchers/evaluate_mask.py arguments
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    budget: Budget = field(default_factory=Budget)
    gpu: GpuAssumptions | None = None  # with it, --dry-run also prints each job's expected GPU-hours
    source: str = ""  # the config file

    def path(self, p: str) -> str:
        """A config path: absolute, or relative to the repository root."""
        return p if os.path.isabs(p) else str((REPO_ROOT / p).resolve())

    @property
    def out(self) -> str:
        return self.path(self.output_dir)

    def search_args(self, sparsity: float, method: str | None = None) -> dict[str, Any]:
        """The search's arguments for one method and sparsity: per-method, then per-sparsity mappings
        resolved (the paper's MLM and KD searches differ in learning rate and weight decay)."""
        out = {}
        for k, v in self.search.items():
            if _per_method(v):
                v = v.get(method)
            out[k] = _at_sparsity(v, sparsity) if isinstance(v, dict) else v
        return {k: v for k, v in out.items() if v is not None}

    @property
    def imp_levels(self) -> list[float]:
        step = float(self.imp.get("prune_fraction", 0.1))
        top = max(s for s in self.sparsities)
        return [round(r * step, 10) for r in range(1, round(top / step) + 1)]


@dataclass(frozen=True)
class MaskCell:
    """One mask of the study: a method at a sparsity with a mask seed (OMP has no seed)."""
    method: str
    sparsity: float
    seed: int | None

    @property
    def id(self) -> str:
        if self.method == DENSE:
            return DENSE
        return f"{self.method}_s{self.sparsity:g}" + (f"_m{self.seed}" if self.seed is not None else "")

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (mask seed {self.seed})"


def mask_cells(cfg: StudyConfig) -> list[MaskCell]:
    cells = [MaskCell(DENSE, 0.0, None)] if cfg.dense_reference else []
    for method in cfg.methods:
        for s in cfg.sparsities:
            seeds = [None] if method == "omp" else cfg.mask_seeds  # OMP is deterministic
            cells += [MaskCell(method, s, seed) for seed in seeds]
    return cells


def _per_method(value) -> bool:
    """A {method: value} mapping, e.g. learning_rate: {tamt-mlm: 5.0e-5, tamt-kd: 2.0e-5}."""
    return isinstance(value, dict) and bool(value) and all(k in TAMT_METHODS for k in value)


def _at_sparsity(values: dict, sparsity: float):
    """values[sparsity] for a {sparsity: value} mapping (YAML float keys, or JSON string keys)."""
    found = [v for k, v in values.items() if math.isclose(float(k), sparsity, abs_tol=1e-9)]
    return found[0] if found else None


# ------------------------------------------------------------------------ loading


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise StudyError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in cls.__dataclass_fields__.values()}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {unknown}; known: {sorted(known - {'source'})}")
    return cls(**raw)


def load_config(path: str) -> StudyConfig:
    """Read a study from YAML or JSON; every error is one line naming the fix."""
    if not os.path.isfile(path):
        raise StudyError(f"study config {path!r} not found: pass --config studies/NAME.yaml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: both name the line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"study config {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                         f"({first}): fix the file") from e
    raw = dict(raw or {})
    finetune = _build(FinetuneSpec, raw.pop("finetune", {}) or {}, f"{path}: finetune")
    budget = _build(Budget, raw.pop("budget", {}) or {}, f"{path}: budget")
    gpu = _build(GpuAssumptions, raw.pop("gpu"), f"{path}: gpu") if raw.get("gpu") is not None else None
    cfg = _build(StudyConfig, raw, path)
    cfg.finetune, cfg.budget, cfg.gpu, cfg.source = finetune, budget, gpu, os.path.abspath(path)
    validate(cfg)
    return cfg


def validate(cfg: StudyConfig) -> None:
    where = cfg.source or "study config"
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise StudyError(f"{where}: unknown method(s) {bad}: use some of {', '.join(METHODS)}")
    if not cfg.sparsities or any(not (0.0 < s < 1.0) for s in cfg.sparsities):
        raise StudyError(f"{where}: sparsities must be numbers in (0, 1), got {cfg.sparsities}")
    if len(set(cfg.sparsities)) != len(cfg.sparsities) or len(set(cfg.mask_seeds)) != len(cfg.mask_seeds):
        raise StudyError(f"{where}: sparsities and mask_seeds must not repeat a value")
    if not cfg.mask_seeds:
        raise StudyError(f"{where}: mask_seeds needs at least one seed, e.g. [1]")
    if cfg.launcher not in ("python", "torchrun", "deepspeed"):
        raise StudyError(f"{where}: launcher must be python, torchrun or deepspeed, got {cfg.launcher!r}")
    if cfg.parallel_jobs < 1:
        raise StudyError(f"{where}: parallel_jobs must be at least 1, got {cfg.parallel_jobs}")
    for key in ("nproc", "finetune_nproc"):
        n = getattr(cfg, key)
        if n is not None and (n < 1 or (cfg.launcher == "python" and n != 1)):
            raise StudyError(f"{where}: {key} must be 1 with launcher python (use torchrun or deepspeed for more)")
    if cfg.gpu is not None and cfg.gpu.name not in GPU_PEAK_TFLOPS:
        raise StudyError(f"{where}: gpu: name {cfg.gpu.name!r} unknown: use one of {', '.join(GPU_PEAK_TFLOPS)}")
    if "imp" in cfg.methods:
        step = float(cfg.imp.get("prune_fraction", 0.1))
        off = [s for s in cfg.sparsities if not math.isclose(round(s / step) * step, s, abs_tol=1e-9)]
        if off:
            raise StudyError(f"{where}: IMP reaches only multiples of prune_fraction {step}; sparsities {off} are not")
    for key, by_method in cfg.search.items():
        for values in (by_method.values() if _per_method(by_method) else [by_method]):
            if not isinstance(values, dict):
                continue
            try:
                missing = [s for s in cfg.sparsities if _at_sparsity(values, s) is None]
            except (TypeError, ValueError):
                missing = cfg.sparsities
            if missing:
                raise StudyError(f"{where}: search: {key} is a per-sparsity mapping without a value for "
                                 f"{missing}: give one for every sparsity, e.g. {{0.5: 80, 0.9: 160}} (or a "
                                 f"per-method one, e.g. {{tamt-mlm: 5.0e-5, tamt-kd: 2.0e-5}})")
    for section, reserved in (("search", ("objective", "sparsity", "seed", "output_dir", "resume")),
                              ("imp", ("max_sparsity", "seed", "output_dir", "resume")),
                              ("evaluate", ("mask", "output", "save_mask", "mask_seed"))):
        clash = [k for k in getattr(cfg, section) if k in reserved or k in ("model_name_or_path", "deepspeed")]
        if clash:
            raise StudyError(f"{where}: {section}: {clash} are set by the study for each cell; remove them")
    per_task = cfg.finetune.task_args
    if not isinstance(per_task, dict) or any(t not in cfg.finetune.tasks or not isinstance(v, dict)
                                             for t, v in per_task.items()):
        raise StudyError(f"{where}: finetune.task_args must map tasks of finetune.tasks ({cfg.finetune.tasks}) "
                         f"to arguments, e.g. {{wic_wn: {{max_steps: 25}}}}")
    for task in cfg.finetune.tasks:
        clash = [k for k in cfg.finetune.args_for(task) if k in ("mask", "task", "tasks", "seeds", "mask_seed",
                                                                  "output_dir", "model_name_or_path", "deepspeed",
                                                                  "data_dir")]
        if clash:
            raise StudyError(f"{where}: finetune: {clash} are set by the study; use finetune.tasks / seeds instead")
    if not cfg.finetune.tasks or not cfg.finetune.seeds:
        raise StudyError(f"{where}: finetune needs at least one task and one seed")
    if cfg.finetune.report_split not in ("test", "dev"):
        raise StudyError(f"{where}: finetune.report_split must be test or dev, got {cfg.finetune.report_split!r}")
