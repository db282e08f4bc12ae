"""`--preflight_world_size N` on every entry point: one CPU process, no process group, exit 0 when
the job would start and fit at N ranks, else 2 with one line per problem naming the fix."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tamt_ds import preflight, sharding
from tests.conftest_data import hub_repo, pydoc_lines

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "ds_configs" / "zero3_cpu.json"  # stage3_param_persistence_threshold: 0
BERT_LARGE = ["--model_name_or_path", "config:bert-large-uncased", "--max_seq_length", "512",
              "--per_device_train_batch_size", "16"]


def run(capsys, entry: str, *argv) -> tuple[int, str, list[str]]:
    from tamt_ds import evaluate_mask, imp, search
    from tamt_ds.downstream import finetune

    main = {"search": search.main, "imp": imp.main, "finetune": finetune.main, "evaluate_mask": evaluate_mask.main}[entry]
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("error:")]


def row(table: str, item: str) -> str:
    match = re.search(rf"^   {re.escape(item)}  +(\S.*)$", table, re.M)
    assert match, f"no row {item!r} in\n{table}"
    return match.group(1)


@pytest.mark.sim
@pytest.mark.parametrize("world", [64, 512])
def test_bert_large_search_fits_and_prints_each_ranks_share(world, tmp_path):
    """Through the launcher, as a user runs it: a process group never forms, no weight is built."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TAMT_DS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "search.py"), "--preflight_world_size", str(world),
                           *BERT_LARGE, "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert f"search, {world} ranks" in row(table, "entry point")
    assert "bf16 / ZeRO stage 3 / none" in row(table, "precision / stage / offload")
    # ZeRO's layout: 335.142M weights in ceil(numel / N) slices (tensors under the persistence
    # threshold whole on every rank), one score next to each of the 334.293M masked entries
    assert "335.142M / 334.293M in 146 matrices" in row(table, "parameters / masked / trainable")
    # each masked matrix (TAMT's: word embeddings, every encoder linear, the pooler; numel from the
    # published shape) in ZeRO's ceil(numel / N) slices, none under zero3_bf16.json's threshold
    h, i, layers = 1024, 4096, 24
    masked = [30522 * h] + layers * ([h * h] * 4 + [h * i, i * h]) + [h * h]
    assert len(masked) == 146 and round(sum(masked) / 1e6, 3) == 334.293
    rank0 = sum(-(-k // world) for k in masked)
    assert row(table, "scores per rank").startswith(f"rank 0: {rank0 / 1e6:.3f}M, rank {world - 1}: ")
    assert row(table, "weights per rank").startswith("rank 0: ")
    gpu = float(row(table, "GPU peak").split()[0])
    assert 0 < gpu < 72 and "activations" in table and "optimizer states" in table
    assert f"{world} = {world} ranks x 1 workers" in row(table, "readers")
    assert f"{world * 16 * 512:,}" in row(table, "tokens per step")
    assert "checkpoint per rank" in table and "needed / free" in table
    assert "the job would start and fit" in table
    # 32 validation blocks over more ranks: a warning, not a failure
    assert f"{world - 32} of {world} ranks get no real validation block" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing written, nothing built


@pytest.mark.sim
def test_shares_are_zeros_layout():
    """rank r holds [r*P, (r+1)*P) of the flat parameter, P = ceil(numel / N); the last ranks may hold less."""
    assert [preflight.zero_share(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert [preflight.zero_share(3, r, 4)[1] for r in range(4)] == [1, 1, 1, 0]
    for n, w in [(1_000_003, 64), (31_254_528, 512), (7, 512)]:
        assert sum(preflight.zero_share(n, r, w)[1] for r in range(w)) == n
    assert preflight.rank_elements({"small": 5, "big": 10}, 3, 4, persistence_threshold=5) == 5 + 1
    # validation: the dealing of validation.rank_batches
    assert [preflight.validation_share(5, r, 4, 2) for r in range(4)] == [(1, 1), (1, 1), (1, 1), (2, 1)]


def test_too_little_disk_is_one_line_naming_the_fix(capsys, monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    code, out, errors = run(capsys, "search", "--preflight_world_size", 64, *BERT_LARGE, "--output_dir", tmp_path / "o")
    assert code == 2 and len(errors) == 1
    assert "has 0.001 GB free, the run writes 13.709 GB" in errors[0] and "--save_total_limit 1" in errors[0]
    assert "0.001 GB free at" in row(out, "needed / free")


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, errors = run(capsys, "search", "--preflight_world_size", 2, "--output_dir", blocker / "run")
    assert code == 2 and len(errors) == 1 and "is not writable" in errors[0] and "pass an --output_dir" in errors[0]
    if os.getuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, errors = run(capsys, "search", "--preflight_world_size", 2, "--output_dir", ro / "run")
        assert code == 2 and "is not writable" in errors[0]


def test_gpu_too_small_names_a_config_that_fits(capsys, tmp_path):
    code, out, errors = run(capsys, "search", "--preflight_world_size", 64, *BERT_LARGE, "--gpu_memory_gb", 8,
                            "--output_dir", tmp_path / "o")
    assert code == 2 and len(errors) == 1
    assert "does not fit" in errors[0] and "pass --gradient_checkpointing" in errors[0]
    code, _, _ = run(capsys, "search", "--preflight_world_size", 64, *BERT_LARGE, "--gpu_memory_gb", 8,
                     "--gradient_checkpointing", "--output_dir", tmp_path / "o")
    assert code == 0


def test_hub_source_with_fewer_files_than_readers(capsys, tmp_path):
    repo = hub_repo(tmp_path / "wikitext", pydoc_lines()[:200], pydoc_lines("validation")[:40])
    args = ["--dataset_name", repo, "--dataset_config_name", "wikitext-103-raw-v1", "--output_dir", tmp_path / "o",
            "--model_name_or_path", "config:bert-base-uncased"]
    code, out, errors = run(capsys, "search", "--preflight_world_size", 2, *args)  # 2 files, 2 readers
    assert code == 0, errors
    code, out, errors = run(capsys, "search", "--preflight_world_size", 3, *args)
    assert code == 2 and len(errors) == 1
    assert "2 data file(s) for 3 readers" in errors[0] and "python -m tamt_ds.data.prepare" in errors[0]
    assert "--num_shards 3" in errors[0]


def test_bad_arguments_are_the_entry_points_own_errors(capsys):
    code, _, errors = run(capsys, "search", "--preflight_world_size", 0)
    assert code == 2 and errors == ["error: --preflight_world_size must be at least 1, got 0: pass "
                                    "--preflight_world_size 1 or more (default 1)"]
    code, _, errors = run(capsys, "search", "--preflight_world_size", 4, "--sparsity", 1.5)
    assert code == 2 and len(errors) == 1 and "sparsity" in errors[0]
    # without the pre-flight, its sizing flags are unknown to the job
    from tamt_ds import search

    with pytest.raises(Exception, match="unknown argument --gpu_memory_gb"):
        search.parse_args(["--gpu_memory_gb", "40"])


@pytest.mark.parametrize("entry, extra", [
    ("imp", ["--output_dir", "{tmp}/imp"]),
    ("finetune", ["--task", "sst2", "--output_dir", "{tmp}/ft"]),
    ("evaluate_mask", ["--mask", "omp:0.5"]),
    ("search", ["--output_dir", "{tmp}/search"]),
])
def test_every_entry_point_takes_the_flag(entry, extra, capsys, tmp_path, monkeypatch):
    def no_group(*a, **k):
        raise AssertionError("the pre-flight started a process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    had_group = sharding.initialized()  # an earlier in-process test may have left one (DeepSpeed cannot re-init)
    code, out, errors = run(capsys, entry, "--preflight_world_size", 8, "--model_name_or_path",
                            "config:bert-base-uncased", *[e.format(tmp=tmp_path) for e in extra])
    assert code == 0, errors
    assert f"{entry}, 8 ranks" in row(out, "entry point") and "GPU peak" in out and "weights per rank" in out
    assert sharding.initialized() == had_group
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def searched(tiny_bert, tmp_path_factory):
    """A real 1-rank search of 2 steps that saves after each."""
    out = tmp_path_factory.mktemp("pf") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launchers" / "search.py"), "--model_name_or_path", tiny_bert, "--output_dir",
           str(out), "--deepspeed", str(CPU_CONFIG), "--per_device_train_batch_size", "4", "--max_seq_length", "32",
           "--max_steps", "2", "--save_steps", "1", "--eval_steps", "0", "--validation_blocks", "0",
           "--logging_steps", "1", "--dataloader_num_workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tiny_bert, out


def test_resume_reshards_the_newest_checkpoint(searched, capsys, monkeypatch):
    model, out = searched
    base = ["--model_name_or_path", model, "--output_dir", out, "--deepspeed", CPU_CONFIG, "--max_seq_length", 32,
            "--per_device_train_batch_size", 4, "--max_steps", 4, "--resume"]
    code, table, errors = run(capsys, "search", "--preflight_world_size", 3, *base)
    assert code == 0, errors
    assert "step2: step 2, saved on 1 rank(s)" in row(table, "newest checkpoint")
    assert row(table, "reshards to 3 ranks").startswith("yes")
    # a checkpoint whose saved pieces do not cover every rank's range cannot be resharded
    import torch

    rank0 = out / "checkpoints" / "step2" / "rank0.pt"
    saved = torch.load(rank0, weights_only=False)
    name = next(iter(saved["params"]))
    saved["params"][name]["fp32"] = saved["params"][name]["fp32"][:1]
    real_load = torch.load

    def truncated(path, *a, **k):
        return saved if Path(path) == rank0 else real_load(path, *a, **k)

    monkeypatch.setattr(torch, "load", truncated)
    code, _, errors = run(capsys, "search", "--preflight_world_size", 3, *base)
    monkeypatch.undo()
    assert code == 2 and len(errors) == 1 and f"misses part of {name}" in errors[0]
    # another model: refused before the run would load it
    code, _, errors = run(capsys, "search", "--preflight_world_size", 3, *base[2:], "--model_name_or_path",
                          "config:bert-base-uncased")
    assert code == 2 and "was made from model" in errors[0]


def test_what_the_job_refuses_at_start_is_a_problem(capsys, tmp_path):
    held = tmp_path / "run"
    held.mkdir()
    (held / "metrics.jsonl").write_text("{}\n")
    code, _, errors = run(capsys, "search", "--preflight_world_size", 4, "--output_dir", held,
                          "--validation_files", tmp_path / "missing.txt")
    assert code == 2 and len(errors) == 2
    assert "already holds a run: pass --resume" in errors[0] and "corpus file not found" in errors[1]
    code, _, errors = run(capsys, "search", "--preflight_world_size", 4, "--output_dir", held, "--overwrite_output_dir")
    assert code == 0, errors


def test_checkpoint_bytes_are_the_files_written(searched):
    """The disk figure is the real rank file's size, less its few kB of data position and RNG."""
    model, out = searched
    job = preflight.job_of("search", ["--model_name_or_path", model, "--output_dir", str(out), "--deepspeed",
                                      str(CPU_CONFIG)])
    report = preflight.Report(1)
    tensors = preflight.check_model(job, report, preflight.check_deepspeed(job, report))
    predicted = preflight.checkpoint_rank_bytes(tensors["trainable"], 0, 1)
    written = (out / "checkpoints" / "step2" / "rank0.pt").stat().st_size
    assert predicted <= written <= predicted + 64_000


def test_host_memory_per_node(capsys, tmp_path):
    args = ["--preflight_world_size", 64, *BERT_LARGE, "--output_dir", tmp_path / "o", "--ranks_per_node", 8]
    code, out, _ = run(capsys, "search", *args)
    node = float(row(out, "host (load / checkpoint / export)").split()[0])
    assert code == 0 and node > 1.3  # rank 0 reads the whole 1.34 GB fp32 checkpoint at load
    code, _, errors = run(capsys, "search", *args, "--host_memory_gb", 1)
    assert code == 2 and len(errors) == 1 and "of host memory per node does not fit 1 GB" in errors[0]


def test_finetune_shows_the_zero_stage_and_checks_the_one_its_mask_needs(capsys, tmp_path):
    """As the search's: the stage row, and the job's own stage check (a --mask needs ZeRO-3 or none)."""
    import json

    base = ["--preflight_world_size", 8, "--model_name_or_path", "config:bert-base-uncased", "--task", "sst2",
            "--output_dir", tmp_path / "ft"]
    code, out, errors = run(capsys, "finetune", *base, "--mask", "omp:0.5")
    assert code == 0, errors
    assert row(out, "precision / stage / offload") == "bf16 / ZeRO stage 3 / none"
    cfg = json.loads(CPU_CONFIG.read_text())
    cfg["zero_optimization"]["stage"] = 2
    (tmp_path / "zero2.json").write_text(json.dumps(cfg))
    code, out, errors = run(capsys, "finetune", *base, "--mask", "omp:0.5", "--deepspeed", tmp_path / "zero2.json")
    assert row(out, "precision / stage / offload") == "fp32 / ZeRO stage 2 / none"
    assert code == 2 and errors == [f"error: --mask needs ZeRO stage 3 (or no ZeRO), but {tmp_path / 'zero2.json'} has "
                                    f"stage 2: pass --deepspeed ds_configs/zero3_cpu.json or another stage-3 config"]
    code, _, errors = run(capsys, "finetune", *base, "--deepspeed", tmp_path / "zero2.json")  # dense: any stage
    assert code == 0, errors


@pytest.fixture(scope="module")
def imp_levels(tmp_path_factory):
    """A real 1-rank IMP run that finished its first level (0.1) of two."""
    from tests.tiny_bert_mlm import make_tiny_bert_mlm

    tmp = tmp_path_factory.mktemp("pf_imp")
    model = make_tiny_bert_mlm(str(tmp / "model"))
    out = tmp / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launchers" / "imp.py"), "--model_name_or_path", model, "--output_dir", str(out),
           "--deepspeed", str(CPU_CONFIG), "--per_device_train_batch_size", "4", "--max_seq_length", "32",
           "--max_sparsity", "0.1", "--prune_interval", "1", "--validation_blocks", "0", "--logging_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "0.1" / "mask.pt").exists()
    return model, out


def test_imp_resume_checks_its_last_finished_level(imp_levels, capsys):
    model, out = imp_levels
    base = ["--output_dir", out, "--deepspeed", CPU_CONFIG, "--max_seq_length", 32, "--per_device_train_batch_size", 4,
            "--max_sparsity", 0.2, "--resume"]
    code, table, errors = run(capsys, "imp", "--preflight_world_size", 3, "--model_name_or_path", model, *base)
    assert code == 0, errors
    assert row(table, "newest checkpoint") == f"{out / '0.1'}: level 0.1, saved on 1 rank(s)"
    assert row(table, "reshards to 3 ranks").startswith("yes")
    # another model: its masks and head are not the level's
    code, _, errors = run(capsys, "imp", "--preflight_world_size", 3, "--model_name_or_path", "config:bert-base-uncased",
                          *base)
    assert code == 2 and len(errors) == 1 and f"level {out / '0.1'} holds masks of 14 matrices" in errors[0], errors
    assert "resume with the model it was made from" in errors[0]
    # a level whose data positions are unreadable cannot be continued
    positions = out / "0.1" / "data_positions.pt"
    saved = positions.read_bytes()
    try:
        positions.write_bytes(saved[:100])
        code, _, errors = run(capsys, "imp", "--preflight_world_size", 3, "--model_name_or_path", model, *base)
    finally:
        positions.write_bytes(saved)
    assert code == 2 and len(errors) == 1 and f"level {out / '0.1'} cannot be read" in errors[0], errors
