"""Bad input ends a run with one line that names the fix, and a non-zero exit code."""
from __future__ import annotations

import os
import sys


def run_cli(fn) -> int:
    from tamt_ds import sharding

    sharding.quiet_deprecations()
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:  # every input error of the library is a ValueError subclass
        if os.environ.get("TAMT_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
