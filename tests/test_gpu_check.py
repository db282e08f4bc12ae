"""scripts/gpu_check.sh without a GPU: its parsing half (tamt_ds/gpu_check.py) on the nvidia-smi
output a node really prints (blank, cut-off and [N/A] lines, a CUDA_VISIBLE_DEVICES subset),
the summary it writes from a check's output folder, and the script's syntax."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tamt_ds import gpu_check
from tests.conftest import ROOT

SMI_GPUS = "0, GPU-aaaa1111-0000\n1, GPU-bbbb2222-0000\n\n2, GPU-cccc3333-0000\n3, GPU-dddd4444-0000\n"


@pytest.mark.parametrize("setting, expect", [
    (None, ["0", "1", "2", "3"]),                     # unset: every GPU
    ("2,3", ["2", "3"]),
    ("3,1", ["3", "1"]),                              # CUDA's order is the variable's
    ("GPU-cccc,0", ["2", "0"]),                       # UUID prefixes
    ("1,7,2", ["1"]),                                 # CUDA stops at the first entry naming no GPU
    ("1,1", ["1"]),
    ("GPU-", []),                                     # ambiguous prefix
    ("", []), ("-1", []), ("MIG-abcd", []),
])
def test_visible_gpus_follow_cuda_visible_devices(setting, expect):
    assert gpu_check.visible_gpus(SMI_GPUS, setting) == expect


def test_memory_peaks_survive_blank_partial_and_na_lines_and_keep_to_the_visible_gpus():
    samples = "\n".join([
        "0, 1024", "1, 40000", "2, 79000", "",            # blank line between two samples
        "0, 81559", "1, [N/A]", "2, [Not Supported]",
        "1, 40960", "0", "1, 4", "3, 70000",               # "0": cut off when the sampler was killed
        "2, 7", "   ", "1, 409",
    ]) + "\n0, 5"                                          # no final newline
    peaks, unreadable = gpu_check.memory_peaks_gb(samples, ["0", "1"])
    assert peaks == {"0": pytest.approx(81559 * 2**20 / 1e9), "1": pytest.approx(40960 * 2**20 / 1e9)}
    assert peaks["0"] == pytest.approx(85.52, abs=0.01)  # 81559 MiB is 85.5 GB (not 81.6: MiB, not MB)
    assert unreadable == 3
    assert gpu_check.memory_peaks_gb("", ["0"]) == ({}, 0)


def run_visible(setting):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if setting is not None:
        env["CUDA_VISIBLE_DEVICES"] = setting
    return subprocess.run([sys.executable, "-m", "tamt_ds.gpu_check", "visible"], input=SMI_GPUS, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_visible_command_prints_the_indices_or_one_error_line():
    assert run_visible(None).stdout == "0,1,2,3\n"
    assert run_visible("GPU-dddd,1").stdout == "3,1\n"
    proc = run_visible("5")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: no GPU to check: nvidia-smi lists none that CUDA_VISIBLE_DEVICES='5' "
                                        "names; unset CUDA_VISIBLE_DEVICES or name GPUs by index or UUID"]


def test_script_syntax_and_its_gpu_selection():
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "export CUDA_DEVICE_ORDER=PCI_BUS_ID" in text  # nvidia-smi's numbering is CUDA's
    assert "--num_gpus \"" not in text  # DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES when given it
    assert text.count('"${LAUNCH[@]}" launchers/') >= 6


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_check_output(out, tiny_bert, *, scaler_iter: int = 20, resumed: bool = True):
    """What the script leaves in OUT, written by hand: the summary's inputs."""
    rows = [{"step": s, "train/loss": 1.0, "perf/tokens_per_s": 1000.0 * s, "perf/gpu_max_allocated_mb": 10_000.0 + s}
            for s in (10, 20, 30)]
    write_metrics(out / "search" / "metrics.jsonl", rows)
    (out / "finetune").mkdir()
    (out / "finetune" / "results.json").write_text("{}")
    log = "resumed from step10 at step 10, saved on 2 rank(s)\n" if resumed else "search done\n"
    for name, steps in (("resume", 30), ("fp16_resume", 20)):
        (out / f"{name}.log").write_text(log)
        write_metrics(out / name / "metrics.jsonl", [{"step": s, "train/loss": 1.0} for s in (10, 20, 20, 30) if s <= steps])
        (out / name / "mask.pt").write_bytes(b"")
    for run in ("fp16", "fp16_resume"):
        (out / run / "checkpoints" / "step20").mkdir(parents=True)
        it = 20 if run == "fp16" else scaler_iter
        torch.save({"loss_scaler": {"cur_scale": 2.0**15, "cur_iter": it, "last_overflow_iter": 3, "cur_hysteresis": 2,
                                    "dynamic": True}}, out / run / "checkpoints" / "step20" / "rank0.pt")
    (out / "imp" / "0.1").mkdir(parents=True)
    torch.save({"w": torch.arange(100) >= 10}, out / "imp" / "0.1" / "mask.pt")
    for name, kd in (("search", 0.2), ("imp", 0.1), ("none", 0.0)):
        (out / f"eval_{name}.json").write_text(json.dumps({"kd_loss": kd}))
    (out / "nvidia_smi_search.csv").write_text("0, 20000\n1, 30000\n2, 77000\n\n1, [N/A]\n0")
    (out / "nvidia_smi_finetune.csv").write_text("0, 1000\n1, 2000\n")


def summarize(out, tiny_bert, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scaling

    monkeypatch.setattr(scaling, "check_search_outputs", lambda run: [])  # needs a real search; tested in e2e
    code = scaling.main(["gpu_summary", "--out", str(out), "--model", tiny_bert, "--deepspeed",
                         str(ROOT / "ds_configs" / "zero3_bf16.json"), "--world_size", "2", "--gpus", "0,1",
                         "--batch", "4", "--seq", "16"])
    return code, json.loads((out / "gpu_summary.json").read_text())


def test_summary_of_a_check_output(tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "check"
    fake_check_output(out, tiny_bert)
    code, summary = summarize(out, tiny_bert, monkeypatch)
    assert code == 0 and summary["problems"] == [] and summary["fp16_checked"]
    assert summary["search_tokens_per_s"] == 30_000.0  # the window of steps 21-30
    assert summary["rank0_max_allocated_gb"] == pytest.approx(10_030 * 2**20 / 1e9)
    # GPU 2 is not one of the run's (CUDA_VISIBLE_DEVICES=0,1); the cut-off and [N/A] lines are skipped
    assert summary["per_gpu_peak_used_gb"] == {"search": {"0": pytest.approx(20000 * 2**20 / 1e9),
                                                          "1": pytest.approx(30000 * 2**20 / 1e9)},
                                               "finetune": {"0": pytest.approx(1000 * 2**20 / 1e9),
                                                            "1": pytest.approx(2000 * 2**20 / 1e9)}}
    assert summary["nvidia_smi_unreadable_samples"] == 2
    assert "| output contract, kill + --resume, IMP (offload), evaluate_mask, fp16 loss scaler | OK |" in \
        (out / "gpu_summary.md").read_text()


def test_summary_names_each_failed_phase(tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "check"
    fake_check_output(out, tiny_bert, scaler_iter=10, resumed=False)  # the loss scaler restarted at the resume
    (out / "eval_none.json").write_text(json.dumps({"kd_loss": float("nan")}))
    torch.save({"w": torch.arange(100) >= 11}, out / "imp" / "0.1" / "mask.pt")
    code, summary = summarize(out, tiny_bert, monkeypatch)
    assert code == 1
    problems = summary["problems"]
    assert "kill + --resume (bf16): the resumed run did not say 'resumed from stepN at step N'" in problems
    assert "fp16 kill + --resume: the resumed run did not say 'resumed from stepN at step N'" in problems
    assert "IMP round (zero3_offload): w: 11 pruned, expected 10" in problems
    assert "evaluate_mask: none: kd_loss nan" in problems
    assert any(p.startswith("fp16: loss scaler after the resume") and "'cur_iter': 10.0" in p for p in problems)
    assert len(problems) == 5, problems


FAKE_LAUNCHER = """#!/bin/bash
# a launcher whose job is two 'ranks' in its process group; it checkpoints after a second
for ((i = 1; i <= $#; i++)); do [[ "${!i}" == --output_dir ]] && { j=$((i + 1)); out="${!j}"; }; done
if [[ " $* " == *" --resume "* ]]; then echo "resumed from $(cat "$out/checkpoints/latest") at step 10"; exit 0; fi
sleep 300 & sleep 300 &
echo $! > "$out.rank_pid"
sleep 1; mkdir -p "$out/checkpoints"; echo step10 > "$out/checkpoints/latest"
wait
"""


def test_kill_and_resume_kills_the_whole_job_then_resumes(tmp_path):
    """The script's kill_and_resume, run as written, on a fake launcher."""
    import re

    import psutil

    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    functions = re.search(r'^JOB_PID="".*?^trap [^\n]*\n', text, re.S | re.M).group(0) + \
        re.search(r"^kill_and_resume\(\) \{.*?^\}\n", text, re.S | re.M).group(0)
    (tmp_path / "launch").write_text(FAKE_LAUNCHER)
    (tmp_path / "launch").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    script = (f"set -euo pipefail\nOUT={out}\nstop_sampling() {{ :; }}\n{functions}\n"
              f"LAUNCH=({tmp_path / 'launch'})\nARGS=(--output_dir \"$OUT/run\" --max_steps 30)\nkill_and_resume run\n")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "killed after step10; resuming" in proc.stdout
    assert (out / "run.log").read_text() == "resumed from step10 at step 10\n"
    rank = int((out / "run.rank_pid").read_text())
    alive = psutil.pid_exists(rank) and psutil.Process(rank).status() != psutil.STATUS_ZOMBIE
    if alive:
        psutil.Process(rank).kill()
    assert not alive  # the job died whole, its ranks too
