"""A failing rank ends the whole launch quickly and says which rank failed and why
(docs/cluster.md, "When a rank fails").  Failures are real: signals sent to a rank's
process (found through the launcher's process tree), a file one node lacks, an
exception raised inside a library call of one rank, an absurd learning rate."""
import os
import subprocess
import time

import pytest
import torch

from tests.cluster import (FINETUNE, PYTHON, ROOT, SEARCH, Launch, free_port, deepspeed_node, env, error_lines,
                           hostfile, search_args)
from tests.conftest import torchrun
from tests.test_finetune_cli import write_local_classification

LONG = ["--max_steps", "2000", "--save_steps", "100000"]  # runs until something stops it


def torchrun_cmd(script, args, nproc: int = 2) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), str(script), *map(str, args)]


def wait_until(predicate, launch: Launch, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        codes = [p.poll() for p in launch.procs]
        if any(c is not None for c in codes):
            raise AssertionError(f"a launcher ended early {codes}:\n{launch.text()[-6000:]}")
        if time.monotonic() > deadline:
            launch.kill()
            raise AssertionError(f"timed out waiting for the run:\n{launch.text()[-6000:]}")
        time.sleep(0.3)


def logged(path, rows: int):
    return lambda: path.exists() and len(path.read_text().splitlines()) >= rows


def exit_times(launch: Launch, since: float, timeout: float) -> list[tuple[int, float]]:
    """(exit code, seconds after `since`) of every launcher; fails if one outlives `timeout`."""
    out = []
    for p in launch.procs:
        try:
            code = p.wait(timeout=max(0.1, since + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            launch.kill()
            raise AssertionError(f"a launcher was still running {timeout} s later:\n{launch.text()[-6000:]}")
        out.append((code, time.monotonic() - since))
    return out


def test_killed_rank_ends_a_two_node_search_within_60s(tiny_bert, tmp_path):
    hosts, port, out = hostfile(tmp_path / "hostfile"), free_port(), tmp_path / "run"
    launch = Launch([deepspeed_node(hosts, i, port, SEARCH, search_args(tiny_bert, out, *LONG)) for i in range(2)],
                    tmp_path / "logs")
    wait_until(logged(out / "metrics.jsonl", 2), launch)
    ranks = launch.ranks()
    assert sorted(ranks) == [0, 1], ranks
    killed = time.monotonic()
    ranks[1].kill()  # SIGKILL, mid-step: no chance to say anything
    codes = exit_times(launch, killed, 60)
    assert all(code != 0 for code, _ in codes), codes
    assert codes[0][0] == 1, codes  # rank 0 ended on its own error, not on a signal or an abort
    lines = error_lines(launch.stderr())
    assert len(lines) == 1 and lines[0].startswith("error: [rank 0/2 on "), launch.text()[-6000:]
    assert "lost contact with the other ranks" in lines[0] and "rank 1 stopped answering" in lines[0], lines


def test_killed_rank_ends_finetuning_within_60s(tiny_bert, tmp_path):
    """As the search's twin: two one-rank "nodes", so that rank 0's own launcher does not end it
    first and rank 0 reports what it saw."""
    task = write_local_classification(tmp_path / "task")
    hosts, port, out = hostfile(tmp_path / "hostfile"), free_port(), tmp_path / "ft"
    args = ["--model_name_or_path", tiny_bert, "--task", f"local:{task}", "--max_seq_length", "16",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "100", "--logging_steps", "1", "--eval_steps",
            "0", "--output_dir", str(out)]
    launch = Launch([deepspeed_node(hosts, i, port, FINETUNE, args) for i in range(2)], tmp_path / "logs")
    wait_until(logged(out / "metrics.jsonl", 2), launch)
    ranks = launch.ranks()
    assert sorted(ranks) == [0, 1], ranks
    killed = time.monotonic()
    ranks[1].kill()  # SIGKILL, mid-step
    codes = exit_times(launch, killed, 60)
    assert all(code != 0 for code, _ in codes), codes
    assert codes[0][0] == 1, codes  # rank 0 ended on its own error, not on a signal or an abort
    assert not (out / "results.json").exists()
    lines = error_lines(launch.stderr())
    assert len(lines) == 1 and lines[0].startswith("error: [rank 0/2 on "), launch.text()[-6000:]
    assert "lost contact with the other ranks" in lines[0] and "rank 1 stopped answering" in lines[0], lines


def test_frozen_rank_stops_the_others_within_the_timeout(tiny_bert, tmp_path):
    """SIGSTOP (a process that stops as a whole): rank 0 waits --dist_timeout seconds,
    then names the rank that stopped answering."""
    timeout = 10
    out = tmp_path / "run"
    launch = Launch([torchrun_cmd(SEARCH, search_args(tiny_bert, out, *LONG, "--dist_timeout", timeout))],
                    tmp_path / "logs")
    wait_until(logged(out / "metrics.jsonl", 2), launch)
    ranks = launch.ranks()
    frozen = time.monotonic()
    ranks[1].suspend()
    try:
        ranks[0].wait(timeout=timeout + 30)
        rank0_s = time.monotonic() - frozen
        (code, launcher_s), = exit_times(launch, frozen, timeout + 60)  # torchrun: +30 s grace for its SIGTERM
    finally:
        if ranks[1].is_running():
            ranks[1].kill()
    assert timeout <= rank0_s <= timeout + 30, rank0_s
    assert code != 0
    lines = error_lines(launch.stderr())
    assert len(lines) == 1 and "lost contact" in lines[0] and "rank 1 stopped answering" in lines[0], \
        launch.text()[-6000:]


def test_heartbeat_ends_a_rank_whose_collective_would_block_past_its_deadline(tiny_bert, tmp_path):
    """What NCCL does with a dead or frozen peer: the collective waiting for it does not
    end by itself in time (NCCL's watchdog would abort it with a C++ trace).  Here the
    collectives' own timeout is --dist_timeout + COLLECTIVE_GRACE_S = 65 s, so rank 0
    blocks in its collective well past the heartbeat's deadline (--dist_timeout 5 s): only
    the heartbeat thread can end it within the bound, with its one line naming rank 1."""
    from tamt_ds.engine import COLLECTIVE_GRACE_S

    timeout, bound = 5, 25
    assert bound < timeout + COLLECTIVE_GRACE_S
    out = tmp_path / "run"
    launch = Launch([torchrun_cmd(SEARCH, search_args(tiny_bert, out, *LONG, "--dist_timeout", timeout))],
                    tmp_path / "logs")
    wait_until(logged(out / "metrics.jsonl", 2), launch)
    ranks = launch.ranks()
    frozen = time.monotonic()
    ranks[1].suspend()
    try:
        ranks[0].wait(timeout=bound)
        rank0_s = time.monotonic() - frozen
        (code, _), = exit_times(launch, frozen, bound + 40)  # torchrun: +30 s grace for its SIGTERM to the frozen rank
    finally:
        if ranks[1].is_running():
            ranks[1].kill()
    assert timeout <= rank0_s <= bound and code != 0, (rank0_s, code)
    lines = error_lines(launch.stderr())
    assert lines == [lines[0]] and lines[0].startswith("error: [rank 0/2 on ") and lines[0].endswith(
        "lost contact with the other ranks: rank 1 stopped answering: no heartbeat for more than 5 s "
        "(died or froze; see their errors above)"), launch.text()[-6000:]
    assert "Timed out" not in launch.stderr() and "unexpected" not in launch.stderr(), launch.text()[-6000:]


FAULT = '''\
# Test fault injection (this file reaches only the processes of one test, via PYTHONPATH):
# global rank 1's third optimizer step raises, as a bug in a library would.
import os
if os.environ.get("RANK") == "1":
    import torch
    _step, _calls = torch.optim.AdamW.step, [0]
    def step(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == 3:
            raise RuntimeError("injected fault in rank 1's optimizer step")
        return _step(self, *args, **kwargs)
    torch.optim.AdamW.step = step
'''


def test_unexpected_exception_on_rank_1_keeps_its_traceback_and_names_rank_1(tiny_bert, tmp_path):
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    out = tmp_path / "run"
    launch = Launch([torchrun_cmd(SEARCH, search_args(tiny_bert, out, *LONG))], tmp_path / "logs",
                    envs=[env(PYTHONPATH=str(tmp_path / "fault"))])
    (code, _), = exit_times(launch, launch.t0, 600)
    err = launch.stderr()
    assert code != 0
    assert "Traceback (most recent call last)" in err and "RuntimeError: injected fault in rank 1's optimizer step" in err
    assert any(line.startswith("error: [rank 1/2 on ") and line.endswith("stopped on the unexpected RuntimeError above")
               for line in error_lines(err)), err[-6000:]


def test_input_error_on_one_node_only_is_one_line_naming_it(tiny_bert, tmp_path):
    """--train_files given relative to the working directory, which only node 0 has: rank 1
    stops with its one-line input error, and rank 0 does not wait for it."""
    hosts, port = hostfile(tmp_path / "hostfile"), free_port()
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for d in cwds:
        d.mkdir()
    (cwds[0] / "corpus.txt").write_text("".join(f"Line {i} of a small test corpus, in plain words.\n" for i in range(3000)))
    args = search_args(tiny_bert, tmp_path / "run", *LONG, "--train_files", "corpus.txt")
    launch = Launch([deepspeed_node(hosts, i, port, SEARCH, args) for i in range(2)], tmp_path / "logs", cwds=cwds)
    codes = exit_times(launch, launch.t0, 600)
    assert all(code != 0 for code, _ in codes), codes
    lines = error_lines(launch.stderr())
    assert len(lines) == 2, launch.text()[-6000:]
    assert lines[0].startswith("error: [rank 0/2 on ") and "rank 1 stopped answering" in lines[0], lines
    assert lines[1].startswith("error: [rank 1/2 on ") and "corpus file not found: 'corpus.txt'" in lines[1], lines
    assert "Traceback" not in launch.stderr(), launch.text()[-6000:]


@pytest.fixture(scope="module")
def diverged_search(tiny_roberta_mlm, tmp_path_factory):
    """MLM with an absurd learning rate: the head's LayerNorm overflows after one step."""
    out = tmp_path_factory.mktemp("nan") / "run"
    args = search_args(tiny_roberta_mlm, out, "--objective", "mlm", "--learning_rate", "1e20", "--warmup_steps", "4",
                       "--max_steps", "10", "--save_steps", "1", "--logging_steps", "100",
                       "--save_total_limit", "0")
    proc = torchrun(SEARCH, *args, check=False, env=env())
    return out, proc


def test_non_finite_loss_stops_the_search_naming_the_step(diverged_search):
    out, proc = diverged_search
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-6000:]
    step = int(lines[0].split("became nan or inf at step ")[1].split(";")[0])
    assert step >= 2 and "lower --learning_rate" in lines[0], lines
    ckpt = out / "checkpoints"
    # The last good checkpoint stays the latest; nothing from the poisoned step was saved or exported.
    assert (ckpt / "latest").read_text().strip() == f"step{step - 1}"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [f"step{s}" for s in range(1, step)]
    assert not (out / "mask.pt").exists() and not (out / "pruned_model").exists()
    state = torch.load(ckpt / f"step{step - 1}" / "rank1.pt", weights_only=False)
    assert state["step"] == step - 1 and state["rank"] == 1


def test_non_finite_loss_stops_finetuning_at_the_step_it_happened(tiny_bert, tmp_path):
    """Checked at logging steps only (every 3rd here): the step named is the first bad one."""
    task = write_local_classification(tmp_path / "task")
    out = tmp_path / "ft"
    proc = subprocess.run([PYTHON, str(FINETUNE), "--model_name_or_path", tiny_bert, "--task", f"local:{task}",
                           "--max_seq_length", "16", "--per_device_train_batch_size", "8", "--max_steps", "8",
                           "--learning_rate", "1e30", "--logging_steps", "3", "--eval_steps", "0", "--save_model",
                           "--output_dir", str(out)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-6000:]
    assert "the training loss became nan or inf at step 2;" in lines[0], lines
    assert not (out / "results.json").exists() and not (out / "model").exists()


# ----------------------------------------------------------------- in process


def test_non_finite_guard_remembers_the_first_bad_step():
    from tamt_ds.guards import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard("cpu")
    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0], start=1):
        guard.observe(torch.tensor(loss), step)
        if step == 2:
            guard.check(kept="x")  # all finite so far: no error
    with pytest.raises(NonFiniteLossError, match="at step 3;"):
        guard.check(kept="x")


def test_only_input_errors_become_one_line(capsys):
    """A ValueError from a library (a bug) keeps its traceback; the project's InputError is one line."""
    from tamt_ds.errors import InputError, run_cli
    from tamt_ds.masking import MaskError

    def bug():
        int("not a number")

    def bad_input():
        raise MaskError("--sparsity must be in [0, 1), got 2: pass e.g. --sparsity 0.7")

    assert issubclass(MaskError, InputError)
    assert run_cli(bug) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "invalid literal for int()" in err
    assert err.strip().splitlines()[-1] == "error: stopped on the unexpected ValueError above"
    assert run_cli(bad_input) == 2
    assert capsys.readouterr().err == "error: --sparsity must be in [0, 1), got 2: pass e.g. --sparsity 0.7\n"


def test_comm_op_build_survives_a_killed_build(tmp_path):
    """A build killed half-way leaves torch's lock file in the extensions dir; DeepSpeed's own
    load then waits on it forever.  build_comm_op clears it (it holds the flock every build takes)."""
    code = "from tamt_ds.engine import build_comm_op; print(build_comm_op())"
    built = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900,
                           check=True).stdout.split()[-1]
    if built == "None":
        pytest.skip("this accelerator has no comm op to build")
    import shutil

    shutil.copytree(os.path.dirname(built), tmp_path / "deepspeed_shm_comm", symlinks=True)
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()  # what a killed build leaves
    again = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=env(TORCH_EXTENSIONS_DIR=str(tmp_path)),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split()[-1] == str(tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so")
    assert not (tmp_path / "deepspeed_shm_comm" / "lock").exists()
