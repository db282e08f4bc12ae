"""What a mask cost to find: tokens processed, forward-backward FLOPs, measured device-seconds.

A search (and each IMP level) writes `cost.json` next to its mask.pt; the study reads it
for the search-budget axis (docs/study.md).  Tokens are the real (non-padding) tokens
every rank read, summed; FLOPs are tokens x FLOPs per token (an analytic count, the same
for every machine: `mfu.search_flops_per_token`, the one the MFU uses, of the search's model,
or of IMP's built from its config on the meta device); device-seconds are the wall seconds of the training steps times
the number of ranks (loading, evaluation and export are not counted; measured, so they
depend on the machine).  All three carry over a resume.
"""
from __future__ import annotations

import json
import os
import time

from tamt_ds import sharding

COST_FILE = "cost.json"

class CostMeter:
    """Measures the training steps' wall time; reads tokens from the data loader's position
    (which a resume restores and re-deals).  `device_seconds` so far comes back on resume."""

    def __init__(self, flops_per_token: float, device_seconds: float = 0.0):
        self.flops_per_token = flops_per_token
        self.device_seconds = device_seconds
        self._since = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        """Stop the clock (before an evaluation, a save or an export: not search work)."""
        if self._since is not None:
            self.device_seconds += (time.perf_counter() - self._since) * sharding.world_size()
            self._since = None

    def totals(self, loader, steps: int) -> dict:
        """Cost so far (collective: every rank calls it), the clock paused."""
        import torch

        self.pause()
        tokens = torch.tensor([loader.progress()["tokens_seen"]], dtype=torch.float64)
        tokens = int(sharding.all_reduce_(tokens)[0])
        return {"search_steps": steps, "search_tokens": tokens, "search_flops": tokens * self.flops_per_token,
                "search_device_seconds": round(self.device_seconds, 3), "world_size": sharding.world_size(),
                "flops_per_token": self.flops_per_token}


def write_cost(folder: str, cost: dict) -> None:
    from tamt_ds.checkpoint import atomic_write_text

    if sharding.rank() == 0:
        atomic_write_text(os.path.join(folder, COST_FILE), json.dumps(cost, indent=1) + "\n")


def read_cost(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, COST_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
