"""launchers/slurm/*.sbatch on a real one-node SLURM cluster (`make test-cluster`, as root:
scripts/slurm_cluster.sh starts munged, slurmctld and slurmd on this machine), submitted with
sbatch, followed with squeue, their end read with sacct.  The search's mask equals a single-node
run's bit for bit; a search cancelled mid-run (scancel) and resubmitted with --resume goes on
from its checkpoint and ends with the uninterrupted mask; finetune.sbatch with that mask gives
the single-node run's results.  The node has CPUs only (SLURM drops a GPU GRES without device
files), so the jobs are docs/cluster.md's copies without --gpus-per-node, with 2 ranks a node."""
import json

import pytest
import torch

from tests.cluster import CPU_CONFIG, FINETUNE, ROOT, SEARCH, load_rows, search_args
from tests.conftest import torchrun
from tests.slurm import Slurm, cpu_script
from tests.test_finetune_cli import write_local_classification

pytestmark = pytest.mark.cluster

SBATCH = ROOT / "launchers" / "slurm"
STEPS = ["--max_steps", "32", "--save_steps", "4", "--logging_steps", "1"]
RANKS = {"NPROC_PER_NODE": "2"}  # env.sh: one rank a node on a CPU cluster unless told


@pytest.fixture(scope="module")
def slurm() -> Slurm:
    return Slurm()  # fails every test at once, naming `make test-cluster`, when no cluster is up


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sbatch")
    return {name: cpu_script(SBATCH / f"{name}.sbatch", tmp / f"{name}-cpu.sbatch") for name in ("search", "finetune")}


@pytest.fixture(scope="module")
def reference(slurm, tiny_bert_dropout, tmp_path_factory):
    """The same search on one node without SLURM: torchrun --nproc_per_node 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    torchrun(SEARCH, *search_args(tiny_bert_dropout, out, *STEPS))
    return out


@pytest.fixture(scope="module")
def slurm_search(slurm, scripts, tiny_bert_dropout, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_search")
    job = slurm.sbatch(scripts["search"], search_args(tiny_bert_dropout, tmp / "run", *STEPS), tmp / "job.out",
                       "--nodes=1", **RANKS)
    return job, slurm.wait(job), tmp / "run"


def assert_same_mask(run, reference) -> None:
    a, b = (torch.load(r / "mask.pt", weights_only=True) for r in (run, reference))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_rows(path, skip: int = 0) -> list[dict]:
    return [r for r in load_rows(path)[skip:] if "train/loss" in r]


def test_search_job_gives_the_single_node_mask(slurm, slurm_search, reference):
    job, end, run = slurm_search
    assert end == ("COMPLETED", "0:0"), job.text()[-6000:]
    # env.sh's settings from what SLURM set: the job's node, a port from the job id, srun's ranks.
    assert f"search: 1 nodes x 2 ranks, rank 0 on {slurm.node}:{20000 + int(job.id) % 20000}" in job.text()
    assert json.loads((run / "run_config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints" / "step32").iterdir()) == ["complete.json", "rank0.pt",
                                                                                 "rank1.pt"]
    rows, ref_rows = train_rows(run / "metrics.jsonl"), train_rows(reference / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 33))
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
    assert_same_mask(run, reference)
    assert ref_rows[-1]["mask/distance_to_init"] > 0  # the masks really moved


def test_search_cancelled_and_resubmitted_with_resume_ends_with_the_uninterrupted_mask(
        slurm, scripts, reference, tiny_bert_dropout, tmp_path):
    run, args = tmp_path / "run", search_args(tiny_bert_dropout, tmp_path / "run", *STEPS)
    job = slurm.sbatch(scripts["search"], args, tmp_path / "first.out", "--nodes=1", **RANKS)
    latest = run / "checkpoints" / "latest"
    slurm.wait_until(job, latest.exists)
    slurm.cancel(job)  # mid-run, after its first complete checkpoint
    assert slurm.wait(job)[0] == "CANCELLED", job.text()[-6000:]
    tag = latest.read_text().strip()
    start = int(tag.removeprefix("step"))
    assert 0 < start < 32 and not (run / "mask.pt").exists(), f"cancelled at {tag}: raise --max_steps"
    before = (run / "metrics.jsonl").read_text()

    again = slurm.sbatch(scripts["search"], [*args, "--resume"], tmp_path / "resumed.out", "--nodes=1", **RANKS)
    assert slurm.wait(again) == ("COMPLETED", "0:0"), again.text()[-6000:]
    assert f"resumed from {tag} at step {start}" in again.text()
    # The resubmitted job kept the rows logged before the cancel (a search started over rewrites
    # them: the same losses, other timings) and logged exactly the steps after the checkpoint ...
    assert (run / "metrics.jsonl").read_text().startswith(before), "the resubmitted job started over"
    rows = train_rows(run / "metrics.jsonl", skip=len(before.splitlines()))
    assert [r["step"] for r in rows] == list(range(start + 1, 33))
    # ... and each of them, and the mask, as the uninterrupted run had them, bit for bit.
    full = {r["step"]: r for r in train_rows(reference / "metrics.jsonl")}
    assert [r["train/loss"] for r in rows] == [full[r["step"]]["train/loss"] for r in rows]
    assert_same_mask(run, reference)


def test_finetune_job_gives_the_single_node_results(slurm, scripts, slurm_search, tiny_bert_dropout, tmp_path):
    _, end, searched = slurm_search
    assert end == ("COMPLETED", "0:0")
    task = write_local_classification(tmp_path / "task")

    def args(out):
        return ["--model_name_or_path", tiny_bert_dropout, "--task", f"local:{task}", "--mask", searched / "mask.pt",
                "--max_seq_length", "16", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
                "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "0", "--deepspeed", CPU_CONFIG,
                "--output_dir", out]

    torchrun(FINETUNE, *args(tmp_path / "single"))
    job = slurm.sbatch(scripts["finetune"], args(tmp_path / "slurm"), tmp_path / "job.out", "--nodes=1", **RANKS)
    assert slurm.wait(job) == ("COMPLETED", "0:0"), job.text()[-6000:]
    assert "finetune: 1 nodes x 2 ranks" in job.text()
    results = [json.loads((tmp_path / n / "results.json").read_text()) for n in ("slurm", "single")]
    assert results[0]["complete"] and results[0]["world_size"] == 2 and results[0]["per_seed"][0]["steps"] == 4
    losses = [[v for r in load_rows(tmp_path / n / "metrics.jsonl") for k, v in r.items() if k.endswith("/train/loss")]
              for n in ("slurm", "single")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert results[0]["best"] == results[1]["best"]


def test_gpu_job_on_a_cluster_without_gpus_is_refused_at_submission(slurm, tmp_path):
    """What docs/cluster.md says a cluster without GPUs answers the shipped scripts."""
    proc = slurm.run("sbatch", "--nodes=1", f"--output={tmp_path / 'job.out'}", str(SBATCH / "search.sbatch"),
                     "--output_dir", str(tmp_path / "run"), check=False)
    assert proc.returncode != 0 and "Invalid generic resource" in proc.stderr, proc.stderr
