"""Iterative magnitude pruning (IMP) on the MLM objective.  `deepspeed launchers/imp.py [args]`
(or torchrun / mpirun / python).  Writes OUTPUT/<level>/mask.pt for levels 0.1 .. --max_sparsity.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tamt_ds.errors import exit_process  # noqa: E402
from tamt_ds.imp import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
