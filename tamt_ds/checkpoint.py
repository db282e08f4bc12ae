"""Checkpoints: DeepSpeed's engine state (every rank's shards, optimizer included) plus
this rank's own state (data position, RNG), written before DeepSpeed moves its
`latest` pointer, so `latest` only ever names a complete checkpoint."""
from __future__ import annotations

import os
import tempfile

import torch

from tamt_ds import sharding


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _rank_file(root: str, tag: str) -> str:
    return os.path.join(root, tag, f"tamt_state_rank{sharding.rank()}.pt")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine, root: str, step: int, state: dict) -> None:
    tag = f"step{step}"
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    from tamt_ds.maskfile import atomic_torch_save

    atomic_torch_save({**state, "rng": _rng_state()}, _rank_file(root, tag))
    sharding.barrier()
    engine.save_checkpoint(root, tag=tag)
    sharding.barrier()


def load(engine, root: str) -> dict | None:
    """State of the latest complete checkpoint, with the engine restored; None if there is none."""
    if not os.path.isfile(os.path.join(root, "latest")):
        return None
    path, _ = engine.load_checkpoint(root)
    if path is None:
        return None
    with open(os.path.join(root, "latest")) as f:
        tag = f.read().strip()
    state = torch.load(_rank_file(root, tag), map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state
