"""`launchers/study.py --config studies/NAME.yaml [--executor local|slurm] [--plot-only | --dry-run]`."""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli
    from tamt_ds.study.config import load_config, validate
    from tamt_ds.study.runner import run_study

    ap = argparse.ArgumentParser(description="Run a study: masks -> pre-training losses -> fine-tuning -> "
                                             "study.json, study.md, figures. Resumable: rerun to continue.")
    ap.add_argument("--config", required=True, help="studies/NAME.yaml (or .json)")
    ap.add_argument("--output_dir", default=None, help="override the config's output_dir")
    ap.add_argument("--task_data_dir", default=None, help="override finetune.task_data_dir (local tasks' folder)")
    ap.add_argument("--executor", choices=("local", "slurm"), default=None,
                    help="override the config's executor: local child processes, or one SLURM job per cell "
                         "(the config's slurm section; docs/study.md)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--plot-only", dest="plot_only", action="store_true",
                      help="only (re)build study.json, study.md and the figures from the results there")
    mode.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan and its budget")
    a = ap.parse_args(argv)

    def run():
        cfg = load_config(a.config)
        if a.output_dir:
            cfg.output_dir = a.output_dir
        if a.task_data_dir:
            cfg.finetune.task_data_dir = a.task_data_dir
        if a.executor:
            cfg.executor = a.executor
            validate(cfg)
        run_study(cfg, plot_only=a.plot_only, dry_run=a.dry_run)

    return run_cli(run)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
