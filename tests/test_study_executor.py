"""The study runner at cluster size: the paper-scale configs' dry runs (job counts, GPU-hours
against a closed form computed here, nothing written, no hub), and the local executor's
device assignment: jobs running at once hold disjoint GPUs and their processes see only those
(made-up device lists: the machine needs no GPU)."""
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT

LAUNCHER = ROOT / "launchers" / "study.py"
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))


@pytest.mark.parametrize("name", ["paper_bert_base", "paper_roberta_base"])
def test_paper_config_dry_run(name, tmp_path):
    out = tmp_path / "never_written"
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--config", f"studies/{name}.yaml", "--dry-run",
                           "--output_dir", str(out)], cwd=ROOT, env=OFFLINE, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    jobs = [l.strip() for l in lines if l.startswith("  masks: ") or l.startswith("  evaluate: ")
            or l.startswith("  finetune: ")]
    # 2 TAMT methods x 5 sparsities x 3 mask seeds searches + 3 IMP runs; 3 evaluations (one per
    # random-mask seed); (dense + 30 TAMT + 15 IMP + 5 OMP + 15 random) masks x (8 GLUE + SQuAD)
    stages = [j.split(":")[0] for j in jobs]
    assert (stages.count("masks"), stages.count("evaluate"), stages.count("finetune")) == (33, 3, 66 * 9)
    assert "0 of 705 cells done; 630 job(s) to run" in proc.stdout
    assert all("GPU-h on" in j for j in jobs)
    assert sum("on 8 GPU(s)" in j for j in jobs) == 36 and sum("on 1 GPU(s)" in j for j in jobs) == 594
    total = next(l for l in lines if l.strip().startswith("total"))
    listed = sum(float(re.search(r"\(([\d.]+) GPU-h on \d+ GPU\(s\)\)$", j).group(1)) for j in jobs)
    assert float(total.split()[-1]) == pytest.approx(listed, rel=0.01, abs=0.5) and listed > 100
    assert "assumed: A100 at 312 TFLOP/s" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_gpu_hours_closed_form():
    """The IMP run's, a SQuAD fine-tune's and a KD search's GPU-hours equal FLOPs counted here
    from the parameter counts (tamt_ds.plan) at the config's assumed throughput."""
    from tamt_ds.plan import Shape, parameter_tensors
    from tamt_ds.models import model_config
    from tamt_ds.study.config import load_config
    from tamt_ds.study.runner import plan

    cfg = load_config(str(ROOT / "studies" / "paper_bert_base.yaml"))
    cfg.output_dir = "/nonexistent/study"
    jobs = {j.name: j for j in plan(cfg)[0]}
    shape = Shape.from_config(model_config("config:bert-base-uncased"))
    t = parameter_tensors(shape)
    matmul = sum(n for k, n in t.items() if k.startswith("encoder.") and k.endswith("dense.weight")
                 or any(f"self.{m}.weight" in k for m in ("query", "key", "value")))
    assert matmul == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    pooler = t["pooler.dense.weight"]  # one token of each sequence: 1/seq of a matrix per token

    def forward(seq):  # per token: 2 x matmul weights + QK^T and AV
        return 2 * (matmul + pooler / seq) + 12 * 4 * seq * 768

    rate = 312e12 * 3600
    head = 768 * 768 + 768 * 30522  # MLM transform + decoder
    # a training token: forward, then activation gradients through every matrix on the loss's
    # path, attention's two matmuls twice, and the trained weights' gradients (not the pooler's:
    # no loss reads it)
    per_token_imp = forward(512) + 2 * head + 2 * (matmul + head) + 2 * 12 * 4 * 512 * 768 + 2 * (matmul + head)
    imp = 9 * 2792 * 16 * 512 * per_token_imp
    assert jobs["imp m1 (levels 0.1..0.9)"].gpu_hours == pytest.approx(imp / (rate * 0.2), rel=1e-9)
    steps = 2 * -(-87599 // 16)  # 2 epochs of batch 16
    per_token_ft = forward(384) + 2 * matmul + 2 * 12 * 4 * 384 * 768 + 2 * matmul
    squad = 3 * (steps * 16 * per_token_ft + (1 + steps // 1000) * 10570 * forward(384)) * 384  # 3 seeds
    assert jobs["finetune omp_s0.7 on squad"].gpu_hours == pytest.approx(squad / (rate * 0.25), rel=1e-9)
    # teacher forward + student forward + backward (the scores' gradients are weight gradients)
    per_token_kd = 2 * forward(512) + 2 * matmul + 2 * 12 * 4 * 512 * 768 + 2 * matmul
    kd = 16752 * 16 * 512 * per_token_kd
    assert jobs["search tamt-kd_s0.7_m2"].gpu_hours == pytest.approx(kd / (rate * 0.2), rel=1e-9)
    assert jobs["search tamt-kd_s0.7_m2"].nproc == 8 and jobs["finetune omp_s0.7 on squad"].nproc == 1


def _job(tmp_path, name: str, nproc: int, seconds: float = 0.4):
    """A self-contained job: a script that records the devices it sees and when it ran."""
    from tamt_ds.study.runner import Job

    script = tmp_path / "record.py"
    script.write_text("import json, os, sys, time\n"
                      "t0 = time.time(); time.sleep(float(sys.argv[2]))\n"
                      "json.dump({'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': t0, 'end': time.time()},"
                      " open(sys.argv[1], 'w'))\n")
    return Job("finetune", name, str(script), [str(tmp_path / f"{name}.json"), str(seconds)], 1.0, 1, nproc=nproc)


def test_local_executor_disjoint_gpus(tmp_path):
    """6 made-up GPUs, up to 4 jobs at a time, jobs of 1, 2 and 3 GPUs: every job gets its count of
    GPUs and sees exactly those in its own process; no two jobs running at once share one."""
    from tamt_ds.study.config import StudyConfig
    from tamt_ds.study.executor import LocalExecutor
    from tamt_ds.study.runner import run_job

    cfg = StudyConfig(output_dir=str(tmp_path / "out"), parallel_jobs=4)
    jobs = [_job(tmp_path, f"j{i}", n) for i, n in enumerate([2, 1, 3, 1, 2, 1, 1, 3, 2, 1])]
    handed: dict[str, list[str]] = {}
    lock = threading.Lock()

    def run(job, gpus):
        with lock:
            handed[job.name] = gpus
        run_job(cfg, job, str(tmp_path / "logs" / f"{job.name}.log"), gpus)

    executor = LocalExecutor(cfg.parallel_jobs, run, gpus=[str(g) for g in range(6)])
    for job in jobs:
        executor.submit(job)
    executor.wait()
    seen = {j.name: json.loads((tmp_path / f"{j.name}.json").read_text()) for j in jobs}
    for j in jobs:
        assert len(handed[j.name]) == j.nproc
        assert seen[j.name]["gpus"] == ",".join(handed[j.name])  # the child sees its own GPUs only
    overlapping = 0
    for a in jobs:
        for b in jobs:
            if a.name < b.name and seen[a.name]["start"] < seen[b.name]["end"] and seen[b.name]["start"] < seen[a.name]["end"]:
                overlapping += 1
                assert not set(handed[a.name]) & set(handed[b.name]), (a.name, b.name, handed)
    assert overlapping >= 3  # the check can fail: jobs did run side by side


def test_local_executor_cpu_and_errors(tmp_path, monkeypatch):
    """Without GPUs a job gets none (and no CUDA_VISIBLE_DEVICES of ours); a job needing more GPUs than
    the machine has is refused in one line; a failed job's error reaches wait()."""
    from tamt_ds.study.config import StudyConfig, StudyError
    from tamt_ds.study.executor import LocalExecutor
    from tamt_ds.study.runner import run_job

    cfg = StudyConfig(output_dir=str(tmp_path / "out"), parallel_jobs=2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    executor = LocalExecutor(2, lambda job, gpus: run_job(cfg, job, str(tmp_path / "cpu.log"), gpus), gpus=[])
    executor.submit(_job(tmp_path, "cpu", nproc=1, seconds=0))
    executor.wait()
    assert json.loads((tmp_path / "cpu.json").read_text())["gpus"] is None

    too_big = LocalExecutor(2, lambda job, gpus: None, gpus=["0", "1"])
    too_big.submit(_job(tmp_path, "big", nproc=4))
    with pytest.raises(StudyError, match="needs 4 GPUs, this machine has 2"):
        too_big.wait()

    broken = _job(tmp_path, "broken", nproc=1)
    broken.args = ["/nonexistent/dir/out.json", "0"]
    failing = LocalExecutor(2, lambda job, gpus: run_job(cfg, job, str(tmp_path / "broken.log"), gpus), gpus=[])
    failing.submit(broken)
    with pytest.raises(StudyError, match="broken failed"):
        failing.wait()


def test_visible_gpus_follows_the_inherited_setting(monkeypatch):
    from tamt_ds.study.executor import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5, 7")
    assert visible_gpus() == ["3", "5", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_per_method_search_arguments_and_gpu_section(tmp_path):
    """A search argument may be given per TAMT method (then per sparsity inside); the gpu section
    names a known GPU; both are refused in one line otherwise."""
    import yaml

    from tamt_ds.study.config import StudyError, load_config

    raw = {"methods": ["tamt-mlm", "tamt-kd", "omp"], "sparsities": [0.5, 0.7],
           "search": {"learning_rate": {"tamt-mlm": 5.0e-5, "tamt-kd": 2.0e-5},
                      "max_steps": {"tamt-mlm": {0.5: 10, 0.7: 20}, "tamt-kd": 7}, "weight_decay": 0.01},
           "gpu": {"name": "h100", "search_mfu": 0.3}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(str(path))
    assert cfg.search_args(0.7, "tamt-mlm") == {"learning_rate": 5.0e-5, "max_steps": 20, "weight_decay": 0.01}
    assert cfg.search_args(0.5, "tamt-kd") == {"learning_rate": 2.0e-5, "max_steps": 7, "weight_decay": 0.01}
    assert cfg.gpu.peak_flops == 989e12 and cfg.gpu.search_mfu == 0.3 and cfg.gpu.finetune_mfu == 0.25
    for change, message in (({"gpu": {"name": "tpu"}}, "gpu: name 'tpu' unknown"),
                            ({"gpu": {"name": "a100", "flops": 1}}, "gpu: unknown key(s) ['flops']"),
                            ({"search": {"max_steps": {"tamt-mlm": {0.5: 10}}}}, "without a value for [0.7]")):
        path.write_text(yaml.safe_dump({**raw, **change}))
        with pytest.raises(StudyError, match=re.escape(message)):
            load_config(str(path))
