"""Does reducing the score gradients across ranks in bf16 cost the mask anything?

Under a bf16 config without `communication_data_type`, ZeRO-3 reduce-scatters each rank's
bf16 gradients in bf16 (deepspeed.runtime.engine: communication_data_type falls back to the
training dtype); with `"communication_data_type": "fp32"` it casts them to fp32 first.
This runs the same short search on N ranks three times -- bf16 reduced in bf16, bf16
reduced in fp32, fp32 -- and prints each run's held-out KD loss (the search's own
evaluation) and the fraction of mask entries on which the runs disagree.

    python benchmarks/score_reduction_dtype.py --nproc 2 --max_steps 30 --out /tmp/reduce_dtype

Extra arguments after `--` go to every search (default: the packaged MiniLM and text,
8 x 32-token blocks per rank, lr 5e-4).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tamt_ds.engine import CONFIG_DIR, free_port  # noqa: E402

RUNS = {  # name: (config file, extra config keys)
    "bf16, bf16 reduction": ("zero3_cpu_bf16.json", {}),
    "bf16, fp32 reduction": ("zero3_cpu_bf16.json", {"communication_data_type": "fp32"}),
    "fp32": ("zero3_cpu.json", {}),
}


def run(name: str, args, extra: list[str]) -> str:
    config_file, keys = RUNS[name]
    folder = os.path.join(args.out, name.replace(", ", "_").replace(" ", "_"))
    os.makedirs(folder, exist_ok=True)
    cfg = json.loads((CONFIG_DIR / config_file).read_text())
    config = os.path.join(folder, "ds.json")
    with open(config, "w") as f:
        json.dump({**cfg, **keys}, f)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(args.nproc), "--master_port",
           str(free_port()), os.path.join(ROOT, "launchers", "search.py"), "--deepspeed", config,
           "--output_dir", os.path.join(folder, "run"), "--overwrite_output_dir", "--max_steps", str(args.max_steps),
           "--eval_steps", str(args.max_steps), "--save_steps", str(args.max_steps),
           "--per_device_train_batch_size", "8", "--max_seq_length", "32", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return os.path.join(folder, "run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max_steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    runs = {name: run(name, args, extra) for name in RUNS}
    masks = {name: torch.load(os.path.join(d, "mask.pt"), weights_only=True) for name, d in runs.items()}
    numel = sum(m.numel() for m in next(iter(masks.values())).values())
    for name, d in runs.items():
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
        kd = [r["eval/kd_loss"] for r in rows if "eval/kd_loss" in r][-1]
        print(f"{name:>22}: held-out KD loss {kd:.5f}")
    names = list(RUNS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            differ = sum(int((masks[a][k] != masks[b][k]).sum()) for k in masks[a])
            print(f"masks differ, {a} vs {b}: {differ / numel:.5f} of {numel} entries")


if __name__ == "__main__":
    main()
