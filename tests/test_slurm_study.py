"""A study through a real one-node SLURM cluster (`make test-cluster`; tests/slurm.py): a tiny study
(one search, its evaluation, one fine-tune) run by launchers/study.py --executor slurm, with its
search job scancelled after a checkpoint (the controller resubmits it; it resumes), and the
controller SIGKILLed while the fine-tune job is in the queue (held there: scontrol suspend) and
run again (it waits for that job instead of submitting it twice): its study.json equals a local
run's, row for row and number for number; its timings.json has each job's start and end as SLURM
recorded them."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.cluster import env
from tests.conftest import ROOT
from tests.slurm import Job, Slurm
from tests.test_study import write_task

pytestmark = pytest.mark.cluster

LAUNCHER = ROOT / "launchers" / "study.py"


def tiny_study(tmp, model: str) -> "os.PathLike":
    write_task(tmp / "tasks", "single", pair=False)
    cfg = {
        "name": "slurm", "model_name_or_path": model, "deepspeed": "ds_configs/zero3_cpu.json",
        "methods": ["tamt-kd"], "sparsities": [0.4], "mask_seeds": [1], "dense_reference": False,
        "search": {"max_steps": 32, "save_steps": 4, "per_device_train_batch_size": 4, "max_seq_length": 32,
                   "validation_blocks": 4, "eval_steps": 0, "logging_steps": 4, "threshold_reset_steps": 2,
                   "learning_rate": 5e-3},
        "evaluate": {"eval_blocks": 8, "max_seq_length": 32, "per_device_eval_batch_size": 4},
        "finetune": {"tasks": ["single"], "task_data_dir": str(tmp / "tasks"), "seeds": [1],
                     "args": {"max_steps": 3, "max_seq_length": 32, "per_device_train_batch_size": 8,
                              "eval_steps": 0, "learning_rate": 1e-3}},
        # the test cluster has CPUs only: one node, one CPU per rank; squeue every second
        "slurm": {"gpus_per_node": 0, "cpus_per_rank": 1, "max_attempts": 2, "poll_seconds": 1},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Controller:
    """launchers/study.py --executor slurm in the background, its output in a file."""

    def __init__(self, slurm: Slurm, config, out, log):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(LAUNCHER), "--config", str(config), "--output_dir", str(out),
                                      "--executor", "slurm"], cwd=ROOT, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, env=env(SLURM_CONF=slurm.conf))

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 900) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text(), re.M)
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"no line {pattern!r} from the controller:\n{self.text()[-6000:]}")


def rows(out) -> list[dict]:
    """study.json without what measures time (seconds, dates): the same study gives the same rest."""
    def keep(key: str) -> bool:
        return not any(word in key for word in ("second", "time", "date", "finished"))

    return [{k: v for k, v in r.items() if keep(k)} for r in json.loads((out / "study.json").read_text())]


def test_study_through_slurm_equals_local(tmp_path):
    from tests.tiny_bert_mlm import make_tiny_bert_mlm

    slurm = Slurm()
    config = tiny_study(tmp_path, make_tiny_bert_mlm(str(tmp_path / "model")))
    local = subprocess.run([sys.executable, str(LAUNCHER), "--config", str(config), "--output_dir",
                            str(tmp_path / "local")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1800)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]

    out = tmp_path / "slurm"
    first = Controller(slurm, config, out, tmp_path / "controller1.log")
    search_id = first.wait_for(r"^submitted job (\d+): masks: search tamt-kd_s0.4_m1 ").group(1)
    search = Job(search_id, out / "logs" / "search_tamt-kd_s0.4_m1.log")
    latest = out / "masks" / "tamt-kd_s0.4_m1" / "checkpoints" / "latest"
    slurm.wait_until(search, latest.exists)
    slurm.cancel(search)  # mid-search: the controller sees it leave the queue without its mask
    first.wait_for(r"ended without its results .*: search tamt-kd_s0.4_m1; resubmitting \(attempt 2 of 2\)")
    again = first.wait_for(rf"^submitted job (?!{search_id}:)(\d+): masks: search").group(1)
    assert slurm.wait(Job(again, search.output)) == ("COMPLETED", "0:0"), search.text()[-6000:]
    assert "resumed from step" in search.text()
    first.wait_for(rf"^      job {again} wrote its results: masks: search tamt-kd_s0.4_m1$")

    finetune_id = first.wait_for(r"^submitted job (\d+): finetune: ").group(1)
    finetune = Job(finetune_id, out / "logs" / "finetune_tamt-kd_s0.4_m1_on_single.log")
    while slurm.state(finetune) not in ("RUNNING", ""):
        time.sleep(0.2)
    slurm.run("scontrol", "suspend", finetune_id)  # it stays in the queue while the controller is down
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert slurm.state(finetune) == "SUSPENDED" and not (out / "study.json").exists()

    second = Controller(slurm, config, out, tmp_path / "controller2.log")
    second.wait_for(rf"^attached to job {finetune_id} \(SUSPENDED, submitted by an earlier run\): finetune: ")
    slurm.run("scontrol", "resume", finetune_id)
    assert second.proc.wait(timeout=900) == 0, second.text()[-6000:]
    assert "submitted job" not in second.text()  # nothing ran twice: the search resumed, the rest once

    # what the cluster ran: the search twice (cancelled, then completed), the evaluation and fine-tune once
    names = {re.search(r"--job-name=(\S+)", p.read_text()).group(1) for p in (out / "slurm").glob("*.sbatch")}
    records = slurm.run("sacct", "-c", "-n", "-P", "-o", "JobID,JobName,State").stdout.split()
    mine = {r.split("|")[0]: r.split("|")[2] for r in records  # (a study at this path before: smaller ids)
            if r.split("|")[1] in names and int(r.split("|")[0]) >= int(search_id)}
    assert sorted(mine.values()) == ["CANCELLED", "COMPLETED", "COMPLETED", "COMPLETED"], records
    assert mine[search_id] == "CANCELLED" and mine[finetune_id] == "COMPLETED"

    # timings.json: a row per job that wrote its results, its start and end SLURM's own (here the job
    # completion file: no CPU time); the search's is its second job's; the killed controller wrote no
    # stage rows, the second one the fine-tune's (and the evaluation's where that ran on under it)
    timings = json.loads((out / "timings.json").read_text())
    recorded = {r.split("|")[0]: [t.replace("T", " ") for t in r.split("|")[1:]]
                for r in slurm.run("sacct", "-c", "-n", "-P", "-o", "JobID,Start,End").stdout.split()}
    timed = {t["slurm_job"]: t for t in timings if t["job"] != "(stage)"}
    stages = {t["stage"]: [t["started"], t["finished"]] for t in timings if t["job"] == "(stage)"}
    assert len(timed) + len(stages) == len(timings) and {again, finetune_id} <= set(timed) and search_id not in timed
    assert timed[again]["job"] == "search tamt-kd_s0.4_m1" and timed[finetune_id]["stage"] == "finetune"
    assert all([t["started"], t["finished"]] == recorded[i] and t["timed_by"] == "sacct" and "cpu_seconds" not in t
               for i, t in timed.items()), (timings, recorded)
    assert "masks" not in stages and stages["finetune"] == recorded[finetune_id], timings

    assert rows(out) == rows(tmp_path / "local")
    assert len(rows(out)) >= 2 and all(r["method"] == "tamt-kd" for r in rows(out))
