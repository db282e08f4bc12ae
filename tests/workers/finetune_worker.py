"""Runs several fine-tuning command lines in one process, so the imports are paid once.

usage: finetune_worker.py CASES.json OUT.json
CASES.json: a list of argument lists for launchers/finetune.py.  OUT.json: for each, the
exit code of tamt_ds.downstream.finetune.main and what it printed on stderr.
"""
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tamt_ds.downstream.finetune import main  # noqa: E402
from tamt_ds.errors import exit_process  # noqa: E402


def run(argv: list[str]) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return {"argv": argv, "rc": rc, "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump([run(argv) for argv in cases], f, indent=1)
    exit_process(0)  # the launchers' exit path: ends the one-process group the runs formed
