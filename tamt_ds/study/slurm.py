"""`executor: slurm`: each job of a study in its own SLURM allocation, the controller a loop.

A job is the runner's (runner.plan: a launcher and its arguments, its result files, the mask
files it reads); here it becomes a batch script OUTPUT/slurm/<key>.sbatch that runs it as
launchers/slurm/search.sbatch runs a search: one srun task per node (launchers/slurm/node.sh:
torchrun with the node's rank), rank 0's address from SLURM (env.sh).  So a cell runs the same
command under both executors; only the wrapper around it differs (runner.command: torchrun on
this machine).

The controller keeps no state of its own.  Every `poll_seconds` it

    1. asks squeue which of the study's jobs are queued or running (their names carry the
       study's tag and the job's key),
    2. plans again from the result files (runner.plan: what is left),
    3. submits each planned job that is neither queued nor running and whose inputs (the
       mask it fine-tunes or evaluates) exist: the first time, or again after its job left
       the queue without its results (failed, cancelled, timed out, node lost), at most
       `max_attempts` times per controller run,

and ends when nothing is left.  A job writes its results itself, atomically, so a controller
that dies loses nothing: run again, it finds the finished cells done and the jobs still
queued or running under their names, and waits for them instead of submitting them twice.
Dependencies are the files: a fine-tune is submitted once its mask exists, whichever job
wrote it.  squeue is asked before planning, so that a job ending in between is seen as done
(or as pending and not queued: then it really ended without its results).

Each job that wrote its results and left the queue gets its row in OUTPUT/timings.json, as
under the local executor: its start and end (and CPU time, where SLURM gathers it) from sacct,
else from what the controller saw (squeue's rounds: within poll_seconds); `timed_by` says which.
"""
from __future__ import annotations

import getpass
import hashlib
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from tamt_ds.study.config import REPO_ROOT, STAGES, SlurmSettings, StudyConfig, StudyError


@dataclass(frozen=True)
class Allocation:
    nodes: int
    ranks_per_node: int
    gpus_per_node: int  # 0: ranks on CPUs
    exclusive: bool  # the job fills its nodes: all their CPUs and memory are its own


def allocation(s: SlurmSettings, nproc: int) -> Allocation:
    """Whole nodes for a job at least a node wide (a multi-node search), else part of one (a one-GPU fine-tune)."""
    if not s.gpus_per_node:
        return Allocation(1, nproc, 0, False)
    nodes = math.ceil(nproc / s.gpus_per_node)
    per_node = nproc // nodes
    return Allocation(nodes, per_node, per_node, per_node == s.gpus_per_node)


def study_tag(cfg: StudyConfig) -> str:
    """Prefix of the study's SLURM job names: two studies' jobs never share a name."""
    return "tamt-" + hashlib.sha1(cfg.out.encode()).hexdigest()[:8] + "-"


def job_key(job) -> str:
    """A job's name in SLURM and its script's file name: stable over controller runs (from what it
    writes, not from arguments that change with what is already there, e.g. --overwrite_output_dir)."""
    readable = "".join(c if c.isalnum() or c in "._-" else "_" for c in job.name)[:80]
    return readable + "-" + hashlib.sha1("\n".join(job.outputs).encode()).hexdigest()[:8]


def allocation_options(cfg: StudyConfig, job) -> list[str]:
    """The sbatch options of the job's allocation: what it asks SLURM for (its script's; --dry-run prints them)."""
    s, a = cfg.slurm, allocation(cfg.slurm, job.nproc)
    options = [f"--nodes={a.nodes}", "--ntasks-per-node=1"]
    options += [f"--gpus-per-node={a.gpus_per_node}"] if a.gpus_per_node else []
    options += ["--exclusive"] if a.exclusive else [f"--cpus-per-task={s.cpus_per_rank * a.ranks_per_node}"]
    options += [f"--{key}={value}" for key, value in (("partition", s.partition), ("account", s.account),
                                                       ("time", s.time)) if value]
    return options + s.sbatch_args


def describe_request(cfg: StudyConfig, job) -> str:
    """One line for --dry-run: the allocation's sbatch options, and what SLURM decides where the config does not."""
    options = allocation_options(cfg, job)
    unset = [f"no --{key}: {fallback}" for key, fallback in (("partition", "the cluster's default"),
                                                             ("time", "the partition's limit"))
             if not any(o.startswith(f"--{key}=") for o in options)]
    return "sbatch " + " ".join(options) + (f" ({'; '.join(unset)})" if unset else "")


def batch_script(cfg: StudyConfig, job, name: str, log: str) -> str:
    """The job as an sbatch script (submittable by hand too: `sbatch OUTPUT/slurm/KEY.sbatch`)."""
    a = allocation(cfg.slurm, job.nproc)
    options = [f"--job-name={name}", f"--output={log}",
               "--open-mode=append",  # a resubmitted job's output goes below its earlier attempts'
               *allocation_options(cfg, job)]
    lines = ["#!/bin/bash", f"# study {cfg.name!r}: {job.stage}: {job.name} (tamt_ds/study/slurm.py)",
             *(f"#SBATCH {o}" for o in options),
             "set -euo pipefail",
             f"cd {shlex.quote(str(REPO_ROOT))}",
             # this interpreter, as the local executor's; the ranks per node: env.sh would count GPUs only
             f"export PYTHON={shlex.quote(sys.executable)} NPROC_PER_NODE={a.ranks_per_node} "
             "TOKENIZERS_PARALLELISM=false",
             "source launchers/slurm/env.sh",
             f'echo "$(date "+%F %T") job $SLURM_JOB_ID: {job.stage}: $NNODES node(s) x $NPROC_PER_NODE rank(s), '
             f'rank 0 on $MASTER_ADDR:$MASTER_PORT"',
             f'srun "${{SRUN_ARGS[@]}}" launchers/slurm/node.sh {shlex.join([job.script, *job.args])}']
    return "\n".join(lines) + "\n"


class Slurm:
    """The batch system's clients, as subprocesses (SLURM_CONF and the rest from the environment)."""

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def submit(self, script: str) -> str:
        proc = self.run("sbatch", "--parsable", script)
        if proc.returncode != 0:
            raise StudyError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}: fix the "
                             f"study's slurm section (partition, account, time, gpus_per_node, sbatch_args)")
        return proc.stdout.strip().split(";")[0]

    def queued(self, prefix: str) -> dict[str, tuple[str, str]] | None:
        """{job name: (job id, state)} of this user's jobs named `prefix`...; None when squeue did not
        answer (a busy controller): then nothing may be taken as ended."""
        try:
            proc = self.run("squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T|%j")
        except (subprocess.TimeoutExpired, OSError):
            return None
        return parse_squeue(proc.stdout, prefix) if proc.returncode == 0 else None

    def times(self, job_id: str) -> JobTimes | None:
        """When the job ran, from sacct: the accounting database, else the job completion file (a
        cluster with neither, or a job not recorded yet: None)."""
        for source in ([], ["-c"]):
            try:
                proc = self.run("sacct", *source, "-n", "-P", "-X", "-j", job_id, "-o", "Start,End,TotalCPU")
            except (subprocess.TimeoutExpired, OSError):
                return None
            found = parse_sacct(proc.stdout) if proc.returncode == 0 else None
            if found is not None:
                return found
        return None


@dataclass(frozen=True)
class JobTimes:
    """When a job ran (seconds since the epoch) and, where SLURM's accounting gathers it, its CPU time."""
    started: float
    ended: float
    cpu_seconds: float | None


def parse_sacct(text: str) -> JobTimes | None:
    """`sacct -n -P -X -o Start,End,TotalCPU` of one job; None until it has an end (still running,
    or not yet in the accounting).  TotalCPU 0: not gathered (jobacct_gather/none), left out."""
    for line in text.splitlines():
        start, end, cpu = (line.strip().split("|") + ["", ""])[:3]
        try:
            started, ended = (datetime.fromisoformat(t).timestamp() for t in (start, end))
        except ValueError:  # Unknown, None
            return None
        return JobTimes(started, ended, slurm_duration(cpu) or None)
    return None


def slurm_duration(text: str) -> float:
    """SLURM's [D-][HH:]MM:SS[.mmm] in seconds (0 for nothing)."""
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [float(p) for p in clock.split(":")] if clock else []
        return int(days or 0) * 86400 + sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    except ValueError:
        return 0.0


def parse_squeue(text: str, prefix: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines():
        job_id, state, name = line.strip().split("|", 2)
        if name.startswith(prefix):
            out[name] = (job_id, state)
    return out


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def slurm_note(log: str) -> str | None:
    """SLURM's own last word in a job's output: `*** JOB 12 ON n01 CANCELLED AT ... ***` (also DUE TO
    TIME LIMIT, NODE FAILURE, PREEMPTION), wherever it is among the dying ranks' output at the end."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - (1 << 16)))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    notes = re.findall(r"\*\*\* JOB .*? \*\*\*", tail)
    return notes[-1] if notes else None


class SlurmExecutor:
    """The controller loop (module docstring).  `pending()` is the runner's plan, made again from
    the files each round; `say` prints one line; `slurm` and `sleep` are replaceable for tests."""

    def __init__(self, cfg: StudyConfig, pending: Callable[[], list], say: Callable[[str], None] = print,
                 slurm: Slurm | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time):
        self.cfg, self.pending, self.say = cfg, pending, say
        self.slurm, self.sleep, self.clock = slurm or Slurm(), sleep, clock
        self.prefix = study_tag(cfg)
        self.attempts: Counter[str] = Counter()  # submissions per job key, this controller run
        # what the controller saw of each job (name), for timings.json where sacct knows nothing
        self.pending_at: dict[str, float] = {}  # the last round squeue listed it pending
        self.running_since: dict[str, float] = {}  # the first round squeue listed it started
        self.finished: dict[str, tuple[str, object, float]] = {}  # results there, not timed yet: (id, job, seen at)
        self.timed: defaultdict[str, list] = defaultdict(list)  # stage -> [(job, JobTimes)]

    def submit(self, job) -> None:
        """Nothing to queue here: wait() plans again from the files (the Executor protocol's other half)."""

    def wait(self) -> None:
        from tamt_ds.study.runner import log_error, log_name

        limit, seen = self.cfg.slurm.max_attempts, {}  # seen: name -> (id, job) queued last round
        lingering = 3  # rounds the study waits at its end for its last jobs to leave the queue
        while True:
            queued = self.slurm.queued(self.prefix)
            if queued is None:
                self.sleep(self.cfg.slurm.poll_seconds)
                continue
            now = self.clock()
            for name, (_, state) in queued.items():
                if state in ("PENDING", "CONFIGURING"):
                    self.pending_at[name] = now
                else:
                    self.running_since.setdefault(name, now)
            jobs = {self.prefix + job_key(j): j for j in self.pending()}
            for name, (job_id, job) in seen.items():
                if name not in jobs:  # (squeue may list it a while longer: COMPLETING)
                    self.say(f"      job {job_id} wrote its results: {job.stage}: {job.name}")
                    self.finished[name] = (job_id, job, now)
            self._time_finished(queued)
            given_up = []
            for name, job in jobs.items():
                if name in queued:
                    if name not in seen and not self.attempts[job_key(job)]:
                        self.say(f"attached to job {queued[name][0]} ({queued[name][1]}, submitted by an earlier "
                                 f"run): {job.stage}: {job.name}")
                    continue
                if not all(os.path.isfile(p) for p in job.needs):
                    continue  # its mask is still being made
                key, log = job_key(job), os.path.join(self.cfg.out, "logs", log_name(job))
                if self.attempts[key] >= limit:
                    given_up.append((job, log))
                    continue
                if name in seen:  # queued last round, pending and gone now
                    reason = log_error(log) or slurm_note(log) or "no error line in its log"
                    self.say(f"      job {seen[name][0]} ended without its results "
                             f"({reason}): {job.name}; resubmitting (attempt {self.attempts[key] + 1} of {limit})")
                job_id = self._submit(job, name, key, log)
                self.attempts[key] += 1
                queued[name] = (job_id, "PENDING")
                self.pending_at[name] = now
                self.running_since.pop(name, None)  # an earlier attempt's
            seen = {name: (queued[name][0], job) for name, job in jobs.items() if name in queued}
            if not jobs:
                if self.finished and lingering:  # still listed (COMPLETING): sacct has no end for them yet
                    lingering -= 1
                    self.sleep(self.cfg.slurm.poll_seconds)
                    continue
                self._time_finished(None)  # those squeue still lists after that: now
                self._time_stages()
                return
            if not seen:  # nothing queued or running, nothing could be submitted: stuck
                raise StudyError(self._stuck(jobs.values(), given_up))
            self.sleep(self.cfg.slurm.poll_seconds)

    def _time_finished(self, queued: dict | None) -> None:
        """A row of timings.json for each job that wrote its results and left the queue (all: None):
        its start and end from sacct, else as the controller saw them -- from the first round squeue
        listed it started (or last listed it pending) to the round that found its results, each
        within poll_seconds of the truth."""
        from tamt_ds.study.runner import record_timing

        for name in [n for n in self.finished if queued is None or n not in queued]:
            job_id, job, seen_at = self.finished.pop(name)
            times, timed_by = self.slurm.times(job_id), "sacct"
            if times is None:
                start = self.running_since.get(name, self.pending_at.get(name, seen_at))
                times, timed_by = JobTimes(start, seen_at, None), "squeue"
            a = allocation(self.cfg.slurm, job.nproc)
            record_timing(self.cfg, job, times.ended - times.started, times.cpu_seconds,
                          started=_stamp(times.started), finished=_stamp(times.ended), slurm_job=job_id,
                          gpus=a.nodes * a.gpus_per_node, timed_by=timed_by)
            self.timed[job.stage].append((job, times))

    def _time_stages(self) -> None:
        """A "(stage)" row per stage, as the local executor writes: here from its first job's start to
        its last job's end (stages overlap: a fine-tune starts once its own mask is there)."""
        from tamt_ds.study.runner import Job, record_timing

        for stage in sorted(self.timed, key=STAGES.index):
            done = self.timed[stage]
            started, ended = min(t.started for _, t in done), max(t.ended for _, t in done)
            record_timing(self.cfg, Job(stage, "(stage)", "", [], sum(j.cpu_s for j, _ in done),
                                        sum(j.cells for j, _ in done)), ended - started, 0.0,
                          started=_stamp(started), finished=_stamp(ended))

    def _submit(self, job, name: str, key: str, log: str) -> str:
        from tamt_ds.checkpoint import atomic_write_text

        script = os.path.join(self.cfg.out, "slurm", key + ".sbatch")
        os.makedirs(os.path.dirname(script), exist_ok=True)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        atomic_write_text(script, batch_script(self.cfg, job, name, log))
        job_id = self.slurm.submit(script)
        a = allocation(self.cfg.slurm, job.nproc)
        self.say(f"submitted job {job_id}: {job.stage}: {job.name} ({a.nodes} node(s) x {a.ranks_per_node} "
                 f"{'GPU(s)' if a.gpus_per_node else 'rank(s) on CPUs'}); log: {log}")
        return job_id

    def _stuck(self, jobs, given_up: list) -> str:
        if given_up:
            job, log = given_up[0]
            return (f"{job.name} ended {self.cfg.slurm.max_attempts} time(s) without its results "
                    f"(slurm.max_attempts) and {len(jobs) - 1} other job(s) are left; its log: {log}; fix it and "
                    f"rerun the study (finished cells are kept)")
        job = next(iter(jobs))
        missing = [p for p in job.needs if not os.path.isfile(p)]
        return f"{job.name} waits for {missing[0]}, which no job of the study writes: see {self.cfg.out}/logs"
