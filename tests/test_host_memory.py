"""return_freed_memory_to_os: freed blocks leave the resident set (glibc), as a ZeRO-3 CPU rank needs;
release_freed_memory_for: only for models large enough for it to pay."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCENARIO = """
import sys, psutil, torch
from tamt_ds.host_memory import return_freed_memory_to_os
if sys.argv[1] == "fixed":
    assert return_freed_memory_to_os()
big = torch.ones(4 << 20)          # 16 MB, mapped; freeing it raises glibc's dynamic threshold above 4 MB
del big
blocks = [torch.ones(1 << 20) for _ in range(200)]   # 200 x 4 MB, like gathered matrices and activations
keep = blocks[-1]                  # the newest block stays alive (as the next layer's buffers do)
del blocks
print(psutil.Process().memory_info().rss)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_leave_the_resident_set():
    rss = {}
    for mode in ("default", "fixed"):
        proc = subprocess.run([sys.executable, "-c", SCENARIO, mode], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rss[mode] = int(proc.stdout.split()[-1])
    assert rss["default"] > rss["fixed"] + 600e6  # the heap kept ~800 MB of freed blocks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threshold_fixed_for_large_models_only():
    """The packaged MiniLM (23M) keeps glibc's default (the faults cost it ~35% of a step); bert-base (109M) fixes it."""
    code = "import sys; from tamt_ds.host_memory import release_freed_memory_for as r; print(r(sys.argv[1]))"
    out = {}
    for name in ("sentence-transformers/all-MiniLM-L6-v2", "config:bert-base-uncased"):
        proc = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = proc.stdout.split()[-1]
    assert out == {"sentence-transformers/all-MiniLM-L6-v2": "False", "config:bert-base-uncased": "True"}
