"""Multi-node launches on one machine, for the launch and failure tests.

A "node" is one launcher process (deepspeed --no_ssh, torchrun --nnodes, srun) with its
own working directory; its ranks are found through the process tree, as an operator
would find them with `ps`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import ROOT, free_port

PYTHON = sys.executable
SEARCH = ROOT / "launchers" / "search.py"
FINETUNE = ROOT / "launchers" / "finetune.py"
CPU_CONFIG = ROOT / "ds_configs" / "zero3_cpu.json"  # stage3_param_persistence_threshold: 0


def search_args(model: str, out, *extra) -> list[str]:
    """A tiny search: a few steps of 2 x 32-token blocks per rank, no evaluation."""
    return ["--model_name_or_path", model, "--output_dir", str(out), "--deepspeed", str(CPU_CONFIG),
            "--per_device_train_batch_size", "2", "--max_seq_length", "32", "--logging_steps", "1",
            "--eval_steps", "0", "--validation_blocks", "2", "--threshold_reset_steps", "2",
            "--learning_rate", "5e-3", *map(str, extra)]


def env(**extra) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("TAMT_DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # in-process tests set some
        out.pop(key, None)
    return {**out, **extra}


def deepspeed_node(hostfile: Path, node_rank: int, port: int, script: Path, args: list[str]) -> list[str]:
    """DeepSpeed's own multi-node path without ssh: one launcher per node, told its rank."""
    return [str(Path(PYTHON).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank",
            str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *args]


def torchrun_node(nnodes: int, node_rank: int, port: int, script: Path, args: list[str], nproc: int = 1) -> list[str]:
    """torchrun with the c10d rendezvous: every node names the same endpoint."""
    return [PYTHON, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
            "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", f"tamt-test-{port}", str(script), *args]


class Launch:
    """Launcher processes started together; their output goes to files in `logs`."""

    def __init__(self, cmds: list[list[str]], logs: Path, cwds: list[Path] | None = None, envs: list[dict] | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.t0 = time.monotonic()
        self.procs = []
        for i, cmd in enumerate(cmds):
            cwd = cwds[i] if cwds else ROOT
            self.procs.append(subprocess.Popen(cmd, cwd=cwd, env=(envs[i] if envs else env()),
                                               stdout=open(logs / f"node{i}.out", "w"),
                                               stderr=open(logs / f"node{i}.err", "w")))

    def wait(self, timeout: float) -> list[int]:
        """Exit codes; every launcher still running after `timeout` s is killed and fails the caller."""
        deadline = self.t0 + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"launch still running after {timeout} s:\n{self.text()[-6000:]}")
        return codes

    def kill(self) -> None:
        for p in self.procs:
            for c in psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []:
                c.kill()
            if p.poll() is None:
                p.kill()
                p.wait()

    def text(self) -> str:
        return "\n".join(f"--- node{i} ---\n{(self.logs / f'node{i}.out').read_text()}\n"
                         f"{(self.logs / f'node{i}.err').read_text()}" for i in range(len(self.procs)))

    def stderr(self) -> str:
        return "\n".join((self.logs / f"node{i}.err").read_text() for i in range(len(self.procs)))

    def ranks(self) -> dict[int, psutil.Process]:
        """Global rank -> training process (the launchers' descendants running the script)."""
        out = {}
        for p in self.procs:
            for c in psutil.Process(p.pid).children(recursive=True):
                try:
                    e = c.environ()
                    # DataLoader workers are forks of their rank (same command and RANK): skip them
                    if "RANK" in e and _runs_script(c) and not _runs_script(c.parent()):
                        out[int(e["RANK"])] = c
                except psutil.Error:
                    pass
        return out


def _runs_script(proc: psutil.Process) -> bool:
    """The process runs a launcher script itself (not a launcher of it)."""
    cmd = proc.cmdline()
    return any(a.endswith(("search.py", "finetune.py")) for a in cmd) and not any(
        a in ("deepspeed.launcher.launch", "torch.distributed.run") for a in cmd)


def wait_for_metrics(path: Path, rows: int, launch: Launch, timeout: float = 300) -> None:
    """Until `path` (metrics.jsonl) has `rows` rows: the run is mid-training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        codes = [p.poll() for p in launch.procs]
        if any(c is not None for c in codes):
            raise AssertionError(f"a launcher ended early {codes}:\n{launch.text()[-6000:]}")
        time.sleep(0.3)
    launch.kill()
    raise AssertionError(f"no {rows} rows in {path} after {timeout} s:\n{launch.text()[-6000:]}")


def error_lines(text: str) -> list[str]:
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def hostfile(path: Path, nodes: int = 2) -> Path:
    path.write_text("".join(f"node{i} slots=1\n" for i in range(nodes)))
    return path


__all__ = ["Launch", "deepspeed_node", "torchrun_node", "search_args", "env", "wait_for_metrics", "error_lines",
           "hostfile", "load_rows", "free_port", "ROOT", "PYTHON", "SEARCH", "FINETUNE"]
