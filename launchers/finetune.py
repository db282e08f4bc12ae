"""Fine-tune a TAMT subnetwork (or the dense model) downstream.

`deepspeed launchers/finetune.py --task TASK [--mask mask.pt | omp:S | random:S] [args]`
(or torchrun / mpirun / plain python).  `--tasks a,b,c` runs a study and prints one table.
See docs/finetune.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tamt_ds.errors import exit_process  # noqa: E402
from tamt_ds.downstream.finetune import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
