"""TAMT mask search.  `deepspeed launchers/search.py [args]` (or torchrun / mpirun / python).

With no arguments: TAMT-KD at 70% sparsity on all-MiniLM-L6-v2 and the shipped text sample.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tamt_ds.errors import exit_process  # noqa: E402
from tamt_ds.search import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
