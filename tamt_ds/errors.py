"""How a run ends when something goes wrong, on any rank.

- `InputError` (the base of every project error class: bad input or settings the user
  can fix) ends the run with ONE line naming the fix, exit code 2.
- A rank that lost its peers says so in one line, naming the ranks whose heartbeat
  stopped when it can tell; exit code 1.  Either its collective failed (gloo: a peer's
  connection closed, or the collective's own timeout), or its heartbeat thread saw a
  peer silent for --dist_timeout seconds (any backend: see guards.Heartbeat).
- Anything else is a bug or an environment problem: its traceback is kept, exit code 1.

In a multi-rank run every line names the rank and host; a message several ranks share
is printed once.  Before the process group exists, only argument checks (the same on
every rank) can fail, so rank 0 alone reports them.  TAMT_DEBUG=1 re-raises everything.
"""
from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
import traceback


class InputError(ValueError):
    """Bad input or settings: the message is one line that names the fix."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` comes from a write that the filesystem refused for want of space or quota
    (torch.save raises a RuntimeError of its zip writer over the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


# One ending per process: the main thread's error or the heartbeat thread's lost contact,
# whichever comes first; the other stays quiet.
_ending = threading.Lock()
_reported = False
LOST_CONTACT = "lost contact"  # the claim every rank that lost its peers shares: one line for all


def run_cli(fn) -> int:
    global _reported
    from tamt_ds import sharding

    sharding.quiet_deprecations()
    try:
        fn()
    except InputError as e:
        if os.environ.get("TAMT_DEBUG"):
            raise
        with _ending:
            _reported = True
            _report(f"error: {_where()}{e}", key=str(e))
        return 2
    except Exception as e:
        if os.environ.get("TAMT_DEBUG"):
            raise
        with _ending:
            _reported = True
            if sharding.initialized() and sharding.is_peer_failure(e):
                _report(f"error: {_where()}lost contact with the other ranks ({_first_line(e)}); {_silent_ranks()}",
                        key=LOST_CONTACT)
            else:
                _report(f"{traceback.format_exc().rstrip()}\nerror: {_where()}stopped on the unexpected "
                        f"{type(e).__name__} above", key=f"{type(e).__name__}: {e}", every_rank_before_init=True)
        return 1
    return 0


def end_lost_contact(detail: str) -> None:
    """From the heartbeat thread: peers stopped beating while this rank may be blocked in
    a collective that would not return in time (or at all): one line, and the process
    ends now (exit code 1), unless the main thread already reports an error."""
    with _ending:
        if _reported:
            return
        _report(f"error: {_where()}lost contact with the other ranks: {detail}", key=LOST_CONTACT)
        _end_now(1)


def end_quietly() -> None:
    """From the heartbeat thread: another rank already reported that the ranks lost contact
    (the job is over), so this rank ends now (exit code 1) without a line of its own, instead
    of waiting, blocked, for the broken collectives to fail one after another."""
    with _ending:
        if _reported:
            return
        _end_now(1)


def _end_now(code: int) -> None:
    """End after a failure.  Rank 0 hosts the rendezvous store under most launchers (all but
    torchrun, whose agent does): it lingers a few heartbeats so that every other rank still
    finds the claims there and reports nothing twice (sharding.first_to_claim), instead of
    each printing its own line once the store is gone."""
    from tamt_ds import sharding
    from tamt_ds.guards import STORE_LINGER_S

    sys.stdout.flush()
    sys.stderr.flush()
    if sharding.distributed() and sharding.rank() == 0:
        time.sleep(STORE_LINGER_S)
    os._exit(code)


def exit_process(code: int) -> None:
    """The one way every entry point ends (`exit_process(main())`: search, IMP, evaluate_mask,
    fine-tuning, study, plan, and the test workers), with exit code `code`.

    After a clean run every rank tears the process group down together: a process that
    exits with a live group can abort at interpreter shutdown (see sharding.shutdown).  After a
    failure the group is broken (a peer is gone or stuck): tearing it down can wait for
    the stuck peer or abort, so the process ends at once; everything it wrote was
    written atomically."""
    from tamt_ds import engine

    if code == 0:
        try:
            engine.shutdown()
        except Exception as e:  # a peer failed after this rank finished
            _report(f"error: {_where()}finished, but lost contact with the other ranks at the end ({_first_line(e)})",
                    key="lost contact at the end")
            code = 1
    if code != 0:
        _end_now(code)
    sys.exit(0)


def _report(text: str, key: str, every_rank_before_init: bool = False) -> None:
    """Print on stderr once per distinct `key` over all ranks."""
    from tamt_ds import sharding

    if sharding.initialized():
        if not sharding.first_to_claim(key):
            return
    elif _launcher_rank() != "0" and not every_rank_before_init:
        return
    print(text, file=sys.stderr, flush=True)


def _launcher_rank() -> str:
    """This process's global rank as its launcher set it (torchrun / deepspeed, MPICH, Open MPI)."""
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return os.environ[key]
    return "0"


def _where() -> str:
    from tamt_ds import sharding

    if sharding.world_size() <= 1:
        return ""
    return f"[rank {sharding.rank()}/{sharding.world_size()} on {socket.gethostname()}] "


def _silent_ranks() -> str:
    from tamt_ds.guards import Heartbeat, silent_ranks

    if not Heartbeat.running():
        return "see the other ranks' errors"
    silent = silent_ranks()
    if silent is None:
        return "the rank hosting the rendezvous store stopped answering too (see the other ranks' errors)"
    if not silent:
        return "every rank still beats: one is alive but stuck (e.g. a stalled filesystem or device)"
    return f"{'ranks' if len(silent) > 1 else 'rank'} {', '.join(map(str, silent))} stopped answering " \
           f"(died or froze; see their errors above)"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
