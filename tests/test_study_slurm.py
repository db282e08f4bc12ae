"""`executor: slurm` without a cluster (the real one: tests/test_slurm_study.py, `make test-cluster`):
each job's batch script asks for the allocation its ranks need and, run as SLURM runs it (srun and
scontrol faked, tests/test_launch_multinode.py), starts the job's own command on every node with
the right ranks; the controller loop against a fake batch system submits a job once the mask it
reads exists, resubmits one that ended without its results up to slurm.max_attempts, waits for a
job an earlier controller submitted instead of submitting it twice, and stops in one line naming
the job it gave up on; the config's executor and slurm section load, or fail in one line; every launcher a job runs takes
node.sh's --dist_timeout."""
import json
import os
import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.test_launch_multinode import fake_slurm, slurm_env


def study(tmp_path, **slurm):
    from tamt_ds.study.config import SlurmSettings, StudyConfig

    return StudyConfig(name="t", output_dir=str(tmp_path / "out"), executor="slurm", slurm=SlurmSettings(**slurm))


def job(tmp_path, name, nproc=1, needs=(), stage="finetune", script="launchers/finetune.py", args=None):
    from tamt_ds.study.runner import Job

    out = tmp_path / "results" / f"{name}.json"
    return Job(stage, name, script, args if args is not None else ["--output_dir", str(out), "--task", "a b"], 1.0, 1,
               [str(out)], nproc, needs=[str(p) for p in needs])


def sbatch_options(script: str) -> list[str]:
    return [l.split(None, 1)[1] for l in script.splitlines() if l.startswith("#SBATCH ")]


def test_allocation_per_job(tmp_path):
    """Searches fill whole nodes (exclusive: all their CPUs), a one-GPU fine-tune takes part of a node
    with cpus_per_rank CPUs; without GPUs a job is one node of CPU ranks; the settings reach sbatch."""
    from tamt_ds.study.slurm import batch_script

    cfg = study(tmp_path, partition="gpu", account="lab", time="4:00:00", sbatch_args=["--qos=high"])
    search = sbatch_options(batch_script(cfg, job(tmp_path, "s", nproc=32, stage="masks"), "n1", "/l/s.log"))
    assert search == ["--job-name=n1", "--output=/l/s.log", "--open-mode=append", "--nodes=4", "--ntasks-per-node=1",
                      "--gpus-per-node=8", "--exclusive", "--partition=gpu", "--account=lab", "--time=4:00:00",
                      "--qos=high"]
    finetune = batch_script(cfg, job(tmp_path, "f"), "n2", "/l/f.log")
    assert sbatch_options(finetune)[1:] == ["--output=/l/f.log", "--open-mode=append", "--nodes=1",
                                            "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=4",
                                            "--partition=gpu", "--account=lab", "--time=4:00:00", "--qos=high"]
    assert "NPROC_PER_NODE=1 " in finetune
    assert finetune.rstrip().endswith("launchers/slurm/node.sh launchers/finetune.py --output_dir "
                                      f"{tmp_path}/results/f.json --task 'a b'")
    cpu = batch_script(study(tmp_path, gpus_per_node=0, cpus_per_rank=1), job(tmp_path, "c", nproc=2), "n3", "/l/c")
    assert sbatch_options(cpu)[1:] == ["--output=/l/c", "--open-mode=append", "--nodes=1", "--ntasks-per-node=1",
                                       "--cpus-per-task=2"]
    assert "NPROC_PER_NODE=2 " in cpu


def test_batch_script_runs_the_jobs_command_on_every_node(tmp_path):
    """The script as SLURM runs it on 2 nodes (srun, scontrol faked): every rank of the job's own
    command starts, with its global rank, from the repository root, with the job's arguments."""
    from tamt_ds.study.slurm import batch_script

    record = tmp_path / "record.py"
    record.write_text("import json, os, sys\n"
                      "json.dump({'rank': os.environ['RANK'], 'world': os.environ['WORLD_SIZE'], 'cwd': os.getcwd(),"
                      " 'argv': sys.argv[1:]}, open(sys.argv[-1] + os.environ['RANK'], 'w'))\n")
    script = tmp_path / "job.sbatch"
    script.write_text(batch_script(study(tmp_path, gpus_per_node=1), job(tmp_path, "r", nproc=2, script=str(record),
                                                                           args=[str(tmp_path / "rank")]), "n", "/l"))
    fake_slurm(tmp_path / "bin", ["localhost", "localhost"])
    environment = slurm_env(tmp_path, MASTER_PORT=str(free_port()))
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(["bash", str(script)], env=environment, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job 4242: finetune: 2 node(s) x 1 rank(s), rank 0 on localhost" in proc.stdout
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["cwd"]) for r in ranks] == [("0", "2", str(ROOT)), ("1", "2", str(ROOT))]
    assert ranks[0]["argv"] == ["--dist_timeout", "600", str(tmp_path / "rank")]


class FakeSlurm:
    """A batch system in memory: a job is RUNNING for one squeue, then ends, writing its results unless
    `fail` says how many of its attempts end without them (cancelled, crashed), and is COMPLETING for
    one squeue more (its results already there, as SLURM lists a job until its processes are reaped)."""

    def __init__(self, fail: dict[str, int] | None = None):
        self.fail = dict(fail or {})
        self.state: dict[str, tuple[str, str]] = {}  # job name -> (id, state)
        self.submitted: list[str] = []  # job names, in order
        self.jobs: dict[str, object] = {}
        self.logs: dict[str, str] = {}
        self.sacct: dict[str, str] = {}  # job id -> its `sacct -n -P -X -o Start,End,TotalCPU` line (none: no accounting)

    def times(self, job_id: str):
        """As sacct: no end while squeue still lists the job."""
        from tamt_ds.study.slurm import parse_sacct

        listed = any(job_id == i for i, _ in self.state.values())
        return None if listed else parse_sacct(self.sacct.get(job_id, ""))

    def submit(self, script: str) -> str:
        text = open(script).read()
        name = re.search(r"--job-name=(\S+)", text).group(1)
        self.logs[name] = re.search(r"--output=(\S+)", text).group(1)
        self.submitted.append(name)
        self.state[name] = (str(len(self.submitted) + 100), "PENDING")
        return self.state[name][0]

    def queued(self, prefix: str):
        for name, (job_id, state) in list(self.state.items()):
            if state == "COMPLETING":
                del self.state[name]
            elif state == "RUNNING":
                self.state[name] = (job_id, "COMPLETING")
                short = name.removeprefix(prefix).rsplit("-", 1)[0]
                if self.fail.get(short, 0) > 0:
                    self.fail[short] -= 1
                    with open(self.logs[name], "a") as f:
                        f.write(f"slurmstepd-n01: error: *** JOB {job_id} ON n01 CANCELLED AT 2026-12-05 ***\n"
                                + "search:  9%|  | 3/32\r" * 50 + "\nTraceback (most recent call last):\n" * 50)
                else:
                    for out in self.jobs[name].outputs:
                        with open(out, "w") as f:
                            f.write("{}")
            else:
                self.state[name] = (job_id, "RUNNING")
        return dict(self.state)


def controller(tmp_path, jobs, fake, **slurm):
    """The executor over `jobs`, planned again each round as the runner does: those without results."""
    import os

    from tamt_ds.study.slurm import SlurmExecutor, job_key, study_tag

    cfg = study(tmp_path, **slurm)
    (tmp_path / "results").mkdir(exist_ok=True)
    fake.jobs = {study_tag(cfg) + job_key(j): j for j in jobs}
    lines = []
    executor = SlurmExecutor(cfg, lambda: [j for j in jobs if not all(map(os.path.isfile, j.outputs))],
                             lines.append, fake, sleep=lambda s: None)
    return executor, lines, {j.name: study_tag(cfg) + job_key(j) for j in jobs}


def test_controller_waits_for_masks_and_resubmits_a_failed_job(tmp_path):
    search = job(tmp_path, "search", stage="masks")
    mask = search.outputs[0]
    jobs = [search, job(tmp_path, "evaluate", needs=[mask], stage="evaluate"), job(tmp_path, "finetune", needs=[mask])]
    fake = FakeSlurm(fail={"search": 1})
    executor, lines, names = controller(tmp_path, jobs, fake, max_attempts=2)
    executor.wait()
    # the search twice (its first job ended without the mask), then its two dependents, once each
    assert fake.submitted == [names["search"], names["search"], names["evaluate"], names["finetune"]]
    assert any(l.endswith("job 101 ended without its results (*** JOB 101 ON n01 CANCELLED AT 2026-12-05 ***): "
                          "search; resubmitting (attempt 2 of 2)") for l in lines), lines
    assert sum("wrote its results" in l for l in lines) == 3
    from tamt_ds.study.slurm import job_key

    script = (tmp_path / "out" / "slurm" / f"{job_key(jobs[2])}.sbatch").read_text()  # what was submitted
    assert f"--job-name={names['finetune']}" in script and "launchers/finetune.py --output_dir" in script


def test_controller_attaches_to_a_job_an_earlier_run_submitted(tmp_path):
    search = job(tmp_path, "search", stage="masks")
    jobs = [search, job(tmp_path, "finetune", needs=search.outputs)]
    fake = FakeSlurm()
    executor, lines, names = controller(tmp_path, jobs, fake)
    fake.state = {names["search"]: ("77", "PENDING")}  # queued by a controller that died
    executor.wait()
    assert fake.submitted == [names["finetune"]]  # the search was not submitted again
    assert any(l.startswith("attached to job 77 (RUNNING, ") and l.endswith("search") for l in lines), lines


def test_controller_gives_up_after_max_attempts_and_finishes_the_rest(tmp_path):
    from tamt_ds.study.config import StudyError

    search = job(tmp_path, "search", stage="masks")
    jobs = [search, job(tmp_path, "finetune", needs=search.outputs), job(tmp_path, "dense")]
    fake = FakeSlurm(fail={"search": 5})
    executor, lines, names = controller(tmp_path, jobs, fake, max_attempts=3)
    with pytest.raises(StudyError, match=r"^search ended 3 time\(s\) without its results \(slurm.max_attempts\) and "
                                         r"1 other job\(s\) are left; its log: .*logs/search.log; fix it"):
        executor.wait()
    assert sorted(fake.submitted) == sorted([names["search"]] * 3 + [names["dense"]])  # the finetune never
    assert (tmp_path / "results" / "dense.json").is_file()


def test_squeue_lines_of_other_jobs_are_not_the_studys():
    from tamt_ds.study.slurm import parse_squeue

    text = "12|RUNNING|tamt-0123abcd-search_x-1\n13|PENDING|tamt-99999999-search_x-1\n14|COMPLETING|bash\n"
    assert parse_squeue(text, "tamt-0123abcd-") == {"tamt-0123abcd-search_x-1": ("12", "RUNNING")}


def test_plan_names_the_masks_each_job_reads(tmp_path):
    """What the controller waits for: a fine-tune its mask (none for the dense model), an evaluation
    the searched and IMP masks (OMP and random masks it writes itself)."""
    from tamt_ds.study.config import load_config
    from tamt_ds.study.runner import mask_path, plan
    from tamt_ds.study.config import MaskCell
    from tests.test_study import tiny_config

    cfg = load_config(str(tiny_config(tmp_path, "some/model")))
    jobs = plan(cfg)[0]
    evaluate = [j for j in jobs if j.stage == "evaluate"]
    assert len(evaluate) == 1 and sorted(evaluate[0].needs) == sorted(
        mask_path(cfg, MaskCell(m, s, 1, b)) for m, s, b in [("tamt-kd", 0.2, None), ("tamt-kd", 0.4, None),
                                                               ("imp", 0.2, None), ("imp", 0.4, None),
                                                               ("tamt-kd", 0.4, 2), ("imp", 0.4, 1)])
    finetune = {j.name: j.needs for j in jobs if j.stage == "finetune"}
    assert finetune["finetune dense on single"] == []
    assert finetune["finetune omp_s0.4 on pairs"] == [mask_path(cfg, MaskCell("omp", 0.4, None))]
    assert finetune["finetune tamt-kd_s0.4_m1_step2 on single"] == [mask_path(cfg, MaskCell("tamt-kd", 0.4, 1, 2))]
    assert all(j.needs == [] for j in jobs if j.stage == "masks")


@pytest.mark.parametrize("change, message", [
    ({"executor": "pbs"}, "executor must be local or slurm, got 'pbs'"),
    ({"slurm": {"gpus_per_node": -1}}, "slurm.gpus_per_node must be a whole number >= 0, got -1"),
    ({"slurm": {"nodes": 2}}, "slurm: unknown key(s) ['nodes']"),
    ({"slurm": {"sbatch_args": "--qos=high"}}, "slurm.sbatch_args must be a list of sbatch options"),
    ({"executor": "slurm", "launcher": "torchrun", "nproc": 12}, "nproc 12 does not fill whole nodes of "
                                                                "slurm.gpus_per_node 8"),
])
def test_executor_config_errors(change, message, tmp_path):
    from tamt_ds.study.config import StudyError, load_config

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"methods": ["omp"], **change}))
    with pytest.raises(StudyError, match=re.escape(message)):
        load_config(str(path))


def test_executor_config_loads(tmp_path):
    from tamt_ds.study.config import load_config

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"methods": ["omp"], "executor": "slurm", "launcher": "torchrun", "nproc": 16,
                                    "slurm": {"partition": "a100", "time": "2:00:00", "max_attempts": 5}}))
    cfg = load_config(str(path))
    assert cfg.executor == "slurm" and cfg.slurm.partition == "a100" and cfg.slurm.max_attempts == 5
    assert cfg.slurm.gpus_per_node == 8 and load_config(str(ROOT / "studies" / "embedded.yaml")).executor == "local"


def test_every_study_launcher_takes_node_sh_dist_timeout():
    """launchers/slurm/node.sh passes --dist_timeout to every job's launcher: searches, IMP runs,
    evaluations and fine-tunes all take it (IMP and evaluation did not), and refuse 0 in one line."""
    from tamt_ds import evaluate_mask, imp, search
    from tamt_ds.downstream.arguments import parse_args as finetune_args
    from tamt_ds.errors import InputError

    assert search.parse_args(["--dist_timeout", "30"])[0].dist_timeout == 30
    assert finetune_args(["--task", "sst2", "--dist_timeout", "30"]).dist_timeout == 30
    args, data = imp.parse_args(["--dist_timeout", "30"])
    assert args.dist_timeout == 30
    imp.validate(args, data)
    args.dist_timeout = 0
    with pytest.raises(InputError, match=r"^--dist_timeout must be at least 1, got 0"):
        imp.validate(args, data)
    args = evaluate_mask.parse_args(["--dist_timeout", "30"])
    assert args.dist_timeout == 30
    evaluate_mask.validate(args)
    args.dist_timeout = 0
    with pytest.raises(InputError, match=r"^--dist_timeout must be at least 1, got 0"):
        evaluate_mask.validate(args)


def test_executor_on_the_command_line(tmp_path, capsys, monkeypatch):
    """--executor slurm overrides the config's executor and is checked like it: a study whose searches
    do not fill whole nodes is refused in one line (exit code 2) before anything is written."""
    from tamt_ds.study.cli import main

    monkeypatch.delenv("TAMT_DEBUG", raising=False)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"methods": ["omp"], "launcher": "torchrun", "nproc": 12,
                                    "output_dir": str(tmp_path / "out")}))
    assert main(["--config", str(path), "--executor", "slurm", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nproc 12 does not fill whole nodes of slurm.gpus_per_node 8" in err[0], err
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_each_jobs_allocation(tmp_path, capsys):
    """--dry-run of a SLURM study: under each job, the one line of sbatch options its allocation would ask
    for (a 16-rank search: 2 whole nodes; a one-GPU fine-tune: part of one), and what SLURM picks where the
    config says nothing; nothing is written."""
    from tamt_ds.study.config import SlurmSettings, load_config
    from tamt_ds.study.runner import run_study
    from tests.test_study import tiny_config

    cfg = load_config(str(tiny_config(tmp_path, "some/model")))
    cfg.executor, cfg.nproc, cfg.finetune_nproc = "slurm", 16, 1
    cfg.slurm = SlurmSettings(partition="gpu", time="4:00:00")
    run_study(cfg, dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    jobs = [i for i, l in enumerate(lines) if l.startswith("  ") and not l.startswith("   ")
            and l.split(":")[0].strip() in ("masks", "evaluate", "finetune")]
    assert len(jobs) > 5 and all(lines[i + 1].startswith("      sbatch --nodes=") for i in jobs), lines
    request = {lines[i].split(" (")[0].strip(): lines[i + 1].strip() for i in jobs}
    assert request["masks: search tamt-kd_s0.2_m1"] == ("sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 "
                                                        "--exclusive --partition=gpu --time=4:00:00")
    assert request["finetune: finetune omp_s0.4 on pairs"] == ("sbatch --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 "
                                                               "--cpus-per-task=4 --partition=gpu --time=4:00:00")
    cfg.slurm = SlurmSettings(gpus_per_node=0, cpus_per_rank=2, sbatch_args=["--time=1:00:00"])
    run_study(cfg, dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    search = lines[lines.index(next(l for l in lines if l.startswith("  masks: search tamt-kd_s0.2_m1"))) + 1]
    assert search == ("      sbatch --nodes=1 --ntasks-per-node=1 --cpus-per-task=32 --time=1:00:00 "
                      "(no --partition: the cluster's default)")
    assert not (tmp_path / "study").exists()


class Clock:
    """time.time for the controller: each of its sleeps advances it by poll_seconds."""

    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def stamp(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


@pytest.mark.parametrize("accounting", [False, True])
def test_controller_writes_timings(tmp_path, accounting):
    """A SLURM study writes OUTPUT/timings.json as a local one does (a row per job, a "(stage)" row per
    stage): each job's start and end from sacct where the cluster keeps accounting, else as the controller
    saw them (squeue every poll_seconds); a resubmitted job's row is the attempt that wrote its results; a
    stage runs from its first job's start to its last job's end."""
    from tamt_ds.study.slurm import SlurmExecutor, job_key, study_tag

    search = job(tmp_path, "search", stage="masks")
    jobs = [search, job(tmp_path, "finetune", needs=search.outputs), job(tmp_path, "dense")]
    cfg = study(tmp_path, max_attempts=2, poll_seconds=30)
    (tmp_path / "results").mkdir()
    fake, clock = FakeSlurm(fail={"search": 1}), Clock()
    fake.jobs = {study_tag(cfg) + job_key(j): j for j in jobs}
    if accounting:  # ids in submission order: 101 the failed search, 102 dense, 103 the search again, 104 finetune
        fake.sacct = {"102": "2026-12-05T10:00:00|2026-12-05T10:01:00|00:30\n",
                      "103": "2026-12-05T10:00:00|2026-12-05T10:04:10|01:02.500\n",
                      "104": "2026-12-05T10:05:00|2026-12-05T11:05:30|1-00:00:01\n"}
    SlurmExecutor(cfg, lambda: [j for j in jobs if not os.path.isfile(j.outputs[0])], lambda line: None, fake,
                  clock.sleep, clock).wait()
    rows = json.loads((tmp_path / "out" / "timings.json").read_text())
    t0 = 1_800_000_000.0  # the first squeue; the fake runs a job for one round, then lists it COMPLETING
    if accounting:
        expected = [("finetune", "dense", "102", 60.0, 30.0, "2026-12-05 10:00:00", "2026-12-05 10:01:00", "sacct"),
                    ("masks", "search", "103", 250.0, 62.5, "2026-12-05 10:00:00", "2026-12-05 10:04:10", "sacct"),
                    ("finetune", "finetune", "104", 3630.0, 86401.0, "2026-12-05 10:05:00", "2026-12-05 11:05:30",
                     "sacct"),
                    ("masks", "(stage)", None, 250.0, 0.0, "2026-12-05 10:00:00", "2026-12-05 10:04:10", None),
                    ("finetune", "(stage)", None, 3930.0, 0.0, "2026-12-05 10:00:00", "2026-12-05 11:05:30", None)]
    else:  # dense RUNNING at t0+30, its results seen at +60; the search's first job gone at +90 and resubmitted,
        # RUNNING at +120, its mask seen at +150; the fine-tune submitted then, RUNNING at +180, done at +210
        expected = [("finetune", "dense", "102", 30.0, None, stamp(t0 + 30), stamp(t0 + 60), "squeue"),
                    ("masks", "search", "103", 30.0, None, stamp(t0 + 120), stamp(t0 + 150), "squeue"),
                    ("finetune", "finetune", "104", 30.0, None, stamp(t0 + 180), stamp(t0 + 210), "squeue"),
                    ("masks", "(stage)", None, 30.0, 0.0, stamp(t0 + 120), stamp(t0 + 150), None),
                    ("finetune", "(stage)", None, 180.0, 0.0, stamp(t0 + 30), stamp(t0 + 210), None)]
    assert [(r["stage"], r["job"], r.get("slurm_job"), r["seconds"], r.get("cpu_seconds"), r["started"],
             r["finished"], r.get("timed_by")) for r in rows] == expected
    assert all(r["cells"] == 1 and r["estimated_cpu_seconds"] == 1.0 and r["gpus"] == 1 for r in rows[:3])
    assert [(r["cells"], r["estimated_cpu_seconds"]) for r in rows[3:]] == [(1, 1.0), (2, 2.0)]
    from tamt_ds.study.report import markdown  # study.md's line, CPU time only where SLURM measured it

    assert ("Time per stage (timings.json; a resumed study adds up its runs): " + (
        "masks 4.2 min wall, 1.0 CPU-min, finetune 65.5 min wall, 1440.5 CPU-min." if accounting
        else "masks 0.5 min wall, finetune 3.0 min wall.")) in markdown(cfg, [], [], [], "test", rows)


def test_sacct_lines():
    from tamt_ds.study.slurm import parse_sacct, slurm_duration

    assert parse_sacct("2026-12-05T10:00:00|Unknown|00:00:00\n") is None  # still running, or not recorded yet
    assert parse_sacct("") is None
    times = parse_sacct("2026-12-05T10:00:00|2026-12-05T10:00:07|00:00:00\n")
    assert times.ended - times.started == 7 and times.cpu_seconds is None  # TotalCPU 0: not gathered
    assert [slurm_duration(t) for t in ("00:01.250", "02:03:04", "3-00:00:10", "")] == [1.25, 7384, 259210, 0]
