"""Every entry point (search, IMP, fine-tuning, evaluate_mask) checks its whole command line
before it writes anything (one line naming the fix, exit code 2), and ends through the one
exit path, which destroys the process group after a clean run."""
import json
import os
import subprocess

import pytest

from tests.cluster import CPU_CONFIG, PYTHON, ROOT, SEARCH, env, search_args
from tests.conftest import torchrun
from tests.test_finetune_cli import write_local_classification

MODULES = {"search": "tamt_ds.search", "imp": "tamt_ds.imp", "finetune": "tamt_ds.downstream.finetune",
           "evaluate_mask": "tamt_ds.evaluate_mask"}
LAUNCHERS = {name: ROOT / "launchers" / f"{name}.py" for name in MODULES}


def small_run(entry: str, model: str, out, task=None) -> list[str]:
    """A run of `entry` that would start quickly if nothing stopped it; it writes under `out`."""
    if entry == "search":
        return search_args(model, out, "--max_steps", "1")
    common = ["--model_name_or_path", model, "--deepspeed", str(CPU_CONFIG), "--max_seq_length", "16"]
    if entry == "imp":
        return [*common, "--output_dir", str(out), "--per_device_train_batch_size", "2", "--validation_blocks", "2",
                "--max_sparsity", "0.1", "--prune_interval", "1"]
    if entry == "finetune":
        return [*common, "--output_dir", str(out), "--task", f"local:{task}", "--per_device_train_batch_size", "4",
                "--max_steps", "1", "--eval_steps", "0"]
    return [*common, "--mask", "none", "--eval_blocks", "4", "--per_device_eval_batch_size", "2",
            "--output", str(out / "result.json")]


def run_in_process(entry: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    import importlib

    code = importlib.import_module(MODULES[entry]).main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_local_classification(tmp_path_factory.mktemp("task") / "task")


@pytest.mark.parametrize("entry, flag", [
    ("search", "save_steps"), ("search", "logging_steps"), ("search", "threshold_reset_steps"),
    ("search", "per_device_train_batch_size"), ("search", "gradient_accumulation_steps"),
    ("imp", "logging_steps"), ("imp", "prune_interval"), ("imp", "per_device_train_batch_size"),
    ("finetune", "logging_steps"), ("finetune", "per_device_train_batch_size"), ("finetune", "doc_stride"),
    ("evaluate_mask", "eval_blocks"), ("evaluate_mask", "per_device_eval_batch_size"),
])
def test_zero_interval_is_one_line_before_anything_is_written(entry, flag, tiny_roberta_mlm, task, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_in_process(entry, [*small_run(entry, tiny_roberta_mlm, out, task), f"--{flag}", "0"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --{flag} must be at least 1, got 0: pass --{flag} 1 or more"), err
    assert not out.exists()  # no run_config.json, nothing at all


@pytest.mark.parametrize("entry, flag", [
    ("search", "learning_rate"), ("search", "eval_steps"), ("search", "warmup_steps"), ("imp", "weight_decay"),
    ("finetune", "max_grad_norm"), ("finetune", "learning_rate"),
])
def test_negative_number_is_one_line_before_anything_is_written(entry, flag, tiny_roberta_mlm, task, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_in_process(entry, [*small_run(entry, tiny_roberta_mlm, out, task), f"--{flag}", "-1"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --{flag} must be at least 0, got -1"), err
    assert not out.exists()


@pytest.mark.parametrize("entry, typo, meant", [
    ("search", "--save_step", "--save_steps"), ("imp", "--prune_intervals", "--prune_interval"),
    ("finetune", "--logging_step", "--logging_steps"), ("evaluate_mask", "--eval_block", "--eval_blocks"),
])
def test_unknown_flag_names_the_closest_one(entry, typo, meant, tiny_roberta_mlm, task, tmp_path, capsys):
    """Not an abbreviation either: argparse would silently take --save_step for --save_steps."""
    out = tmp_path / "out"
    code, err = run_in_process(entry, [*small_run(entry, tiny_roberta_mlm, out, task), typo, "5"], capsys)
    assert code == 2 and err == [f"error: unknown argument {typo}: did you mean {meant}?"], err
    assert not out.exists()


def test_bad_value_is_one_line_not_argparse_usage(tiny_bert, tmp_path, capsys):
    code, err = run_in_process("search", [*small_run("search", tiny_bert, tmp_path / "out"), "--save_steps", "ten"],
                               capsys)
    assert code == 2 and err == ["error: argument --save_steps/--save-steps: invalid int value: 'ten' (see --help)"]


def test_real_launcher_unknown_flag_exit_2(tmp_path):
    proc = subprocess.run([PYTHON, str(SEARCH), "--output_dir", str(tmp_path / "o"), "--save_step", "5"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert [l for l in proc.stderr.splitlines() if "error" in l.lower()] == \
        ["error: unknown argument --save_step: did you mean --save_steps?"], proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the exit path

AT_EXIT = '''\
# Test probe (reaches only the processes of one test, via PYTHONPATH): registered before
# anything else, so it runs last at interpreter exit; records whether the process group
# was still alive then.
import atexit, json, os, sys

def _record():
    dist = sys.modules.get("torch.distributed")
    alive = bool(dist is not None and dist.is_available() and dist.is_initialized())
    with open(os.path.join(os.environ["EXIT_PROBE_DIR"], f"rank{os.environ.get('RANK', 'none')}.json"), "w") as f:
        json.dump({"group_alive": alive, "distributed_imported": dist is not None}, f)

atexit.register(_record)
'''


def world_size_recorded(entry: str, out) -> int:
    if entry in ("search", "imp"):
        return json.loads((out / "run_config.json").read_text())["world_size"]
    if entry == "finetune":
        return json.loads((out / "results.json").read_text())["world_size"]
    return json.loads((out / "result.json").read_text())["world_size"]


@pytest.mark.parametrize("entry", list(MODULES))
def test_two_rank_run_ends_its_process_group(entry, tiny_roberta_mlm, task, tmp_path):
    """The group existed (the outputs record 2 ranks) and was gone when each rank's
    interpreter exited: exit_process destroyed it (sys.exit would leave it alive)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(AT_EXIT)
    out = tmp_path / "out"
    if entry == "evaluate_mask":
        out.mkdir()
    pythonpath = os.pathsep.join(p for p in (str(probe), os.environ.get("PYTHONPATH")) if p)
    torchrun(LAUNCHERS[entry], *small_run(entry, tiny_roberta_mlm, out, task),
             env={"PYTHONPATH": pythonpath, "EXIT_PROBE_DIR": str(probe)})
    assert world_size_recorded(entry, out) == 2
    for rank in (0, 1):
        state = json.loads((probe / f"rank{rank}.json").read_text())
        assert state == {"group_alive": False, "distributed_imported": True}, (rank, state)
