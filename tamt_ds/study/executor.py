"""Where a study's jobs run: an Executor takes self-contained jobs and waits for them.

A job is one command (a launcher and its arguments, `runner.command`) that writes its own
result files, atomically, under the study's output_dir; the runner only reads those files
to plan.  So an executor needs nothing from the controller but the command: the local one
runs it as a child process; the SLURM one (tamt_ds/study/slurm.py: one allocation per job,
submitted once the masks it reads exist, resubmission) behind the same two calls
(docs/study.md, "On SLURM").

    executor.submit(job)   # queue one job
    executor.wait()        # block until every submitted job ended; raise the first failure

LocalExecutor: up to `parallel_jobs` jobs side by side on this machine.  With GPUs, each
running job holds `job.nproc` of them, disjoint from every other running job's, and sees
only those (CUDA_VISIBLE_DEVICES); a job waits for free GPUs.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Protocol

from tamt_ds.study.config import StudyError


class Executor(Protocol):
    def submit(self, job) -> None: ...

    def wait(self) -> None: ...


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them: the inherited setting, else all."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [d.strip() for d in inherited.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA build: a CPU machine
        return []


class GpuPool:
    """Disjoint GPU sets for jobs running at once: take(n) blocks until n GPUs are free."""

    def __init__(self, gpus: list[str]):
        self.free, self.total = list(gpus), len(gpus)
        self.cond = threading.Condition()

    def take(self, n: int) -> list[str]:
        if n > self.total:
            raise StudyError(f"a job needs {n} GPUs, this machine has {self.total}: lower nproc / finetune_nproc "
                             f"in the study config")
        with self.cond:
            self.cond.wait_for(lambda: len(self.free) >= n)
            taken, self.free = self.free[:n], self.free[n:]
            return taken

    def give(self, gpus: list[str]) -> None:
        with self.cond:
            self.free += gpus
            self.cond.notify_all()


class LocalExecutor:
    """Jobs as child processes of this one, `parallel_jobs` at a time (the default executor).

    `run(job, gpus)` runs one job to its end (runner.run_job with the GPUs it holds, [] on a
    CPU machine) and raises on failure; `gpus` (default: visible_gpus()) is the device list
    to deal out -- tests pass a made-up one."""

    def __init__(self, parallel_jobs: int, run: Callable[[object, list[str]], None], gpus: list[str] | None = None):
        self.run = run
        self.pool = GpuPool(visible_gpus() if gpus is None else gpus)
        self.threads = ThreadPoolExecutor(max_workers=parallel_jobs)
        self.futures: list[Future] = []

    def submit(self, job) -> None:
        self.futures.append(self.threads.submit(self._one, job))

    def _one(self, job) -> None:
        gpus = self.pool.take(job.nproc) if self.pool.total else []
        try:
            self.run(job, gpus)
        finally:
            if gpus:
                self.pool.give(gpus)

    def wait(self) -> None:
        done, _ = wait(self.futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for f in self.futures:
                f.cancel()
        self.threads.shutdown(wait=True)
        if failed:
            raise failed[0].exception()
