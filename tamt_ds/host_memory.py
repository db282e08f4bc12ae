"""Freed host memory goes back to the OS, so a CPU rank's resident set follows what it holds.

glibc serves allocations below its mmap threshold from heaps that it seldom returns to the
OS, and raises that threshold (up to 32 MiB) every time it frees a larger block.  A ZeRO-3
rank on CPU gathers and frees every weight and score matrix (2-50 MB each) in every forward
and backward, and activations come and go: these then pile up in the heap and the resident
set grows far above the memory in use (measured on bert-base, 1 rank, 4 x 128 tokens: 5.18
GB peak against 4.45 GB with this, same step time; docs/scaling.md).  A fixed threshold of
1 MiB serves every larger block with its own mapping, unmapped when freed.

That mapping is fresh memory each time: every use of a block over 1 MiB page-faults it in
again.  For a small model the faults cost more than the memory is worth: all-MiniLM-L6-v2
(23M parameters), the default search (64 x 32 tokens), 30 steps: 98 s wall and 55 s of
system time with the fixed threshold, 72 s and 19 s without, resident 1.8 GB against 2.7 GB
(2026-11-26; docs/benchmarks.md).  On bert-base the step time is the same either way, and
the larger the model the more the memory matters, so the search fixes it from 100M
parameters up (`release_freed_memory_for`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_MODEL_PARAMETERS = 100_000_000


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (which also stops its dynamic growth); False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def release_freed_memory_for(model_name_or_path: str) -> bool:
    """Fix the threshold where the model is large enough for host memory to matter (from its config)."""
    from tamt_ds.models import model_config
    from tamt_ds.plan import Shape, parameter_tensors

    try:
        parameters = sum(parameter_tensors(Shape.from_config(model_config(model_name_or_path))).values())
    except AttributeError:  # not BERT-shaped: size unknown, keep the memory
        parameters = LARGE_MODEL_PARAMETERS
    return parameters >= LARGE_MODEL_PARAMETERS and return_freed_memory_to_os()
