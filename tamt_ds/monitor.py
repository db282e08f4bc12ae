"""One log stream for a distributed run: rank 0 writes TensorBoard, metrics.jsonl and
the progress bar; other ranks write nothing."""
from __future__ import annotations

import json
import os
import time

import torch

from tamt_ds import sharding


def memory_mb() -> dict[str, float]:
    out = {}
    if torch.cuda.is_available():
        out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    try:
        import psutil

        out["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    return out


class Monitor:
    def __init__(self, output_dir: str, *, total_steps: int, start_step: int = 0, desc: str = "search"):
        self.active = sharding.rank() == 0
        self.writer = self.bar = self.jsonl = None
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step or None)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", buffering=1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._t = time.perf_counter()

    def step(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, step: int, scalars: dict[str, float], *, groups: dict[str, dict[str, float]] | None = None) -> None:
        """Scalars go to metrics.jsonl and TensorBoard; `groups` (per-matrix values) to TensorBoard only."""
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        for group, values in (groups or {}).items():
            for name, v in values.items():
                self.writer.add_scalar(f"{group}/{name}", v, step)
        self.writer.flush()

    def write(self, text: str) -> None:
        if self.active:
            self.bar.write(text)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()
