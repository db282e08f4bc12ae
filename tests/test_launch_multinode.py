"""Multi-node launches (docs/cluster.md), each as two one-rank "nodes" on this machine: the
mask equals the one of a single-node 2-rank run exactly, one log stream, per-rank files
for both global ranks.  Also the SLURM derivation and the shared-filesystem check."""
import json
import os
import stat
import subprocess

import pytest
import torch

from tests.cluster import (PYTHON, ROOT, SEARCH, Launch, free_port, deepspeed_node, env, error_lines, hostfile,
                           load_rows, search_args, torchrun_node)
from tests.conftest import torchrun

STEPS = ["--max_steps", "3", "--save_steps", "3"]


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    """torchrun --nproc_per_node 2: one node, two ranks."""
    out = tmp_path_factory.mktemp("single") / "run"
    torchrun(SEARCH, *search_args(tiny_bert, out, *STEPS))
    return torch.load(out / "mask.pt", weights_only=True)


def check_run(out, reference) -> None:
    mask = torch.load(out / "mask.pt", weights_only=True)
    assert mask.keys() == reference.keys()
    for key in mask:
        assert torch.equal(mask[key], reference[key]), key
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    # Global rank 0 alone logs (both processes are local rank 0 of their node) ...
    assert [r["step"] for r in load_rows(out / "metrics.jsonl")] == [1, 2, 3]
    # ... and each global rank writes its own slice of the checkpoint.
    ckpt = out / "checkpoints" / "step3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["complete.json", "rank0.pt", "rank1.pt"]
    assert json.loads((ckpt / "complete.json").read_text())["world_size"] == 2


def test_deepspeed_no_ssh_two_nodes(reference, tiny_bert, tmp_path):
    """On each node: deepspeed --hostfile H --no_ssh --node_rank i --master_addr A --master_port P."""
    hosts, port, out = hostfile(tmp_path / "hostfile"), free_port(), tmp_path / "run"
    launch = Launch([deepspeed_node(hosts, i, port, SEARCH, search_args(tiny_bert, out, *STEPS)) for i in range(2)],
                    tmp_path / "logs")
    assert launch.wait(600) == [0, 0], launch.text()[-6000:]
    check_run(out, reference)


def test_torchrun_c10d_two_nodes(reference, tiny_bert, tmp_path):
    """On each node: torchrun --nnodes 2 --node_rank i --rdzv_backend c10d --rdzv_endpoint A:P."""
    port, out = free_port(), tmp_path / "run"
    launch = Launch([torchrun_node(2, i, port, SEARCH, search_args(tiny_bert, out, *STEPS)) for i in range(2)],
                    tmp_path / "logs")
    assert launch.wait(600) == [0, 0], launch.text()[-6000:]
    check_run(out, reference)


def test_mpirun_with_hostfile(reference, tiny_bert, tmp_path):
    """mpirun -f HOSTFILE -np 2 (MPICH; Open MPI: --hostfile): DeepSpeed discovers ranks from MPI."""
    (tmp_path / "hosts").write_text("localhost:2\n")
    out = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(PYTHON), "mpirun"),
           "-f", str(tmp_path / "hosts"), "-np", "2", "-genv", "MASTER_PORT", str(free_port()),
           PYTHON, str(SEARCH), *search_args(tiny_bert, out, *STEPS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    check_run(out, reference)


def fake_slurm(bin_dir, hosts: list[str], gpus: int = 0) -> None:
    """`scontrol show hostnames` printing `hosts`, and an `srun` that writes its options to
    bin_dir/srun.args and starts its command once per node with that node's SLURM_NODEID, in
    parallel, as srun --ntasks-per-node=1 does.  gpus > 0: an `nvidia-smi -L` listing that many."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n"
                                      + "".join(f"echo {h}\n" for h in hosts))
    if gpus:
        (bin_dir / "nvidia-smi").write_text("#!/bin/bash\n[ \"$1\" = -L ] || exit 1\n" + "".join(
            f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'\n" for i in range(gpus)))
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\nwhile [[ $1 == -* ]]; do echo \"$1\" >> {bin_dir / 'srun.args'}; shift; done\n"
        "for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i \"$@\" & pids+=($!); done\n"
        "rc=0; for p in ${pids[@]}; do wait $p || rc=$?; done; exit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)


def slurm_env(tmp_path, **extra) -> dict:
    return env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[0-1]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT), **extra)


@pytest.mark.parametrize("extra, expect", [
    ({}, {"MASTER_ADDR": "gpu-a17", "MASTER_PORT": str(20000 + 4242), "NNODES": "2", "NPROC_PER_NODE": "1",
          "CPUS_PER_NODE": "1", "DIST_TIMEOUT": "600"}),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "96", "MASTER_PORT": "31337", "DIST_TIMEOUT": "120"},
     {"MASTER_ADDR": "gpu-a17", "MASTER_PORT": "31337", "NNODES": "2", "NPROC_PER_NODE": "8", "CPUS_PER_NODE": "96",
      "DIST_TIMEOUT": "120"}),
])
def test_slurm_settings_derivation(extra, expect, tmp_path):
    fake_slurm(tmp_path / "bin", ["gpu-a17", "gpu-b03"])
    script = f"source {ROOT}/launchers/slurm/env.sh && " + " && ".join(f"echo {k}=${k}" for k in expect)
    proc = subprocess.run(["bash", "-c", script], env=slurm_env(tmp_path, **extra), capture_output=True, text=True,
                          check=True)
    assert dict(line.split("=", 1) for line in proc.stdout.split()) == expect


@pytest.mark.parametrize("script", ["search.sbatch", "finetune.sbatch"])
def test_slurm_job_asks_for_gpus_and_each_node_step_gets_them_and_all_cpus(script, tmp_path):
    """The job asks for GPUs (without them a cgroup-confined job sees none and trains on CPU),
    and the one srun task per node gets the node's GPUs and all its CPUs, unbound."""
    path = ROOT / "launchers" / "slurm" / script
    header = [l.split(None, 1)[1] for l in path.read_text().splitlines() if l.startswith("#SBATCH")]
    assert "--gpus-per-node=8" in header and "--ntasks-per-node=1" in header and "--exclusive" in header
    fake_slurm(tmp_path / "bin", ["gpu-a17", "gpu-b03"])
    (tmp_path / "bin" / "srun").write_text(  # records its options, starts nothing
        f"#!/bin/bash\nwhile [[ $1 == -* ]]; do echo \"$1\" >> {tmp_path / 'bin' / 'srun.args'}; shift; done\n"
        f"echo \"$@\" > {tmp_path / 'bin' / 'srun.command'}\n")
    proc = subprocess.run(["bash", str(path), "--output_dir", "/shared/x"], capture_output=True, text=True,
                          env=slurm_env(tmp_path, SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 nodes x 8 ranks" in proc.stdout
    assert (tmp_path / "bin" / "srun.args").read_text().split() == [
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=96", "--cpu-bind=none", "--kill-on-bad-exit=1",
        "--gpus-per-node=8"]
    launcher = script.replace(".sbatch", ".py")
    assert (tmp_path / "bin" / "srun.command").read_text().split() == [
        "launchers/slurm/node.sh", f"launchers/{launcher}", "--output_dir", "/shared/x"]


@pytest.mark.parametrize("listed_by", ["nvidia-smi", "CUDA_VISIBLE_DEVICES"])
def test_slurm_node_with_gpus_and_a_torch_without_cuda_stops_with_one_line(listed_by, tiny_bert, tmp_path):
    """The node's GPUs (listed by nvidia-smi, or only named in CUDA_VISIBLE_DEVICES) but the installed
    torch (this machine's CPU build) has no CUDA: each node stops before torchrun with one line,
    exit 2, nothing written (instead of training on CPU over gloo)."""
    assert not torch.cuda.is_available()  # this test's premise: the torch under test cannot use CUDA
    fake_slurm(tmp_path / "bin", ["localhost", "localhost"], gpus=2 if listed_by == "nvidia-smi" else 0)
    out = tmp_path / "run"
    visible = {"CUDA_VISIBLE_DEVICES": "0,1"} if listed_by == "CUDA_VISIBLE_DEVICES" else {}
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "slurm" / "search.sbatch"),
                           *search_args(tiny_bert, out, *STEPS)],
                          env=slurm_env(tmp_path, PYTHON=PYTHON, SLURM_GPUS_ON_NODE="2", MASTER_PORT=str(free_port()),
                                        **visible),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 2 and len(set(lines)) == 1, lines  # one line from each of the two nodes, the same
    assert lines[0].startswith(f"error: node {os.uname().nodename} has 2 GPU(s) but the torch of {PYTHON} "
                               "cannot use CUDA: install a CUDA build"), lines
    assert not out.exists()


def test_slurm_sbatch_runs_one_launcher_per_node(reference, tiny_bert, tmp_path):
    """launchers/slurm/search.sbatch as SLURM runs it, with srun / scontrol faked on this machine."""
    fake_slurm(tmp_path / "bin", ["localhost", "localhost"])
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "slurm" / "search.sbatch"),
                           *search_args(tiny_bert, out, *STEPS)],
                          env=slurm_env(tmp_path, PYTHON=PYTHON, MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "search: 2 nodes x 1 ranks, rank 0 on localhost" in proc.stdout
    check_run(out, reference)


def test_output_dir_not_shared_stops_every_rank_with_one_line(tiny_bert, tmp_path):
    """Two nodes whose --output_dir (relative, as written in a job script) resolves to a
    different directory on each: rank 1 cannot see what rank 0 writes."""
    hosts, port = hostfile(tmp_path / "hostfile"), free_port()
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for d in cwds:
        d.mkdir()
    launch = Launch([deepspeed_node(hosts, i, port, SEARCH, search_args(tiny_bert, "out", *STEPS)) for i in range(2)],
                    tmp_path / "logs", cwds=cwds)
    codes = launch.wait(600)
    assert all(c != 0 for c in codes), launch.text()[-6000:]
    lines = error_lines(launch.stderr())
    assert len(lines) == 1, launch.text()[-6000:]  # said once, though both ranks stop on it
    assert "--output_dir out is not shared: rank 1 on" in lines[0] and "every node mounts" in lines[0], lines
    assert "Traceback" not in launch.stderr()
    assert not (cwds[0] / "out" / "checkpoints").exists() and not (cwds[1] / "out").exists()
