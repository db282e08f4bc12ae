"""Resident memory of a whole search process, phase by phase: steps, then checkpoint and export.

    python benchmarks/search_memory.py [--model config:bert-large-uncased] [--steps 3] [--out result.json]

Runs `launchers/search.py` (1 rank, plain python, default DeepSpeed config, 4 x 128 tokens)
as a child process, samples its resident set (VmRSS) every 0.5 s, and prints the peak over
the steps (until metrics.jsonl has the last step's row), the peak after them (evaluation,
checkpoint, mask consolidation and export of pruned_model/), the whole-process high-water
mark (the kernel's, getrusage of the child) and the memory model's prediction
(tamt_ds/plan.py: each phase's peak and the whole process's).  docs/scaling.md records them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 1e9


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="config:bert-large-uncased")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="JSON file for the figures and the samples")
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose search runs (e.g. an older commit's)")
    args = ap.parse_args(argv)

    out_dir = tempfile.mkdtemp(prefix="search-memory-")
    cmd = [sys.executable, str(Path(args.repo) / "launchers" / "search.py"), "--model_name_or_path", args.model,
           "--per_device_train_batch_size", str(args.batch), "--max_seq_length", str(args.seq),
           "--max_steps", str(args.steps), "--output_dir", out_dir]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=args.repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": args.repo})
    steps_done_at: list[float] = []
    log: list[str] = []

    def read_output():
        buf = b""
        while chunk := proc.stdout.read1(4096):
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            for line in lines:
                text = line.decode(errors="replace")
                log.append(text)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    samples: list[tuple[float, int]] = []
    # when each output appears: the phases after the steps (checkpoint, mask.pt, pruned_model/)
    marks = {"checkpoint": Path(out_dir, "checkpoints", "latest"), "mask.pt": Path(out_dir, "mask.pt"),
             "pruned_model": Path(out_dir, "pruned_model")}
    seen: dict[str, float] = {}
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        now = time.perf_counter() - t0
        if rss is not None:
            samples.append((now, rss))
        seen.update({k: now for k, path in marks.items() if k not in seen and path.exists()})
        metrics = Path(out_dir, "metrics.jsonl")  # the last step's row: logged right after it
        if not steps_done_at and metrics.exists() and f'"step": {args.steps},' in metrics.read_text():
            steps_done_at.append(now)
        time.sleep(args.interval)
    reader.join(timeout=10)
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoint and pruned model: GBs
    if proc.returncode != 0:
        print("\n".join(log[-40:]), file=sys.stderr)
        return proc.returncode
    whole = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the child's VmHWM
    end_of_steps = steps_done_at[0] if steps_done_at else float("inf")
    steps_peak = max((r for t, r in samples if t <= end_of_steps), default=0)
    after_peak = max((r for t, r in samples if t > end_of_steps), default=0)
    phases, start = {}, end_of_steps
    for name, at in sorted(seen.items(), key=lambda kv: kv[1]):  # the peak up to each output's appearance
        phases[f"peak_until_{name}_gb"] = max((r for t, r in samples if start < t <= at), default=0) / GB
        start = at

    from tamt_ds import plan

    p = plan.estimate(plan.PlanInput(model=args.model, per_device_train_batch_size=args.batch,
                                     max_seq_length=args.seq, device="cpu"))
    result = {"command": " ".join(cmd[1:]), "steps_peak_gb": steps_peak / GB, "after_steps_peak_gb": after_peak / GB,
              "process_peak_gb": whole / GB, "whole_over_steps": whole / max(steps_peak, 1),
              "planned_phases_gb": p.phases, "planned_process_gb": p.process_per_rank_gb,
              "plan_error": p.process_per_rank_gb / (whole / GB) - 1, "wall_s": samples[-1][0] if samples else 0,
              "end_of_steps_s": end_of_steps, **phases, "marks_s": seen, "samples": samples}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
