"""Pre-training losses of masks on held-out text (KD against the dense model; MLM where the model has a
pre-trained MLM head).  `python launchers/evaluate_mask.py --mask PATH|omp:S|random:S|none [...] --output X.json`
(or deepspeed / torchrun / mpirun).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tamt_ds.errors import exit_process  # noqa: E402
from tamt_ds.evaluate_mask import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
