"""A study's configuration (YAML or JSON) and the cells it expands to.

    methods x sparsities x mask seeds -> mask cells (+ the dense model as a reference)
    mask cell x tasks x fine-tuning seeds -> downstream scores
    optional axes (issue 17): search_budget (masks found with less search: TAMT snapshots, IMP at
    other prune intervals) and train_examples (masks fine-tuned on seeded subsets of N examples)

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
from tamt_ds.mfu import GPU_PEAK_TFLOPS
from tamt_ds.study.cost import GpuAssumptions

REPO_ROOT = Path(__file__).resolve().parents[2]
TAMT_METHODS = {"tamt-kd": "kd", "tamt-mlm": "mlm", "tamt-mlm_kd": "mlm_kd"}  # method -> search objective
METHODS = (*TAMT_METHODS, "imp", "omp", "random", "head_importance")
BUILT_BASELINES = ("omp", "random", "head_importance")  # masks evaluate_mask builds (no search, no training)
STAGES = ("masks", "evaluate", "finetune")  # a study's stages, in the order they run
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
    # per unit below: fitted to the embedded study's fp32 jobs of 2026-11-26 (that run's docs/study/timings.json,
    # in git history; studies/embedded.yaml: the bf16 figures, refit to the 2026-12-05 run)
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
class SearchBudgetAxis:
    """Masks found with less search, at `sparsities` (default: the study's), fine-tuned on `tasks`
    (default: the study's).  TAMT: the masks its searches export at `snapshot_steps` (free: the
    same run); IMP: one more IMP run per `imp_prune_intervals` entry (each costs a whole run)."""
    snapshot_steps: list[int] = field(default_factory=list)
    imp_prune_intervals: list[int] = field(default_factory=list)
    sparsities: list[float] | None = None
    tasks: list[str] | None = None


@dataclass
class TrainExamplesAxis:
    """The study's masks fine-tuned on seeded subsets of N train examples (`sizes`; the whole set is
    the main study).  The subset is drawn from the fine-tuning seed alone: the same examples for
    every mask and method.  Default methods / sparsities / tasks: the study's (+ the dense model)."""
    sizes: list[int] = field(default_factory=list)
    methods: list[str] | None = None
    sparsities: list[float] | None = None
    tasks: list[str] | None = None


@dataclass
class SlurmSettings:
    """How `executor: slurm` asks for each job's allocation (tamt_ds/study/slurm.py, docs/study.md).
    A job of `nproc` ranks gets nproc / gpus_per_node whole nodes (a search of nproc 32 on 8-GPU
    nodes: 4 nodes), or one node with `nproc` GPUs when it needs fewer (a fine-tune: one GPU)."""
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    time: str | None = None  # each job's limit, e.g. "12:00:00" (None: the partition's); a job killed at it is resubmitted and resumes
    gpus_per_node: int = 8  # 0: a cluster without GPUs (one node per job, its ranks on CPUs)
    cpus_per_rank: int = 4  # CPUs asked per rank of a job that does not fill its nodes (one that does gets them all)
    max_attempts: int = 3  # submissions of one job per controller run before the study gives up on it
    poll_seconds: float = 30.0  # how often the controller asks squeue
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--qos=high", "--mem=0"]


@dataclass
class StudyConfig:
    name: str = "study"
    output_dir: str = "outputs/study"
    model_name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    launcher: str = "python"  # python (one process) | torchrun | deepspeed
    nproc: int = 1  # ranks (GPUs) of a search, IMP run or evaluation
    finetune_nproc: int | None = None  # ranks of a fine-tuning job (default: nproc); the paper's: 1 GPU each
    parallel_jobs: int = 1  # jobs of one stage run side by side (each with cores / parallel_jobs threads)
    executor: str = "local"  # local (child processes of the study) | slurm (one sbatch allocation per job)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    deepspeed: str | None = None  # DeepSpeed config for every stage (default: the machine's)
    # a method, or a method with a sparsity pattern: {name: tamt-kd, sparsity_pattern: "2:4"}, also
    # written tamt-kd[2:4] (docs/patterns.md); loaded as that label
    methods: list[Any] = field(default_factory=lambda: ["tamt-kd", "tamt-mlm", "tamt-mlm_kd", "imp", "omp", "random"])
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    mask_seeds: list[int] = field(default_factory=lambda: [1])
    dense_reference: bool = True
    # launchers/search.py arguments; a value may be a mapping {sparsity: value}, e.g. more steps
    # at higher sparsity, as the paper matches each mask's search cost to IMP's at that sparsity
    search: dict[str, Any] = field(default_factory=dict)
    imp: dict[str, Any] = field(default_factory=dict)  # launchers/imp.py arguments
    evaluate: dict[str, Any] = field(default_factory=dict)  # launchers/evaluate_mask.py arguments
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    search_budget: SearchBudgetAxis = field(default_factory=SearchBudgetAxis)
    train_examples: TrainExamplesAxis = field(default_factory=TrainExamplesAxis)
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
        resolved (the paper's MLM and KD searches differ in learning rate and weight decay), and the
        search-budget axis's snapshot steps where it has that sparsity."""
        args = {}
        for k, v in self.search.items():
            if _per_method(v):
                v = v.get(method, v.get(split_method(method)[0])) if method else None
            args[k] = _at_sparsity(v, sparsity) if isinstance(v, dict) else v
        args = {k: v for k, v in args.items() if v is not None}
        if self.search_budget.snapshot_steps and _has(self.budget_sparsities, sparsity):
            args["mask_snapshot_steps"] = sorted(self.search_budget.snapshot_steps)
        return args

    @property
    def budget_sparsities(self) -> list[float]:
        return self.search_budget.sparsities or self.sparsities

    @property
    def budget_tasks(self) -> list[str]:
        return self.search_budget.tasks or self.finetune.tasks

    @property
    def data_sparsities(self) -> list[float]:
        return self.train_examples.sparsities or self.sparsities

    @property
    def data_tasks(self) -> list[str]:
        return self.train_examples.tasks or self.finetune.tasks

    @property
    def data_methods(self) -> list[str]:
        return self.train_examples.methods or [*self.methods, *([DENSE] if self.dense_reference else [])]

    def imp_levels(self, top: float | None = None) -> list[float]:
        """IMP's levels up to `top` (default: the study's highest sparsity)."""
        step = float(self.imp.get("prune_fraction", 0.1))
        top = max(self.sparsities) if top is None else top
        return [round(r * step, 10) for r in range(1, round(top / step) + 1)]


@dataclass(frozen=True)
class MaskCell:
    """One mask of the study: a method at a sparsity with a mask seed (OMP has no seed)."""
    method: str
    sparsity: float
    seed: int | None
    budget: int | None = None  # search-budget axis: TAMT's snapshot step, IMP's prune interval (None: the study's)

    @property
    def id(self) -> str:
        if self.method == DENSE:
            return DENSE
        budget = "" if self.budget is None else f"_step{self.budget}" if self.base in TAMT_METHODS \
            else f"_every{self.budget}"
        name, pattern = split_method(self.method)
        name += "" if pattern == "unstructured" else "_" + pattern.replace(":", "-")
        return f"{name}_s{self.sparsity:g}" + (f"_m{self.seed}" if self.seed is not None else "") + budget

    @property
    def base(self) -> str:
        """The method without its sparsity pattern (tamt-kd for tamt-kd[2:4])."""
        return split_method(self.method)[0]

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method} (mask seed {self.seed})"


def split_method(label: str) -> tuple[str, str]:
    """tamt-kd[2:4] -> (tamt-kd, 2:4); tamt-kd -> (tamt-kd, unstructured)."""
    name, _, pattern = label.partition("[")
    return name, pattern.removesuffix("]") or "unstructured"


def method_label(entry, where: str = "study config") -> str:
    """A methods entry (a name, name[pattern], or {name, sparsity_pattern}) as its label."""
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - {"name", "sparsity_pattern"})
        if unknown or not isinstance(entry.get("name"), str):
            raise StudyError(f"{where}: a method given as a mapping needs name (and may have sparsity_pattern), got "
                             f"{entry!r}: e.g. {{name: tamt-kd, sparsity_pattern: \"2:4\"}}")
        name, pattern = entry["name"], str(entry.get("sparsity_pattern", "unstructured"))
    elif isinstance(entry, str):
        name, pattern = split_method(entry)
    else:
        raise StudyError(f"{where}: methods entries are names or {{name, sparsity_pattern}} mappings, got {entry!r}")
    if name == "head_importance" and pattern == "unstructured":
        pattern = "structured"  # the only pattern it has
    return name if pattern == "unstructured" else f"{name}[{pattern}]"


def pattern_sparsity(label: str) -> float | None:
    """The sparsity an N:M method has whatever the study's sparsities (1 - N/M); None for the others."""
    from tamt_ds.patterns import parse_pattern

    pattern = parse_pattern(split_method(label)[1])
    return 1.0 - pattern.n / pattern.m if pattern.kind == "n:m" else None


def search_steps(args: dict) -> int:
    """Steps a search with these arguments runs: its max_steps, else the search's own default."""
    from tamt_ds.search import SearchArguments  # (lazy: the study's dry run need not load the engine)

    return int(args.get("max_steps", SearchArguments.max_steps))


def mask_cells(cfg: StudyConfig) -> list[MaskCell]:
    cells = [MaskCell(DENSE, 0.0, None)] if cfg.dense_reference else []
    for method in cfg.methods:
        fixed = pattern_sparsity(method)
        for s in cfg.sparsities if fixed is None else [round(fixed, 10)]:
            seeds = [None] if split_method(method)[0] == "omp" else cfg.mask_seeds  # OMP is deterministic
            cells += [MaskCell(method, s, seed) for seed in seeds]
    return cells


def _per_method(value) -> bool:
    """A {method: value} mapping, e.g. learning_rate: {tamt-mlm: 5.0e-5, tamt-kd: 2.0e-5} (a method
    with a pattern, tamt-kd[2:4], takes its own entry, else its method's)."""
    return isinstance(value, dict) and bool(value) and all(split_method(str(k))[0] in TAMT_METHODS for k in value)


def budget_cells(cfg: StudyConfig) -> list[MaskCell]:
    """The search-budget axis's masks: TAMT snapshots and IMP at other prune intervals."""
    axis, cells = cfg.search_budget, []
    for method in cfg.methods:
        base = split_method(method)[0]
        budgets = axis.snapshot_steps if base in TAMT_METHODS else axis.imp_prune_intervals if method == "imp" else []
        fixed = pattern_sparsity(method)
        sparsities = cfg.budget_sparsities if fixed is None else [s for s in [round(fixed, 10)] if _has(cfg.budget_sparsities, s)]
        cells += [MaskCell(method, s, seed, b) for s in sparsities for seed in cfg.mask_seeds
                  for b in sorted(budgets)]
    return cells


def data_cells(cfg: StudyConfig) -> list[tuple[MaskCell, int]]:
    """The train-examples axis: (a mask of the study, N train examples)."""
    return [(cell, n) for cell in mask_cells(cfg) for n in sorted(cfg.train_examples.sizes)
            if cell.method in cfg.data_methods and (cell.method == DENSE or _has(cfg.data_sparsities, cell.sparsity))]


def _has(values: list[float], x: float) -> bool:
    return any(math.isclose(v, x, abs_tol=1e-9) for v in values)


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
    search_budget = _build(SearchBudgetAxis, raw.pop("search_budget", {}) or {}, f"{path}: search_budget")
    train_examples = _build(TrainExamplesAxis, raw.pop("train_examples", {}) or {}, f"{path}: train_examples")
    slurm = _build(SlurmSettings, raw.pop("slurm", {}) or {}, f"{path}: slurm")
    cfg = _build(StudyConfig, raw, path)
    cfg.finetune, cfg.budget, cfg.gpu, cfg.source = finetune, budget, gpu, os.path.abspath(path)
    cfg.slurm = slurm
    cfg.search_budget, cfg.train_examples = search_budget, train_examples
    validate(cfg)
    return cfg


def validate(cfg: StudyConfig) -> None:
    where = cfg.source or "study config"
    cfg.methods = [method_label(m, where) for m in cfg.methods]
    bad = [m for m in cfg.methods if split_method(m)[0] not in METHODS]
    if bad or not cfg.methods:
        raise StudyError(f"{where}: unknown method(s) {bad}: use some of {', '.join(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise StudyError(f"{where}: methods lists {cfg.methods}: name each method and pattern once")
    validate_patterns(cfg, where)
    if isinstance(cfg.train_examples.methods, list):
        cfg.train_examples.methods = [m if m == DENSE else method_label(m, where) for m in cfg.train_examples.methods]
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
    validate_slurm(cfg, where)
    for key in ("nproc", "finetune_nproc"):
        n = getattr(cfg, key)
        if n is not None and (n < 1 or (cfg.launcher == "python" and n != 1)):
            raise StudyError(f"{where}: {key} must be 1 with launcher python (use torchrun or deepspeed for more)")
    if cfg.gpu is not None and cfg.gpu.peak_flops is None:
        raise StudyError(f"{where}: gpu: name {cfg.gpu.name!r} unknown: use one of "
                         f"{', '.join(name.lower() for name, _ in GPU_PEAK_TFLOPS)}")
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
    for section, reserved in (("search", ("objective", "sparsity", "seed", "output_dir", "resume", "sparsity_pattern")),
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
    validate_axes(cfg, where)


def validate_slurm(cfg: StudyConfig, where: str) -> None:
    """The executor and its slurm section: whole numbers in range, jobs that fill whole nodes or fit in one."""
    if cfg.executor not in ("local", "slurm"):
        raise StudyError(f"{where}: executor must be local or slurm, got {cfg.executor!r}")
    s = cfg.slurm
    for name, low in (("gpus_per_node", 0), ("cpus_per_rank", 1), ("max_attempts", 1)):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise StudyError(f"{where}: slurm.{name} must be a whole number >= {low}, got {value!r}")
    if not isinstance(s.poll_seconds, (int, float)) or not s.poll_seconds > 0:
        raise StudyError(f"{where}: slurm.poll_seconds must be a number > 0, got {s.poll_seconds!r}")
    if not isinstance(s.sbatch_args, list) or not all(isinstance(a, str) for a in s.sbatch_args):
        raise StudyError(f"{where}: slurm.sbatch_args must be a list of sbatch options, e.g. [\"--qos=high\"]")
    if cfg.executor == "slurm" and s.gpus_per_node:
        for key in ("nproc", "finetune_nproc"):
            n = getattr(cfg, key)
            if n is not None and n > s.gpus_per_node and n % s.gpus_per_node:
                raise StudyError(f"{where}: {key} {n} does not fill whole nodes of slurm.gpus_per_node "
                                 f"{s.gpus_per_node}: make it a multiple of {s.gpus_per_node} or at most that")


def validate_patterns(cfg: StudyConfig, where: str) -> None:
    """Each method's sparsity pattern exists and the method can make masks of it."""
    from tamt_ds.patterns import parse_pattern

    for label in cfg.methods:
        name, pattern = split_method(label)
        try:
            kind = parse_pattern(pattern).kind
        except InputError as e:
            raise StudyError(f"{where}: method {label}: {e}") from None
        if name == "imp" and kind != "unstructured":
            raise StudyError(f"{where}: method {label}: IMP prunes a fraction of each matrix's weights per round, "
                             f"unstructured only; compare patterns with tamt-* and omp / random / head_importance of "
                             f"the pattern (docs/patterns.md)")
        if name == "head_importance" and kind != "structured":
            raise StudyError(f"{where}: method {label}: head_importance ranks heads and FFN neurons: use it with "
                             f"sparsity_pattern structured")


def validate_axes(cfg: StudyConfig, where: str) -> None:
    """The search_budget and train_examples sections: lists of the study's own sparsities, tasks and
    methods, positive counts, snapshot steps inside every search they apply to."""
    sb, te = cfg.search_budget, cfg.train_examples
    for section, name, values in (("search_budget", "snapshot_steps", sb.snapshot_steps),
                                  ("search_budget", "imp_prune_intervals", sb.imp_prune_intervals),
                                  ("train_examples", "sizes", te.sizes)):
        if not isinstance(values, list) or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values) \
                or len(set(values)) != len(values):
            raise StudyError(f"{where}: {section}.{name} must be a list of distinct whole numbers >= 1, got {values!r}")
    for section, name, values, known in (
            ("search_budget", "sparsities", sb.sparsities, cfg.sparsities),
            ("train_examples", "sparsities", te.sparsities, cfg.sparsities),
            ("search_budget", "tasks", sb.tasks, cfg.finetune.tasks),
            ("train_examples", "tasks", te.tasks, cfg.finetune.tasks),
            ("train_examples", "methods", te.methods, [*cfg.methods, DENSE])):
        if values is not None and (not isinstance(values, list) or not values
                                   or any(not (_has(known, v) if name == "sparsities" else v in known) for v in values)):
            raise StudyError(f"{where}: {section}.{name} must be a list of the study's {name} ({known}), got {values!r}")
    if sb.snapshot_steps:
        if not any(split_method(m)[0] in TAMT_METHODS for m in cfg.methods):
            raise StudyError(f"{where}: search_budget.snapshot_steps needs a TAMT method in methods")
        for s in cfg.budget_sparsities:
            steps = search_steps(cfg.search_args(s))
            late = [n for n in sb.snapshot_steps if n >= steps]
            if late:
                raise StudyError(f"{where}: search_budget.snapshot_steps {late} are not before the search's end at "
                                 f"sparsity {s:g} (max_steps {steps}): the final mask is already a point of the axis")
    if sb.imp_prune_intervals:
        if "imp" not in cfg.methods:
            raise StudyError(f"{where}: search_budget.imp_prune_intervals needs imp in methods")
        if int(cfg.imp.get("prune_interval", 20)) in sb.imp_prune_intervals:
            raise StudyError(f"{where}: search_budget.imp_prune_intervals repeats imp.prune_interval "
                             f"({cfg.imp.get('prune_interval', 20)}): the study's IMP run is already a point of the axis")
