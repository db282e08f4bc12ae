"""What scripts/gpu_check.sh reads back, apart from the GPU so that it is tested on CPU:
which GPUs the check runs on, their sampled peak memory, and each phase's verdict.

    nvidia-smi --query-gpu=index,uuid --format=csv,noheader | python -m tamt_ds.gpu_check visible

prints the nvidia-smi indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES applied,
as CUDA reads it under CUDA_DEVICE_ORDER=PCI_BUS_ID, which the script sets), comma-separated.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

MIB = 2**20  # nvidia-smi's memory.used (nounits) and the search's perf/gpu_max_allocated_mb are MiB
GB = 1e9     # every figure of the summary, as in docs/scaling.md


class GpuCheckError(Exception):
    pass


def mib_to_gb(mib: float) -> float:
    return mib * MIB / GB


def _smi_rows(text: str) -> list[list[str]]:
    """nvidia-smi CSV rows (noheader) as stripped fields; blank lines dropped."""
    return [[f.strip() for f in line.split(",")] for line in text.splitlines() if line.strip()]


def visible_gpus(smi_index_uuid: str, cuda_visible_devices: str | None) -> list[str]:
    """nvidia-smi indices of the GPUs CUDA exposes, in CUDA's order.

    `smi_index_uuid`: `nvidia-smi --query-gpu=index,uuid --format=csv,noheader`.  As CUDA does,
    CUDA_VISIBLE_DEVICES lists indices or (unique prefixes of) GPU UUIDs, and everything from
    the first entry that names no GPU on, or repeats one, is ignored; unset means every GPU,
    set but empty none."""
    gpus = [(row[0], row[1] if len(row) > 1 else "") for row in _smi_rows(smi_index_uuid) if row[0].isdigit()]
    if cuda_visible_devices is None:
        return [index for index, _ in gpus]
    out: list[str] = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if entry.isdigit():
            found = [index for index, _ in gpus if int(index) == int(entry)]
        elif entry.startswith("GPU-"):
            found = [index for index, uuid in gpus if uuid.startswith(entry)]
        else:  # empty, negative, MIG-... (no whole GPU to sample) or garbage
            found = []
        if len(found) != 1 or found[0] in out:
            break
        out.append(found[0])
    return out


def memory_peaks_gb(samples: str, gpus: list[str]) -> tuple[dict[str, float], int]:
    """Peak memory.used per GPU in GB from `nvidia-smi --query-gpu=index,memory.used
    --format=csv,noheader,nounits -lms N` output, only for `gpus`; and how many lines were
    unreadable (cut off when the sampler was stopped, [N/A], [Not Supported], ...)."""
    peaks: dict[str, float] = {}
    unreadable = 0
    for line in samples.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        try:
            index, used = fields
            value = float(used)
        except ValueError:
            unreadable += 1
            continue
        if index in gpus and math.isfinite(value):
            peaks[index] = max(peaks.get(index, 0.0), mib_to_gb(value))
    return peaks, unreadable


# ---- phase verdicts: each returns its problems, [] when the phase did what it should -------------
def resume_problems(log: str, run: Path, max_steps: int) -> list[str]:
    """A killed search continued with --resume: it said where it resumed (after step 0, before
    the end), went on to the last step and wrote its mask."""
    import re

    found = re.search(r"resumed from (step\d+) at step (\d+)", log)
    if not found:
        return ["the resumed run did not say 'resumed from stepN at step N'"]
    start = int(found.group(2))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    steps = [r["step"] for r in rows]
    problems = []
    if not 0 < start < max_steps:
        problems.append(f"resumed at step {start}, expected a step between 0 and {max_steps}")
    if not steps or steps[-1] != max_steps:  # (the killed run may have logged a step or two again done)
        problems.append(f"logged steps {steps}: expected them to reach step {max_steps}")
    if not (run / "mask.pt").exists():
        problems.append("no mask.pt after the resume")
    return problems


SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(checkpoint_dir: Path) -> dict:
    import torch

    saved = torch.load(checkpoint_dir / "rank0.pt", map_location="cpu", weights_only=False)
    scaler = saved.get("loss_scaler") or {}  # tamt_ds.checkpoint: vars() of DeepSpeed's loss scaler
    return {k: float(scaler[k]) for k in SCALER_STATE if k in scaler}


def loss_scaler_problems(uninterrupted: Path, resumed: Path) -> list[str]:
    """fp16: the dynamic loss scaler's state in the last checkpoint of a killed-and-resumed run
    equals the uninterrupted run's (it went through a checkpoint, not restarted from scratch)."""
    a, b = loss_scaler_state(uninterrupted), loss_scaler_state(resumed)
    if not a:
        return [f"no loss scaler state in {uninterrupted}"]
    return [] if a == b else [f"loss scaler after the resume {b}, uninterrupted {a}"]


def evaluate_mask_problems(results: dict[str, Path]) -> list[str]:
    """evaluate_mask's JSONs: finite losses; the dense model (`none`) is its own teacher."""
    problems = []
    for name, path in results.items():
        if not path.exists():
            problems.append(f"{name}: {path.name} missing")
            continue
        kd = json.loads(path.read_text()).get("kd_loss")
        if not isinstance(kd, (int, float)) or not math.isfinite(kd):
            problems.append(f"{name}: kd_loss {kd}")
        elif name == "none" and abs(kd) > 1e-3:
            problems.append(f"dense model: kd_loss {kd}, expected 0")
        elif name != "none" and kd <= 0:
            problems.append(f"{name}: kd_loss {kd}, expected > 0 for a pruned model")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["visible"]:
        print("usage: nvidia-smi --query-gpu=index,uuid --format=csv,noheader | python -m tamt_ds.gpu_check visible",
              file=sys.stderr)
        return 2
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible_gpus(sys.stdin.read(), setting)
    if not gpus:
        print(f"error: no GPU to check: nvidia-smi lists none{'' if setting is None else ' that CUDA_VISIBLE_DEVICES=' + repr(setting) + ' names'}; "
              f"unset CUDA_VISIBLE_DEVICES or name GPUs by index or UUID", file=sys.stderr)
        return 2
    print(",".join(gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
