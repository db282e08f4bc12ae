"""The search launcher end to end: real 2-rank ZeRO-3 runs, the output contract, resume, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, _free_port, torchrun

LAUNCHER = ROOT / "launchers" / "search.py"
CPU_CONFIG = ROOT / "ds_configs" / "zero3_cpu.json"  # stage3_param_persistence_threshold: 0


def common(model, out, *extra):
    return ["--model_name_or_path", model, "--output_dir", str(out), "--deepspeed", str(CPU_CONFIG),
            "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--logging_steps", "2",
            "--eval_steps", "4", "--validation_blocks", "8", "--threshold_reset_steps", "3",
            "--learning_rate", "5e-3", *extra]


@pytest.fixture(scope="module")
def deepspeed_run(tiny_bert, tmp_path_factory):
    """`deepspeed --num_accelerators 2 launchers/search.py ...`, as a user runs it."""
    out = tmp_path_factory.mktemp("ds") / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--num_nodes", "1",
           "--master_port", str(_free_port()), str(LAUNCHER),
           *common(tiny_bert, out, "--max_steps", "6", "--save_steps", "3")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


@pytest.fixture(scope="module")
def bf16_run(tiny_bert, tmp_path_factory):
    """torchrun, ZeRO-3 in bf16: frozen weights live in bf16 inside the engine."""
    tmp = tmp_path_factory.mktemp("bf16")
    cfg = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "ds.json").write_text(json.dumps(cfg))
    args = common(tiny_bert, tmp / "run", "--max_steps", "4", "--save_steps", "4")
    args[args.index("--deepspeed") + 1] = str(tmp / "ds.json")
    torchrun(LAUNCHER, *args)
    return tmp / "run", None


@pytest.mark.parametrize("run", ["deepspeed_run", "bf16_run"])
def test_output_contract(run, request, tiny_bert):
    from transformers import AutoModel

    out, _ = request.getfixturevalue(run)
    for name in ("mask.pt", "pruned_model", "metrics.jsonl", "run_config.json", "tensorboard", "checkpoints"):
        assert (out / name).exists(), name
    mask = torch.load(out / "mask.pt", weights_only=True)
    pruned = AutoModel.from_pretrained(out / "pruned_model")
    original = AutoModel.from_pretrained(tiny_bert)
    pstate, ostate = pruned.state_dict(), original.state_dict()
    assert len(mask) == 6 * 2 + 2  # 6 matrices x 2 layers + pooler + word embeddings
    for key, keep in mask.items():
        assert keep.dtype == torch.bool and keep.shape == ostate[key].shape, key
        assert int((~keep).sum()) == int(keep.numel() * 0.7), key  # exact per-matrix sparsity
        assert (pstate[key][~keep] == 0).all(), key
        assert torch.equal(pstate[key][keep], ostate[key][keep]), key  # bit-identical kept weights
        assert pstate[key].dtype == ostate[key].dtype
    for key in ostate:  # unmasked parameters untouched
        if key not in mask:
            assert torch.equal(pstate[key], ostate[key]), key


def test_one_log_stream_with_the_promised_scalars(deepspeed_run):
    out, proc = deepspeed_run
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]  # one stream, not one per rank
    for key in ("train/kd_loss", "mask/sparsity", "mask/change_since_last_log", "mask/distance_to_init",
                "train/learning_rate", "perf/tokens_per_s", "data/tokens_seen", "data/blocks_per_s"):
        assert key in train[-1], key
    assert any("eval/kd_loss" in r for r in rows)
    # 6 steps x 2 ranks x 4 blocks of 32 tokens, all real text
    assert train[-1]["data/blocks_seen"] == 6 * 2 * 4 and train[-1]["data/tokens_seen"] == 6 * 2 * 4 * 32
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["deepspeed"]["zero_optimization"]["stage"] == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/kd_loss" in tags and "sparsity/encoder.layer.0.attention.self.query" in tags
    assert "threshold/pooler.dense" in tags


def _kill_after_first_checkpoint(cmd, ckpt: Path):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if (ckpt / "latest").exists():
            os.killpg(proc.pid, signal.SIGKILL)  # a hard kill, mid-run
            proc.wait()
            return (ckpt / "latest").read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"run ended ({proc.returncode}) before a checkpoint appeared")


def test_resume_after_kill_gives_identical_masks(tiny_bert, tmp_path):
    steps = ["--max_steps", "24", "--save_steps", "4"]
    full = tmp_path / "full"
    torchrun(LAUNCHER, *common(tiny_bert, full, *steps))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(LAUNCHER), *common(tiny_bert, killed, *steps)]
    tag = _kill_after_first_checkpoint(cmd, killed / "checkpoints")
    assert tag != "step24" and not (killed / "mask.pt").exists()
    torchrun(LAUNCHER, *common(tiny_bert, killed, *steps, "--resume"))
    a = torch.load(full / "mask.pt", weights_only=True)
    b = torch.load(killed / "mask.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    last = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines() if "train/loss" in l][-1]
    assert last["step"] == 24 and last["mask/distance_to_init"] > 0  # the masks really moved


def test_mpirun_launch(tiny_bert, tmp_path):
    """MPI discovery: `mpirun -np 2 python launchers/search.py` (MPI from the mpich wheel)."""
    mpirun = Path(sys.executable).parent / "mpirun"
    out = tmp_path / "mpi"
    proc = subprocess.run([str(mpirun), "-np", "2", "-genv", "OMP_NUM_THREADS", "1", sys.executable, str(LAUNCHER),
                           *common(tiny_bert, out, "--max_steps", "2", "--save_steps", "2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert (out / "mask.pt").exists() and (out / "pruned_model" / "config.json").exists()
