"""A real one-node SLURM cluster for the `-m cluster` tier (scripts/slurm_cluster.sh, started by
`make test-cluster`): submit with sbatch, follow with squeue, read how a job ended with sacct
(from the controller's job completion file: there is no slurmdbd)."""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster import ROOT, env

CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"


@dataclass
class Job:
    id: str
    output: Path  # the job's stdout and stderr, its steps' included

    def text(self) -> str:
        # errors="replace": a job still writing may have cut a multi-byte character (a progress bar) in two
        return self.output.read_text(errors="replace") if self.output.exists() else ""


class Slurm:
    """Clients of the cluster that `scripts/slurm_cluster.sh up` started."""

    def __init__(self):
        proc = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["status failed"])[-1]
            pytest.fail(f"no SLURM cluster is up ({reason}): run `make test-cluster` (root)", pytrace=False)
        self.conf = proc.stdout.strip().removeprefix("SLURM_CONF=")

    @property
    def node(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%N").stdout.strip()

    def run(self, *cmd: str, check: bool = True, **extra_env) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(SLURM_CONF=self.conf, **extra_env), capture_output=True,
                              text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: Path, args: list, output: Path, *options: str, **extra_env) -> Job:
        """`sbatch OPTIONS script ARGS` from the repository root, as docs/cluster.md submits;
        the submitting environment (PYTHONPATH, extra_env) goes with the job."""
        output.parent.mkdir(parents=True, exist_ok=True)
        proc = self.run("sbatch", "--parsable", f"--output={output}", *options, str(script), *map(str, args),
                        **extra_env)
        return Job(proc.stdout.strip().split(";")[0], output)

    def state(self, job: Job) -> str:
        """PENDING / RUNNING / ... while squeue lists the job; '' once it ended.  A squeue that
        got no answer (a loaded machine: munge and slurmctld wait for a CPU too) says UNKNOWN."""
        try:
            proc = self.run("squeue", "-h", "-j", job.id, "-o", "%T", check=False)
        except subprocess.TimeoutExpired:
            return "UNKNOWN"
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            return "UNKNOWN"
        return proc.stdout.strip()

    def wait(self, job: Job, timeout: float = 900) -> tuple[str, str]:
        """Until the job left squeue; then its end state and exit code from sacct."""
        deadline = time.monotonic() + timeout
        while self.state(job):
            if time.monotonic() > deadline:
                self.run("scancel", job.id, check=False)
                raise AssertionError(f"job {job.id} still queued or running after {timeout} s:\n{job.text()[-6000:]}")
            time.sleep(2)
        for _ in range(30):  # the completion record is written as the job ends
            rows = self.run("sacct", "-c", "-j", job.id, "-n", "-P", "-o", "State,ExitCode").stdout.split()
            if rows:
                state, code = rows[-1].split("|")
                return state, code
            time.sleep(1)
        raise AssertionError(f"sacct has no record of job {job.id}")

    def wait_until(self, job: Job, ready, timeout: float = 900) -> None:
        """Until ready() while the job runs; fails when the job ends first."""
        deadline, next_check = time.monotonic() + timeout, 0.0
        while not ready():
            if time.monotonic() > deadline:
                self.run("scancel", job.id, check=False)
                raise AssertionError(f"job {job.id} not at the awaited point after {timeout} s:\n{job.text()[-6000:]}")
            if time.monotonic() > next_check:  # squeue is an RPC, seconds long on a loaded machine
                if not self.state(job):
                    raise AssertionError(f"job {job.id} ended before the awaited point:\n{job.text()[-6000:]}")
                next_check = time.monotonic() + 5
            time.sleep(0.1)

    def cancel(self, job: Job) -> None:
        self.run("scancel", job.id)


def cpu_script(script: Path, dest: Path) -> Path:
    """docs/cluster.md's copy for a cluster without GPUs: `sed /--gpus-per-node/d script`."""
    dest.write_text("".join(l for l in script.read_text().splitlines(keepends=True) if "--gpus-per-node" not in l))
    return dest
