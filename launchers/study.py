"""The paper's experiments as one command.  `python launchers/study.py --config studies/embedded.yaml`
(rerun to continue a killed study; `--plot-only` redraws; `--dry-run` prints the plan).  See docs/study.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tamt_ds.errors import exit_process  # noqa: E402
from tamt_ds.study.cli import main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
