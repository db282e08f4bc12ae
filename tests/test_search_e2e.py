"""The search launcher end to end: real 2-rank ZeRO-3 runs, the output contract, resume, bad input."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port, kill_tree, torchrun

LAUNCHER = ROOT / "launchers" / "search.py"
RESUME_WORKER = ROOT / "tests" / "workers" / "resume_worker.py"
CPU_CONFIG = ROOT / "ds_configs" / "zero3_cpu.json"  # stage3_param_persistence_threshold: 0
BF16_CONFIG = ROOT / "ds_configs" / "zero3_cpu_bf16.json"  # the same in bf16: the default on a CPU with native bf16


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
           "--master_port", str(free_port()), str(LAUNCHER),
           *common(tiny_bert, out, "--max_steps", "6", "--save_steps", "3")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def bf16_args(model, out, *extra):
    """A 2-rank bf16 search (scores and the MLM head train, from fp32 masters), checkpoints at 4 and 8."""
    args = common(model, out, "--objective", "mlm_kd", "--max_steps", "8", "--save_steps", "4", "--logging_steps", "1",
                  *extra)
    args[args.index("--deepspeed") + 1] = str(BF16_CONFIG)
    return args


@pytest.fixture(scope="module")
def bf16_run(tiny_bert_dropout, tmp_path_factory):
    """torchrun, ZeRO-3 in bf16: frozen weights live in bf16 inside the engine; dropout draws from the RNG."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    torchrun(LAUNCHER, *bf16_args(tiny_bert_dropout, out))
    return out, None


@pytest.mark.parametrize("run, dtype", [("deepspeed_run", "float32"), ("bf16_run", "bfloat16")])
def test_output_contract(run, dtype, request):
    from transformers import AutoModel

    out, _ = request.getfixturevalue(run)
    for name in ("mask.pt", "pruned_model", "metrics.jsonl", "run_config.json", "tensorboard", "checkpoints"):
        assert (out / name).exists(), name
    config = json.loads((out / "run_config.json").read_text())
    assert config["precision"]["dtype"] == dtype and config["precision"]["why"].startswith("--deepspeed ")
    mask = torch.load(out / "mask.pt", weights_only=True)
    pruned = AutoModel.from_pretrained(out / "pruned_model")
    original = AutoModel.from_pretrained(config["search"]["model_name_or_path"])  # the fp32 checkpoint it loaded
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
            kill_tree(proc)  # a hard kill of the whole job, mid-run
            return (ckpt / "latest").read_text().strip()
        time.sleep(0.05)
    kill_tree(proc)
    raise AssertionError(f"run ended ({proc.returncode}) before a checkpoint appeared")


def _train_rows(path: Path, skip: int = 0) -> list[dict]:
    lines = path.read_text().splitlines()[skip:]
    return [json.loads(line) for line in lines if "train/loss" in line]


RESUME_STEPS = ["--max_steps", "24", "--save_steps", "4", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def dropout_run(tiny_bert_dropout, tmp_path_factory):
    """An uninterrupted 2-rank search of a model with dropout 0.1, loss logged every step."""
    out = tmp_path_factory.mktemp("dropout") / "full"
    torchrun(LAUNCHER, *common(tiny_bert_dropout, out, *RESUME_STEPS))
    return out


def test_resume_after_kill_is_exact(tiny_bert_dropout, dropout_run, tmp_path):
    """SIGKILL after a checkpoint, --resume: the same losses at every later step and the same
    mask as the uninterrupted run, with dropout drawing from the RNG all along."""
    assert json.loads((Path(tiny_bert_dropout) / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(LAUNCHER), *common(tiny_bert_dropout, killed, *RESUME_STEPS)]
    tag = _kill_after_first_checkpoint(cmd, killed / "checkpoints")
    start = int(tag.removeprefix("step"))
    assert 0 < start < 24 and not (killed / "mask.pt").exists()
    logged_before = len((killed / "metrics.jsonl").read_text().splitlines())
    proc = torchrun(LAUNCHER, *common(tiny_bert_dropout, killed, *RESUME_STEPS, "--resume"))
    assert f"resumed from {tag} at step {start}" in proc.stdout + proc.stderr
    # The resumed process logged exactly the steps after the checkpoint: it did not start from 0.
    resumed = _train_rows(killed / "metrics.jsonl", skip=logged_before)
    assert [r["step"] for r in resumed] == list(range(start + 1, 25))
    full = {r["step"]: r for r in _train_rows(dropout_run / "metrics.jsonl")}
    for r in resumed:  # loss and learning rate of every step after the checkpoint, bit for bit
        assert (r["train/loss"], r["train/learning_rate"]) == (full[r["step"]]["train/loss"],
                                                               full[r["step"]]["train/learning_rate"]), r["step"]
    a = torch.load(dropout_run / "mask.pt", weights_only=True)
    b = torch.load(killed / "mask.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full[24]["mask/distance_to_init"] > 0  # the masks really moved


def test_mask_does_not_depend_on_save_log_or_eval_steps(tiny_bert_dropout, dropout_run, tmp_path):
    """The same search saved, logged and evaluated at other steps (dropout drawing from the RNG
    all along; dropout_run saves every 4 steps, between resets every 3): the same mask.pt and
    the same final scores, bit for bit."""
    other = tmp_path / "other"
    torchrun(LAUNCHER, *common(tiny_bert_dropout, other, *RESUME_STEPS, "--save_steps", "1000", "--logging_steps", "5",
                               "--eval_steps", "7"))
    a = torch.load(dropout_run / "mask.pt", weights_only=True)
    b = torch.load(other / "mask.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for rank in (0, 1):  # both runs save the last step: the scores the masks come from
        sa = torch.load(dropout_run / "checkpoints" / "step24" / f"rank{rank}.pt", weights_only=False)
        sb = torch.load(other / "checkpoints" / "step24" / f"rank{rank}.pt", weights_only=False)
        # the live thresholds (device_seconds: measured wall time, the search cost's, not the search's state)
        assert {**sa["state"], "device_seconds": None} == {**sb["state"], "device_seconds": None}
        for name, entry in sa["params"].items():
            assert torch.equal(entry["fp32"], sb["params"][name]["fp32"]), name


def test_checkpoints_hold_no_frozen_weights_and_only_the_newest_two(dropout_run):
    ckpt = dropout_run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step20", "step24"]  # --save_total_limit 2
    assert (ckpt / "latest").read_text() == "step24"
    files = sorted((ckpt / "step24").iterdir())
    assert [f.name for f in files] == ["complete.json", "rank0.pt", "rank1.pt"]
    saved = [torch.load(f, weights_only=False) for f in files[1:]]
    names = set(saved[0]["params"])
    assert names and all(n.endswith(".mask.score") for n in names)  # trainable only: no frozen weight
    scores = sum(saved[0]["params"][n]["numel"] for n in names)
    assert sum(s["params"][n]["fp32"].numel() for s in saved for n in names) == scores  # each element once
    # fp32 value + 2 Adam moments per score element, and little else
    assert 12 * scores < sum(f.stat().st_size for f in files) < 12 * scores * 1.05


def test_corrupt_latest_falls_back_and_another_model_is_refused(tiny_bert_dropout, dropout_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(dropout_run, run)
    (run / "mask.pt").unlink()
    rank1 = run / "checkpoints" / "step24" / "rank1.pt"
    rank1.write_bytes(rank1.read_bytes()[:-100])  # a truncated write
    config = (run / "run_config.json").read_bytes()

    from tests.tiny_models import make_tiny

    from tamt_ds.search import main

    other = make_tiny(str(tmp_path / "other"), "bert", dropout=0.1, seed=1)  # same architecture, other weights
    assert main(common(other, run, *RESUME_STEPS, "--resume")) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and f"resume with --model_name_or_path {tiny_bert_dropout}" in error[0], error
    assert (run / "run_config.json").read_bytes() == config  # nothing written

    proc = torchrun(LAUNCHER, *common(tiny_bert_dropout, run, *RESUME_STEPS, "--resume"))
    assert "names 'step24', which is not usable: resuming from step20" in proc.stderr
    assert "resumed from step20 at step 20" in proc.stdout + proc.stderr
    a = torch.load(dropout_run / "mask.pt", weights_only=True)
    b = torch.load(run / "mask.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 21-24 done again, exactly
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step20", "step24"]


def _rewind(run: Path, to: Path, tag: str) -> Path:
    """A copy of a finished run as it stood when it wrote checkpoint `tag` (later ones and the exports gone)."""
    shutil.copytree(run, to)
    for later in (to / "checkpoints").glob("step*"):
        if int(later.name.removeprefix("step")) > int(tag.removeprefix("step")):
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(tag)
    (to / "mask.pt").unlink()
    shutil.rmtree(to / "pruned_model")
    return to


def test_bf16_resume_exact_on_the_same_world_size_and_restored_on_another(bf16_run, tiny_bert_dropout, tmp_path):
    """bf16 as fp32: resumed from its step-4 checkpoint on the same 2 ranks, the run logs the same
    losses at steps 5-8 bit for bit and ends with the same mask; on 1 rank every fp32 master, Adam
    moment and bf16 copy the forward uses is restored exactly, and the run ends at exact sparsity."""
    full, _ = bf16_run
    same = _rewind(full, tmp_path / "same", "step4")
    other = _rewind(full, tmp_path / "other", "step4")
    logged = len((same / "metrics.jsonl").read_text().splitlines())
    proc = torchrun(LAUNCHER, *bf16_args(tiny_bert_dropout, same, "--resume"))
    assert "resumed from step4 at step 4, saved on 2 rank(s)" in proc.stdout + proc.stderr
    resumed, rows = _train_rows(same / "metrics.jsonl", skip=logged), {r["step"]: r for r in _train_rows(full / "metrics.jsonl")}
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for r in resumed:
        assert (r["train/loss"], r["train/learning_rate"]) == (rows[r["step"]]["train/loss"],
                                                               rows[r["step"]]["train/learning_rate"]), r["step"]
    a, b = torch.load(full / "mask.pt", weights_only=True), torch.load(same / "mask.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows[8]["mask/distance_to_init"] > 0  # the masks really moved

    torchrun(RESUME_WORKER, tiny_bert_dropout, other / "checkpoints", tmp_path / "check.json", BF16_CONFIG.name, nproc=1)
    check = json.loads((tmp_path / "check.json").read_text())
    assert (check["saved_on"], check["loaded_on"], check["step"], check["adam_step"]) == (2, 1, 4, 4)
    assert check["dtypes"] == ["torch.bfloat16"] and check["scores"] == 14 and check["tensors"] > 14
    logged = len((other / "metrics.jsonl").read_text().splitlines())
    proc = torchrun(LAUNCHER, *bf16_args(tiny_bert_dropout, other, "--resume"), nproc=1)
    assert "resumed from step4 at step 4, saved on 2 rank(s)" in proc.stdout + proc.stderr
    rows = _train_rows(other / "metrics.jsonl", skip=logged)
    assert [r["step"] for r in rows] == [5, 6, 7, 8] and rows[-1]["data/blocks_seen"] == (4 * 2 + 4 * 1) * 4
    for key, keep in torch.load(other / "mask.pt", weights_only=True).items():
        assert int((~keep).sum()) == int(keep.numel() * 0.7), key  # exact sparsity


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(before, after, tiny_bert_dropout, tmp_path):
    """Save on `before` ranks, resume on `after`: scores, MLM head and Adam moments are
    restored exactly (consolidated over the ranks), and the search finishes."""
    run = tmp_path / "run"
    args = ["--objective", "mlm_kd", "--save_steps", "4", "--logging_steps", "1"]
    torchrun(LAUNCHER, *common(tiny_bert_dropout, run, *args, "--max_steps", "4"), nproc=before)
    torchrun(RESUME_WORKER, tiny_bert_dropout, run / "checkpoints", tmp_path / "check.json", nproc=after)
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["saved_on"] == before and check["loaded_on"] == after and check["step"] == 4
    assert check["adam_step"] == 4 and check["lr"] == 5e-3 * 0.5 and check["data_positions"] == before  # warm-up 5/10
    assert check["tensors"] > check["scores"] == 14 and check["elements"] > 0  # scores (pooler included) + the MLM head

    logged = len((run / "metrics.jsonl").read_text().splitlines())
    proc = torchrun(LAUNCHER, *common(tiny_bert_dropout, run, *args, "--max_steps", "8", "--resume"), nproc=after)
    assert f"resumed from step4 at step 4, saved on {before} rank(s)" in proc.stdout + proc.stderr
    rows = _train_rows(run / "metrics.jsonl", skip=logged)
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    assert rows[-1]["data/blocks_seen"] == (4 * before + 4 * after) * 4  # the data position carried over
    assert json.loads((run / "run_config.json").read_text())["world_size"] == after
    for key, keep in torch.load(run / "mask.pt", weights_only=True).items():
        assert int((~keep).sum()) == int(keep.numel() * 0.7), key  # exact sparsity


def test_eight_ranks_killed_then_resumed_on_three(tiny_bert_dropout, tmp_path):
    """The first size where 1/N rounding, uneven shards and ranks with empty shares all occur:
    a real 8-rank gloo search, SIGKILLed after a checkpoint, resumed on 3 ranks (every score,
    MLM-head entry and Adam moment restored exactly, then the run goes on from that step and
    exports a mask of exact sparsity)."""
    run = tmp_path / "run"
    args = [*common(tiny_bert_dropout, run, "--objective", "mlm_kd", "--max_steps", "12", "--save_steps", "4",
                    "--logging_steps", "1")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8", "--master_port",
           str(free_port()), str(LAUNCHER), *args]
    tag = _kill_after_first_checkpoint(cmd, run / "checkpoints")
    start = int(tag.removeprefix("step"))
    assert 0 < start < 12 and not (run / "mask.pt").exists()
    assert len(list((run / "checkpoints" / tag).glob("rank*.pt"))) == 8
    torchrun(RESUME_WORKER, tiny_bert_dropout, run / "checkpoints", tmp_path / "check.json", nproc=3)
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["saved_on"] == 8 and check["loaded_on"] == 3 and check["step"] == start
    assert check["data_positions"] == 8 and check["elements"] > 0
    logged = len((run / "metrics.jsonl").read_text().splitlines())
    proc = torchrun(LAUNCHER, *args, "--resume", nproc=3, timeout=900)
    assert f"resumed from {tag} at step {start}, saved on 8 rank(s)" in proc.stdout + proc.stderr
    rows = _train_rows(run / "metrics.jsonl", skip=logged)
    assert [r["step"] for r in rows] == list(range(start + 1, 13))  # from the checkpoint, not from 0
    assert rows[-1]["data/blocks_seen"] == (8 * start + 3 * (12 - start)) * 4  # the data position carried over
    for key, keep in torch.load(run / "mask.pt", weights_only=True).items():
        assert int((~keep).sum()) == int(keep.numel() * 0.7), key  # exact sparsity
    assert (run / "pruned_model" / "config.json").exists()


def test_mpirun_launch(tiny_bert, tmp_path):
    """MPI discovery: `mpirun -np 2 python launchers/search.py` (MPI from the mpich wheel) is the
    same 2-rank search as torchrun's: the same mask and losses, one log stream."""
    mpirun = Path(sys.executable).parent / "mpirun"
    out, ref = tmp_path / "mpi", tmp_path / "torchrun"
    args = ["--max_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--warmup_steps", "0"]
    proc = subprocess.run([str(mpirun), "-np", "2", "-genv", "OMP_NUM_THREADS", "1", sys.executable, str(LAUNCHER),
                           *common(tiny_bert, out, *args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torchrun(LAUNCHER, *common(tiny_bert, ref, *args))
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert (out / "pruned_model" / "config.json").exists()
    assert sorted(p.name for p in (out / "checkpoints" / "step3").iterdir()) == ["complete.json", "rank0.pt", "rank1.pt"]
    rows, ref_rows = _train_rows(out / "metrics.jsonl"), _train_rows(ref / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 alone logs
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
    a, b = torch.load(out / "mask.pt", weights_only=True), torch.load(ref / "mask.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ref_rows[-1]["mask/distance_to_init"] > 0  # the masks really moved
