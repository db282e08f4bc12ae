"""Guards that end a distributed run early and clearly instead of hanging or writing garbage.

- `Heartbeat`: each rank counts beats in the process group's store from a thread, and
  watches the other ranks' counts.  A live process beats even while it works alone
  (export, checkpoint) or waits in a collective, so a peer silent for --dist_timeout
  seconds is dead or frozen: the thread ends this rank with one line naming it, on any
  backend (a NCCL collective waiting for a dead peer would only end in the watchdog's
  abort).  When a collective fails first (gloo: a peer's connection closed), the beats
  tell which ranks stopped answering, so the error line can name them.
- `NonFiniteGuard`: remembers on the device the first step whose loss was nan / inf (no
  host sync per step); read at logging steps and before every save, so a poisoned state
  never replaces the last good checkpoint.
- `check_shared_dir`: every rank must see the files rank 0 writes into --output_dir.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import torch

from tamt_ds import sharding
from tamt_ds.errors import LOST_CONTACT, InputError, end_lost_contact, end_quietly

BEAT_PERIOD_S = 1.0
STORE_LINGER_S = 5 * BEAT_PERIOD_S  # rank 0 stays this long after a failure: the others read the claims
READS_PER_DEADLINE = 20  # the peers' counts are read this often per deadline (every rank reads all: keep it rare)


class Heartbeat:
    """A daemon thread adding one beat per second to this rank's counter in the store and
    ending the process when a peer's counter stops for `deadline_s`."""

    _running: "Heartbeat | None" = None

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tamt-heartbeat", daemon=True)

    @classmethod
    def start(cls, deadline_s: float) -> None:
        if cls._running is None and sharding.distributed():
            cls._running = cls(deadline_s)
            cls._running._thread.start()

    @classmethod
    def running(cls) -> bool:
        return cls._running is not None

    @classmethod
    def stop(cls) -> None:
        """Join the thread, so that it is not inside a store call when the group goes away."""
        if cls._running is not None:
            cls._running._stop.set()
            cls._running._thread.join()
            cls._running = None

    def _run(self) -> None:
        read_every = max(BEAT_PERIOD_S, self.deadline_s / READS_PER_DEADLINE)
        me, started = sharding.rank(), time.monotonic()
        counts: list[int] | None = None
        moved: dict[int, float] = {}  # rank -> when its count was last seen to move (here)
        answered = next_read = started  # the store's last answer; the next read of the counts
        while not self._stop.wait(BEAT_PERIOD_S):
            now = time.monotonic()
            try:
                sharding.heartbeat()
                answered = now
            except Exception:  # the store's host (rank 0 or the launcher) is gone or stopped
                if now - answered > self.deadline_s:
                    end_lost_contact(f"the rendezvous store stopped answering for more than {self.deadline_s:g} s "
                                     f"(its host, rank 0 or the launcher, died or froze)")
                continue
            if sharding.claims(LOST_CONTACT):  # a rank said so for all: no need to wait for this one's collective
                end_quietly()
            if now < next_read:
                continue
            next_read = now + read_every
            latest = sharding.heartbeats()
            if latest is None:
                continue
            for r, count in enumerate(latest):
                if counts is None or count != counts[r]:
                    moved[r] = now
            counts = latest
            # A beat seen at moved[r] came at most one period before the peer stopped: waiting
            # one more period makes sure it was silent for the whole deadline.
            silent = [r for r in range(len(latest))
                      if r != me and now - moved.get(r, started) > self.deadline_s + BEAT_PERIOD_S]
            if silent:
                end_lost_contact(f"{'ranks' if len(silent) > 1 else 'rank'} {', '.join(map(str, silent))} stopped "
                                 f"answering: no heartbeat for more than {self.deadline_s:g} s (died or froze; "
                                 f"see their errors above)")


def silent_ranks(wait_s: float = 3 * BEAT_PERIOD_S) -> list[int] | None:
    """Ranks whose heartbeat did not move during `wait_s` (None: the store did not answer)."""
    before = sharding.heartbeats()
    if before is None:
        return None
    time.sleep(wait_s)
    after = sharding.heartbeats()
    if after is None:
        return None
    return [r for r, (a, b) in enumerate(zip(before, after)) if a == b and r != sharding.rank()]


class NonFiniteLossError(InputError):
    pass


class NonFiniteGuard:
    """First step with a non-finite loss on any rank, kept on the device until asked."""

    NEVER = 2**62

    def __init__(self, device) -> None:
        self.first = torch.full((), self.NEVER, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.first = torch.where(bad, self.first.clamp(max=step), self.first)

    def check(self, kept: str) -> None:
        """A collective: every rank stops together.  `kept` says what survives, for the message."""
        first = sharding.all_reduce_(self.first.clone(), op="min")
        step = int(first)  # the one host sync, at logging / saving steps only
        if step != self.NEVER:
            raise NonFiniteLossError(
                f"the training loss became nan or inf at step {step}; stopped without saving it ({kept}): "
                f"lower --learning_rate, or check the model weights and the data")


def check_shared_dir(path: str) -> None:
    """Stop every rank with one line if some rank does not see what rank 0 writes to `path`.

    Checkpoints (each rank writes its shards, rank 0 the pointer to the latest) and the
    outputs only work on a directory that every node mounts at the same path."""
    if not sharding.distributed():
        return
    token = None
    if sharding.rank() == 0:
        token = f".tamt-shared-check-{uuid.uuid4().hex}"
        with open(os.path.join(path, token), "w") as f:
            f.write(token)
    token = sharding.broadcast_object(token)
    seen = os.path.isfile(os.path.join(path, token))
    views = sharding.broadcast_object(sharding.gather_objects((seen, socket.gethostname())))
    if sharding.rank() == 0:
        os.remove(os.path.join(path, token))
    blind = ", ".join(f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok)
    if blind:
        raise InputError(f"--output_dir {path} is not shared: {blind} cannot see the files rank 0 on {views[0][1]} "
                         f"writes there; put --output_dir on a filesystem that every node mounts at the same path "
                         f"(NFS, Lustre, ...)")
