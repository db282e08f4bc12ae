"""Run a study: masks -> pre-training losses -> fine-tuning -> table and figures.

    plan (what is left, from the files already there) -> print the stages' cost budget
    -> masks:     one search per TAMT cell, one IMP run per mask seed       (subprocesses)
    -> evaluate:  KD (and MLM) loss of every mask; OMP / random masks written as files
    -> finetune:  one launchers/finetune.py per mask and task, every seed
    -> report:    study.json, study.md, figures (also alone: --plot-only)

Every cell writes its own result file, atomically, and the plan is recomputed from the
files: a killed study continues where it stopped and never redoes a finished search,
IMP level, evaluation or fine-tuning task (a killed search or IMP run resumes from its
own last checkpoint / level).  Each job is a subprocess started with the configured
launcher (python, torchrun or deepspeed), so its memory is gone when it ends; its output
goes to OUTPUT/logs/<job>.log and the console shows one line per job.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tamt_ds.study import cost
from tamt_ds.study.config import BUILT_BASELINES, DENSE, REPO_ROOT, STAGES, TAMT_METHODS, MaskCell, StudyConfig, StudyError, \
    budget_cells, data_cells, mask_cells, search_steps, split_method


@dataclass
class Job:
    stage: str  # masks | evaluate | finetune
    name: str
    script: str  # a launcher, relative to the repository root
    args: list[str]
    cpu_s: float  # estimated CPU seconds (config's budget section)
    cells: int  # result cells this job completes
    outputs: list[str] = field(default_factory=list)  # what it writes (for the log line)
    nproc: int = 1  # ranks: one GPU each where there are GPUs
    gpu_hours: float | None = None  # expected, from FLOPs (the config's gpu section; tamt_ds/study/cost.py)
    needs: list[str] = field(default_factory=list)  # mask files it reads: made by an earlier job (slurm: when to submit)


# ------------------------------------------------------------------ where cells live


def search_dir(cfg: StudyConfig, cell: MaskCell) -> str:
    return os.path.join(cfg.out, "masks", cell.id)


def imp_dir(cfg: StudyConfig, seed: int, interval: int | None = None) -> str:
    """An IMP run's folder: the study's, or the search-budget axis's at another prune interval."""
    return os.path.join(cfg.out, "masks", f"imp_m{seed}" + (f"_every{interval}" if interval is not None else ""))


def mask_path(cfg: StudyConfig, cell: MaskCell) -> str | None:
    """The cell's mask.pt (None for the dense model)."""
    if cell.method == DENSE:
        return None
    if cell.method == "imp":
        return os.path.join(imp_dir(cfg, cell.seed, cell.budget), f"{cell.sparsity:g}", "mask.pt")
    if cell.budget is not None:  # a TAMT snapshot: taken by the study's search of this cell
        from tamt_ds.export import snapshot_dir

        main = MaskCell(cell.method, cell.sparsity, cell.seed)
        return os.path.join(snapshot_dir(search_dir(cfg, main), cell.budget), "mask.pt")
    return os.path.join(search_dir(cfg, cell), "mask.pt")  # TAMT: the search's; OMP / random / ...: written by evaluate


def eval_path(cfg: StudyConfig, cell: MaskCell) -> str:
    return os.path.join(cfg.out, "eval", f"{cell.id}.json")


def finetune_dir(cfg: StudyConfig, cell: MaskCell, task: str | None = None, n: int | None = None) -> str:
    """The mask's fine-tuning folder, or one task's (a harness task: its folder is the harness's slug);
    `n`: on a subset of n train examples (the train-examples axis), in the subfolder n<N>."""
    from tamt_ds.downstream.arguments import slug

    root = os.path.join(cfg.out, "finetune", cell.id, *([f"n{n}"] if n is not None else []))
    return root if task is None else os.path.join(root, slug(task))


def shared_data_dir(cfg: StudyConfig) -> str:
    path = cfg.path(cfg.finetune.task_data_dir)
    if not os.path.isdir(path):
        raise StudyError(f"downstream data directory {path} not found: put the shared data (supersense_verb/, "
                         f"wic_wn/, ...) at ../shared/data next to the repository, or set finetune.task_data_dir")
    return path


def task_ids(cfg: StudyConfig) -> dict[str, str]:
    """Study task name -> the fine-tuning harness's task (a hub task name or local:DIR)."""
    from tamt_ds.downstream.build_task import BUILT_TASKS  # the project's own, built from a Debian package
    from tamt_ds.downstream.tasks import KNOWN_TASKS, LOCAL_PREFIX

    out = {}
    for name in cfg.finetune.tasks:
        if name in KNOWN_TASKS:
            out[name] = name
        elif name.startswith(LOCAL_PREFIX):
            out[name] = LOCAL_PREFIX + cfg.path(name[len(LOCAL_PREFIX):])
        else:
            built = os.path.join(BUILT_TASKS, name)
            directory = built if os.path.isfile(os.path.join(built, "train.tsv")) else os.path.join(
                shared_data_dir(cfg), name)
            if not os.path.isfile(os.path.join(directory, "train.tsv")):
                raise StudyError(f"task {name!r}: {directory}/train.tsv not found: name a GLUE / SQuAD task, "
                                 f"local:DIR, a folder of {shared_data_dir(cfg)}, or one of {BUILT_TASKS}")
            out[name] = LOCAL_PREFIX + directory
    return out


def train_size(cfg: StudyConfig, name: str) -> int | None:
    """Examples in a study task's whole train split (local tasks; None for a hub task)."""
    task = task_ids(cfg)[name]
    if not task.startswith("local:"):
        return None
    with open(os.path.join(task[len("local:"):], "train.tsv"), encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def finetune_results(cfg: StudyConfig, cell: MaskCell, n: int | None = None) -> dict[str, dict | None]:
    """Study task name -> the harness's results.json for this mask (None when absent); `n`: on n train examples."""
    found = {}
    root = finetune_dir(cfg, cell, n=n)
    if os.path.isdir(root):
        for sub in sorted(os.listdir(root)):
            r = read_json(os.path.join(root, sub, "results.json"))
            if r is not None:
                found[r["task"]] = r
    return {name: found.get(harness) for name, harness in task_ids(cfg).items()}


def task_complete(cfg: StudyConfig, result: dict | None) -> bool:
    return bool(result) and result.get("complete") and result.get("seeds") == list(cfg.finetune.seeds)


# how often a run logs, evaluates or saves: a mask does not depend on them
_BOOKKEEPING = ("logging_steps", "eval_steps", "save_steps", "save_total_limit", "dist_timeout")


def check_unchanged(path: str, recorded: dict | None, wanted: dict, ignore: tuple[str, ...] = _BOOKKEEPING) -> None:
    """A finished cell counts only if it ran with the config's arguments: a study whose protocol
    was edited must not mix old results with new ones."""
    def same(a, b) -> bool:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return float(a) == float(b)
        return a == b or str(a) == str(b)

    for key, value in wanted.items():
        if recorded and key in recorded and key not in ignore and not same(recorded[key], value):
            raise StudyError(f"{path} was run with {key} {recorded[key]!r}, the config says {value!r}: delete it "
                             f"to redo it with the config's arguments, or give the study another output_dir")


def check_run_unchanged(cfg: StudyConfig, folder: str, args: dict) -> None:
    """check_unchanged for a search's or IMP run's folder (its run_config.json, sections merged)."""
    recorded = {}
    for section in (read_json(os.path.join(folder, "run_config.json")) or {}).values():
        if isinstance(section, dict):
            recorded.update(section)
    check_unchanged(folder, recorded, {"model_name_or_path": cfg.model_name_or_path, **args})


# ----------------------------------------------------------------------- planning


def common_args(cfg: StudyConfig) -> list[str]:
    args = ["--model_name_or_path", cfg.model_name_or_path]
    return args + (["--deepspeed", cfg.path(cfg.deepspeed)] if cfg.deepspeed else [])


def cli(options: dict) -> list[str]:
    """{name: value} -> launcher arguments (lists repeat values; booleans are flags)."""
    out = []
    for key, value in options.items():
        if isinstance(value, bool):
            out += [f"--{key}", str(value)]
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", *map(str, value)]
        elif value is not None:
            out += [f"--{key}", str(value)]
    return out


def _eval_files(cfg: StudyConfig) -> dict:
    opts = dict(cfg.evaluate)
    if "eval_files" in opts:
        opts["eval_files"] = [cfg.path(p) for p in opts["eval_files"]]
    return opts


def _finetune_steps(args: dict, task: str, nproc: int) -> int:
    """Optimizer steps per seed, for the budget: the harness's own count (epochs over the train set
    or its subset, capped by max_steps: a 250-example subset at max_steps 160 runs 24 steps of 32)."""
    from tamt_ds.downstream.arguments import FinetuneArguments
    from tamt_ds.downstream.finetune import steps_for

    n = args.get("train_subset")
    if n is None and task.startswith("local:"):
        with open(os.path.join(task[len("local:"):], "train.tsv"), encoding="utf-8") as f:
            n = sum(1 for _ in f) - 1
    n = n or cost.TASK_SIZES.get(task, (None,))[0]  # GLUE / SQuAD: the published size
    if n is None and args.get("max_steps"):  # another hub task: its size unknown here
        return int(args["max_steps"])
    schedule = FinetuneArguments(
        per_device_train_batch_size=int(args.get("per_device_train_batch_size", 32)),
        gradient_accumulation_steps=int(args.get("gradient_accumulation_steps", 1)),
        num_train_epochs=float(args.get("num_train_epochs", 3.0)),
        max_steps=int(args["max_steps"]) if args.get("max_steps") else None)
    return steps_for(schedule, int(n or 10_000), nproc)[0]  # 10,000: a guess


def _finetune_cpu_s(cfg: StudyConfig, name: str, task: str, n: int | None = None) -> float:
    """Estimated CPU seconds of one mask's fine-tuning on one task (on n train examples), every seed."""
    b, args = cfg.budget, {**cfg.finetune.args_for(name), **({"train_subset": n} if n is not None else {})}
    step_s = b.finetune_step_cpu_s + b.finetune_example_cpu_s * int(args.get("per_device_train_batch_size", 32))
    seeds = len(cfg.finetune.seeds)
    return b.process_start_cpu_s + seeds * (_finetune_steps(args, task, finetune_nproc(cfg)) * step_s
                                            + b.finetune_run_cpu_s)


def finetune_nproc(cfg: StudyConfig) -> int:
    return cfg.finetune_nproc or cfg.nproc


def plan(cfg: StudyConfig) -> tuple[list[Job], dict]:
    """The jobs still to run, in order, and counts of cells done / total."""
    b = cfg.budget
    cells = mask_cells(cfg)
    hours = cost.StudyGpuHours(cfg)
    jobs: list[Job] = []
    counts = {"done": 0, "total": 0}

    def count(done: bool, n: int = 1) -> bool:
        counts["total"] += n
        counts["done"] += n if done else 0
        return done

    # masks: TAMT searches (with the search-budget axis's snapshots), IMP runs (one per mask seed
    # and prune interval, all levels)
    snapshots = budget_cells(cfg)
    for cell in cells:
        if cell.base not in TAMT_METHODS:
            continue
        args = cfg.search_args(cell.sparsity, cell.method)
        pattern = split_method(cell.method)[1]
        if pattern != "unstructured":
            args = {**args, "sparsity_pattern": pattern}
        # finished or started (a resumed search would go on with the new arguments from the old state)
        check_run_unchanged(cfg, search_dir(cfg, cell), args)
        mine = [cell] + [c for c in snapshots if (c.method, c.sparsity, c.seed) == (cell.method, cell.sparsity, cell.seed)]
        done = [count(os.path.isfile(mask_path(cfg, c))) for c in mine]
        if not all(done):
            objective = TAMT_METHODS[cell.base]
            steps = search_steps(args)
            step_s = b.search_step_cpu_s if objective == "kd" else b.search_mlm_step_cpu_s
            jobs.append(Job("masks", f"search {cell.id}", "launchers/search.py",
                            common_args(cfg) + ["--objective", objective, "--sparsity", f"{cell.sparsity:g}",
                                                "--seed", str(cell.seed), "--output_dir", search_dir(cfg, cell),
                                                "--resume", "True"] + cli(args),
                            b.process_start_cpu_s + steps * step_s, sum(not d for d in done), [mask_path(cfg, cell)],
                            cfg.nproc, hours.search(objective, args, steps)))
    if "imp" in cfg.methods:
        for seed in cfg.mask_seeds:
            jobs += imp_job(cfg, seed, None, cfg.sparsities, count, hours)
            for interval in sorted(cfg.search_budget.imp_prune_intervals):
                jobs += imp_job(cfg, seed, interval, cfg.budget_sparsities, count, hours)

    # evaluate: every mask's pre-training losses; OMP / random masks saved as files for fine-tuning.
    # --mask_seed is one value per process: random masks of different seeds go to different jobs,
    # the other masks ride with the first.
    pending = []
    for cell in cells + [c for c in snapshots if c.base in ("imp", *TAMT_METHODS)]:
        file_missing = cell.base in BUILT_BASELINES and not os.path.isfile(mask_path(cfg, cell))
        if not count(os.path.isfile(eval_path(cfg, cell)) and not file_missing):
            pending.append(cell)
    groups: dict[int, list[MaskCell]] = {}
    for cell in pending:
        if cell.seed is not None and cell.base in BUILT_BASELINES:  # random, head_importance
            groups.setdefault(cell.seed, []).append(cell)
    seeded = {c for g in groups.values() for c in g}
    if any(c not in seeded for c in pending):
        first = next(iter(groups), 0)
        groups[first] = [c for c in pending if c not in seeded] + groups.get(first, [])
    for key, group in groups.items():
        masks, outputs, saves = [], [], []
        for cell in group:
            if cell.method == DENSE:
                masks.append("none")
            elif cell.base in BUILT_BASELINES:
                masks.append(baseline_name(cell))
            else:
                masks.append(mask_path(cfg, cell))
            outputs.append(eval_path(cfg, cell))
            saves.append(mask_path(cfg, cell) if cell.base in BUILT_BASELINES else "-")
        jobs.append(Job("evaluate", f"evaluate {len(group)} mask(s)",
                        "launchers/evaluate_mask.py",
                        common_args(cfg) + ["--mask", *masks, "--output", *outputs, "--save_mask", *saves,
                                            "--mask_seed", str(key)] + cli(_eval_files(cfg)),
                        b.process_start_cpu_s + len(group) * b.eval_mask_cpu_s, len(group), outputs, cfg.nproc,
                        hours.evaluate(len(group)),
                        [mask_path(cfg, c) for c in group if c.method != DENSE and c.base not in BUILT_BASELINES]))

    # finetune: one job per mask and task (all seeds), so that each task keeps its own protocol;
    # the longest first, so that the stage ends with short jobs side by side, not one long one alone
    # (the search-budget axis's masks on its tasks, the train-examples axis's on subsets)
    finetune, tasks = [], task_ids(cfg)
    wanted = [(cell, None, cfg.finetune.tasks) for cell in cells] + [(c, None, cfg.budget_tasks) for c in snapshots] \
        + [(cell, n, cfg.data_tasks) for cell, n in data_cells(cfg)]
    for cell, n, names in wanted:
        results = finetune_results(cfg, cell, n)
        for name in names:
            task, out = tasks[name], finetune_dir(cfg, cell, tasks[name], n)
            args = {**cfg.finetune.args_for(name), **({"train_subset": n} if n is not None else {})}
            if task_complete(cfg, results[name]):  # an unfinished task is redone whole, with the new arguments
                check_unchanged(out, results[name].get("args"), {"model_name_or_path": cfg.model_name_or_path, **args},
                                ignore=("logging_steps", "dist_timeout"))  # eval_steps: the best dev evaluation
            if count(task_complete(cfg, results[name])):
                continue
            finetune.append(Job("finetune", f"finetune {cell.id} on {name}" + (f" ({n} examples)" if n else ""),
                                "launchers/finetune.py",
                                common_args(cfg) + ["--mask", mask_path(cfg, cell) or "none", "--task", task,
                                                    "--seeds", ",".join(map(str, cfg.finetune.seeds)),
                                                    "--output_dir", out]
                                + (["--overwrite_output_dir", "True"] if results[name] is not None else [])
                                + cli(args),
                                _finetune_cpu_s(cfg, name, task, n), 1, [out], finetune_nproc(cfg),
                                hours.finetune(task, args), [p for p in [mask_path(cfg, cell)] if p]))
    jobs += sorted(finetune, key=lambda job: -job.cpu_s)
    return jobs, counts


def baseline_name(cell: MaskCell) -> str:
    """evaluate_mask's name of a baseline cell: omp:S, random:2:4, omp:structured:S, head_importance:S."""
    pattern = split_method(cell.method)[1]
    if pattern == "unstructured" or cell.base == "head_importance":
        return f"{cell.base}:{cell.sparsity:g}"
    return f"{cell.base}:{pattern}" if ":" in pattern else f"{cell.base}:{pattern}:{cell.sparsity:g}"


def imp_job(cfg: StudyConfig, seed: int, interval: int | None, sparsities: list[float], count,
            hours: cost.StudyGpuHours) -> list[Job]:
    """The IMP run of a mask seed at the study's prune interval (None) or another, if a mask it
    makes at `sparsities` is missing (every level up to the highest one)."""
    b, folder = cfg.budget, imp_dir(cfg, seed, interval)
    levels = cfg.imp_levels(max(sparsities))
    args = {**cfg.imp, **({"prune_interval": interval} if interval is not None else {})}
    wanted = [MaskCell("imp", s, seed, interval) for s in sparsities]
    check_run_unchanged(cfg, folder, args)
    done = [count(os.path.isfile(mask_path(cfg, c))) for c in wanted]
    if all(done):
        return []
    left = sum(not os.path.isfile(os.path.join(folder, f"{lv:g}", "mask.pt")) for lv in levels)
    steps = int(args.get("prune_interval", 20))
    return [Job("masks", f"imp m{seed}" + (f" every {interval} steps" if interval is not None else "")
                + f" (levels {levels[0]:g}..{levels[-1]:g})", "launchers/imp.py",
                common_args(cfg) + ["--max_sparsity", f"{levels[-1]:g}", "--seed", str(seed), "--output_dir", folder,
                                    "--resume", "True"] + cli(args),
                b.process_start_cpu_s + left * (steps * b.imp_step_cpu_s + b.imp_round_cpu_s),
                sum(not d for d in done), [os.path.dirname(mask_path(cfg, c)) for c in wanted],
                cfg.nproc, hours.search("imp", args, left * steps))]


def stage_minutes(cfg: StudyConfig, jobs: list[Job]) -> float:
    """Estimated wall minutes of a stage's jobs on the reference machine."""
    b = cfg.budget
    cores = min(cfg.parallel_jobs, len(jobs), b.cores) if cfg.parallel_jobs > 1 else b.single_job_cores
    return sum(j.cpu_s for j in jobs) / max(cores, 1.0) / 60


def print_budget(cfg: StudyConfig, jobs: list[Job], counts: dict) -> None:
    b = cfg.budget
    print(f"study {cfg.name!r} ({cfg.source}) -> {cfg.out}", flush=True)
    print(f"{counts['done']} of {counts['total']} cells done; {len(jobs)} job(s) to run", flush=True)
    if cfg.gpu is not None:
        print_gpu_hours(cfg, jobs)
        return
    print(f"estimated time on the reference machine ({b.cores} CPU cores, nothing else running; "
          f"{cfg.parallel_jobs} job(s) at a time; the budget section of the config):")
    print(f"  {'stage':<10}{'jobs':>6}{'cells':>7}{'CPU min':>9}{'minutes':>9}")
    total = 0.0
    for stage in STAGES:
        mine = [j for j in jobs if j.stage == stage]
        minutes = stage_minutes(cfg, mine) if mine else 0.0
        total += minutes
        print(f"  {stage:<10}{len(mine):>6}{sum(j.cells for j in mine):>7}{sum(j.cpu_s for j in mine) / 60:>9.1f}"
              f"{minutes:>9.1f}")
    print(f"  {'total':<32}{total:>9.1f}   (budget {b.minutes:g} min)", flush=True)
    if total > b.minutes:
        print(f"  note: the plan exceeds the budget by {total - b.minutes:.1f} min", flush=True)


def print_gpu_hours(cfg: StudyConfig, jobs: list[Job]) -> None:
    from tamt_ds.study.cost import describe

    print(f"expected GPU-hours ({describe(cfg.gpu)}):")
    print(f"  {'stage':<10}{'jobs':>6}{'cells':>7}{'GPUs/job':>10}{'GPU-hours':>11}{'longest job, h':>16}")
    for stage in STAGES:
        mine = [j for j in jobs if j.stage == stage]
        gpus = sorted({j.nproc for j in mine})
        print(f"  {stage:<10}{len(mine):>6}{sum(j.cells for j in mine):>7}{'/'.join(map(str, gpus)) or '-':>10}"
              f"{sum(j.gpu_hours for j in mine):>11.1f}{max((j.gpu_hours / j.nproc for j in mine), default=0):>16.2f}")
    print(f"  {'total':<33}{sum(j.gpu_hours for j in jobs):>11.1f}", flush=True)


# ------------------------------------------------------------------------ running


def command(cfg: StudyConfig, job: Job) -> list[str]:
    from tamt_ds.engine import free_port  # here: the runner itself never needs torch otherwise

    script = str(REPO_ROOT / job.script)
    bin_dir = os.path.dirname(sys.executable)  # the launchers' console scripts, in this interpreter's environment
    if cfg.launcher == "torchrun":
        return [os.path.join(bin_dir, "torchrun"), "--nproc_per_node", str(job.nproc),
                "--master_port", str(free_port()), script, *job.args]
    if cfg.launcher == "deepspeed":
        return [os.path.join(bin_dir, "deepspeed"), "--num_accelerators", str(job.nproc), "--num_nodes", "1", "--master_port",
                str(free_port()), script, *job.args]
    return [sys.executable, script, *job.args]


def _prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl() if sys.platform == "linux" else None  # bound here: the child only calls it


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """A killed study takes its running jobs down with it (Linux), so a rerun never races an orphan."""
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_job(cfg: StudyConfig, job: Job, log_path: str, gpus: list[str] = ()) -> tuple[float, float]:
    """Run one job (on `gpus`, its own, where there are GPUs); (wall seconds, CPU seconds of its
    processes: a measure of its cost that other jobs on a shared machine do not inflate, used to
    calibrate the budget)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    threads = (cfg.budget.cores or os.cpu_count() or 1) // max(job.nproc * cfg.parallel_jobs, 1)
    if job.nproc > 1 or cfg.parallel_jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    cmd = command(cfg, job)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if _PRCTL is not None else None)
        _, status, usage = os.wait4(proc.pid, 0)  # this job's own CPU time, even with jobs side by side
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            print("\n".join(f.read().splitlines()[-15:]), file=sys.stderr, flush=True)
        reason = log_error(log_path) or f"exit code {proc.returncode}"
        raise StudyError(f"{job.name} failed ({reason}); its log: {log_path}; fix it and rerun the study "
                         f"(finished cells are kept)")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def log_error(log_path: str) -> str | None:
    """The last `error: ...` line (the launchers' one-line errors) near the end of a job's log."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-40:]
    except OSError:
        return None
    errors = [l for l in tail if l.startswith("error:")]
    return errors[-1] if errors else None


def log_name(job: Job) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in job.name)[:120] + ".log"


_TIMINGS_LOCK = threading.Lock()


def record_timing(cfg: StudyConfig, job: Job, seconds: float, cpu_seconds: float | None, **more) -> None:
    """One row of OUTPUT/timings.json (cpu_seconds None: not measured, left out); `more` adds or
    replaces fields (a SLURM job's own start and end: tamt_ds/study/slurm.py)."""
    with _TIMINGS_LOCK:  # jobs of a stage may finish side by side
        _append_timing(cfg, job, seconds, cpu_seconds, more)


def _append_timing(cfg: StudyConfig, job: Job, seconds: float, cpu_seconds: float | None, more: dict) -> None:
    from tamt_ds.checkpoint import atomic_write_text

    path = os.path.join(cfg.out, "timings.json")
    rows = read_json(path) or []
    rows.append({"stage": job.stage, "job": job.name, "cells": job.cells, "seconds": round(seconds, 1),
                 **({"cpu_seconds": round(cpu_seconds, 1)} if cpu_seconds is not None else {}),
                 "estimated_cpu_seconds": round(job.cpu_s, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                 **more})
    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def run_stages(cfg: StudyConfig, jobs: list[Job]) -> None:
    """Stage after stage, each through an executor (tamt_ds/study/executor.py: local child
    processes, `parallel_jobs` side by side, disjoint GPUs).  One line when a job starts (which,
    how many left, the plan's estimate) and when it ends.  `executor: slurm`: every job in its
    own allocation, each submitted once the masks it reads exist (tamt_ds/study/slurm.py)."""
    from tamt_ds.study.executor import Executor, LocalExecutor

    t_start, started, lock = time.perf_counter(), [0], threading.Lock()

    def say(line: str) -> None:  # one write per line: print() writes the newline apart, so threads interleave
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    if cfg.executor == "slurm":
        from tamt_ds.study.slurm import SlurmExecutor

        executor: Executor = SlurmExecutor(cfg, lambda: plan(cfg)[0], say)
        for job in jobs:
            executor.submit(job)
        executor.wait()
        return

    def one(job: Job, gpus: list[str]) -> None:
        with lock:
            started[0] += 1
            n = started[0]
        say(f"[{n}/{len(jobs)}] {job.stage}: {job.name} (est. {job.cpu_s / 60:.1f} CPU-min; "
            f"{len(jobs) - n} job(s) after it)" + (f" on GPU {','.join(gpus)}" if gpus else ""))
        seconds, cpu = run_job(cfg, job, os.path.join(cfg.out, "logs", log_name(job)), gpus)
        record_timing(cfg, job, seconds, cpu)
        say(f"      {job.name}: done in {seconds / 60:.1f} min, {cpu / 60:.1f} CPU-min "
            f"({(time.perf_counter() - t_start) / 60:.1f} min so far)")

    for stage in STAGES:
        mine = [j for j in jobs if j.stage == stage]
        if not mine:
            continue
        t0 = time.perf_counter()
        executor = LocalExecutor(cfg.parallel_jobs, one)  # stages in order: their only dependency
        for job in mine:
            executor.submit(job)
        executor.wait()
        record_timing(cfg, Job(stage, "(stage)", "", [], sum(j.cpu_s for j in mine), sum(j.cells for j in mine)),
                      time.perf_counter() - t0, 0.0)


def run_study(cfg: StudyConfig, *, plot_only: bool = False, dry_run: bool = False) -> dict:
    from tamt_ds.study.report import write_report

    if not plot_only:
        jobs, counts = plan(cfg)
        print_budget(cfg, jobs, counts)
        if dry_run:  # writes nothing
            for job in jobs:
                cost = (f"{job.gpu_hours:.2f} GPU-h on {job.nproc} GPU(s)" if job.gpu_hours is not None
                        else f"{job.cpu_s / 60:.1f} CPU-min")
                print(f"  {job.stage}: {job.name} ({cost})")
                if cfg.executor == "slurm":  # the allocation each job would ask for
                    from tamt_ds.study.slurm import describe_request

                    print(f"      {describe_request(cfg, job)}")
            return {}
        os.makedirs(cfg.out, exist_ok=True)
        run_stages(cfg, jobs)
        jobs, counts = plan(cfg)  # everything should be done now
        if jobs:
            raise StudyError(f"{len(jobs)} job(s) still pending after running them, e.g. {jobs[0].name}: "
                             f"see {cfg.out}/logs")
    return write_report(cfg)
