"""Quality of the sparsity patterns (issue 18 §3): TAMT-KD masks against same-pattern baselines.

    structured 50%:    TAMT-KD structured  vs  magnitude (OMP by structure norm), head importance, random
    2:4 (50%):         TAMT-KD 2:4         vs  magnitude 2:4, random 2:4
    unstructured 50%:  TAMT-KD             vs  OMP            (the reference a 2:4 mask gives up)

Held-out KD loss of every mask with the study's measure (launchers/evaluate_mask.py on the shipped
validation text, 64 blocks of 128 tokens: text no search or baseline read), and with --task one
downstream task fine-tuned with the study's protocol (launchers/finetune.py, --seeds).  Each TAMT
search is a short default search (one process, the default model and text) of --steps steps; the
baselines are python -m tamt_ds.pattern_baselines.  Everything lands in --output_dir and is
reused on a rerun (delete a file to redo it); the table is printed and written as table.md.

    python benchmarks/pattern_quality.py --steps 80 --output_dir outputs/pattern_quality
    python benchmarks/pattern_quality.py --steps 80 --task supersense_verb --seeds 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSITY = 0.5

# (row label, pattern, how the mask is made): "search" | pattern_baselines --method | evaluate_mask's name
ROWS = [
    ("dense", "-", ("eval", "none")),
    ("TAMT-KD", "unstructured", ("search", "unstructured")),
    ("OMP", "unstructured", ("eval", f"omp:{SPARSITY:g}")),
    ("TAMT-KD", "2:4", ("search", "2:4")),
    ("magnitude", "2:4", ("baseline", "magnitude")),
    ("random", "2:4", ("baseline", "random")),
    ("TAMT-KD", "structured", ("search", "structured")),
    ("magnitude", "structured", ("baseline", "magnitude")),
    ("head importance", "structured", ("baseline", "head_importance")),
    ("random", "structured", ("baseline", "random")),
]
# fine-tuning is the slow part: the comparisons the issue asks for first (random and dense last)
DOWNSTREAM_ORDER = [6, 8, 7, 3, 4, 1, 2, 0, 5, 9]


def run(cmd: list[str], log: str) -> float:
    """Run a launcher (its output appended to `log`); wall seconds.  Stops on failure with its last lines."""
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if code != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            print("".join(f.readlines()[-20:]), file=sys.stderr)
        sys.exit(f"error: {cmd[1]} failed (exit {code}); log: {log}")
    return time.perf_counter() - t0


def slug(label: str, pattern: str) -> str:
    return f"{label}_{pattern}".replace(" ", "_").replace(":", "_").replace("-", "_").lower()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/pattern_quality")
    p.add_argument("--steps", type=int, default=80, help="steps of each TAMT search")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=1, help="search seed and random baselines' seed")
    p.add_argument("--task", default=None, help="also fine-tune every mask on this study task (e.g. supersense_verb)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="fine-tuning seeds")
    p.add_argument("--finetune_steps", type=int, default=125)
    p.add_argument("--table_only", action="store_true", help="run nothing more: the table of what is there")
    args = p.parse_args()
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log, py = os.path.join(out, "log.txt"), sys.executable
    seconds: dict[str, float] = {}

    masks = {}  # row index -> what evaluate_mask / finetune take as --mask
    for i, (label, pattern, (how, what)) in enumerate(ROWS):
        name = slug(label, pattern)
        if how == "search":
            folder = os.path.join(out, name)
            if not os.path.isfile(os.path.join(folder, "mask.pt")) and not args.table_only:
                print(f"search {pattern}: {args.steps} steps ...", flush=True)
                seconds[name] = run([py, "launchers/search.py", "--sparsity", f"{SPARSITY:g}", "--sparsity_pattern",
                                     pattern, "--max_steps", str(args.steps), "--learning_rate", str(args.learning_rate),
                                     "--seed", str(args.seed), "--eval_steps", "0", "--save_steps", str(args.steps),
                                     "--output_dir", folder, "--overwrite_output_dir", "True"], log)
            masks[i] = os.path.join(folder, "mask.pt")
        elif how == "baseline":
            path = os.path.join(out, f"{name}.pt")
            if not os.path.isfile(path) and not args.table_only:
                print(f"baseline {label} {pattern} ...", flush=True)
                seconds[name] = run([py, "-m", "tamt_ds.pattern_baselines", "--sparsity_pattern", pattern,
                                     "--sparsity", f"{SPARSITY:g}", "--method", what, "--seed", str(args.seed),
                                     "--output", path], log)
            masks[i] = path
        else:
            masks[i] = what

    evals = {i: os.path.join(out, f"eval_{slug(*ROWS[i][:2])}.json") for i in masks}
    todo = [i for i in masks if not os.path.isfile(evals[i])]
    if todo and not args.table_only:
        print(f"evaluate_mask: {len(todo)} mask(s) ...", flush=True)
        seconds["evaluate"] = run([py, "launchers/evaluate_mask.py", "--mask", *[masks[i] for i in todo],
                                   "--output", *[evals[i] for i in todo], "--mask_seed", str(args.seed),
                                   "--eval_files", "tamt_ds/data/sample/validation.txt", "--eval_blocks", "64",
                                   "--max_seq_length", "128"], log)

    downstream = {}
    if args.task:
        for i in DOWNSTREAM_ORDER:
            folder = os.path.join(out, "finetune", slug(*ROWS[i][:2]))
            result = os.path.join(folder, "results.json")
            if not os.path.isfile(result) and args.table_only:
                continue
            if not os.path.isfile(result):
                print(f"finetune {ROWS[i][0]} {ROWS[i][1]} on {args.task} ...", flush=True)
                mask = masks[i] if os.path.isfile(masks[i]) else _saved_mask(evals[i], masks[i], out)
                seconds[f"finetune_{i}"] = run(
                    [py, "launchers/finetune.py", "--mask", mask, "--task", _task(args.task), "--seeds",
                     ",".join(map(str, args.seeds)), "--output_dir", folder, "--overwrite_output_dir", "True",
                     "--learning_rate", "3e-4", "--max_steps", str(args.finetune_steps),
                     "--per_device_train_batch_size", "16", "--max_seq_length", "64", "--warmup_ratio", "0.06",
                     "--eval_steps", "0"], log)
            with open(result, encoding="utf-8") as f:
                r = json.load(f)
            key = f"test_{r['main_metric']}" if f"test_{r['main_metric']}" in r["best"] else r["main_metric"]
            downstream[i] = (key, r["best"][key]["mean"], r["best"][key]["std"], len(r["seeds_done"]))

    lines = [f"| pattern | mask | sparsity (all masked matrices) | held-out KD loss |" + (f" {args.task} |" if args.task else ""),
             "| --- | --- | --- | --- |" + (" --- |" if args.task else "")]
    for i, (label, pattern, _) in enumerate(ROWS):
        if not os.path.isfile(evals[i]):
            continue
        with open(evals[i], encoding="utf-8") as f:
            e = json.load(f)
        row = f"| {pattern} | {label} | {e['sparsity']:.4f} | {max(e['kd_loss'], 0.0):.5f} |"  # dense: -1e-8 of rounding
        if args.task and i in downstream:
            key, mean, std, n = downstream[i]
            row += f" {mean:.4f} ± {std:.4f} ({key}, {n} seed(s)) |"
        elif args.task:
            row += " not run |"
        lines.append(row)
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "seconds.json"), "a", encoding="utf-8") as f:
        f.write(json.dumps(seconds) + "\n")
    print(table)


def _task(name: str) -> str:
    """A study task name as launchers/finetune.py takes it (the study's own resolution)."""
    from tamt_ds.study.config import StudyConfig
    from tamt_ds.study.runner import task_ids

    cfg = StudyConfig()
    cfg.finetune.tasks = [name]
    return task_ids(cfg)[name]


def _saved_mask(eval_json: str, name: str, out: str) -> str:
    """dense -> none; omp:S -> the mask file evaluate_mask builds the same way (written once)."""
    if name == "none":
        return "none"
    path = os.path.join(out, name.replace(":", "_") + ".pt")
    if not os.path.isfile(path):
        run([sys.executable, "launchers/evaluate_mask.py", "--mask", name, "--save_mask", path,
             "--eval_blocks", "1"], os.path.join(out, "log.txt"))
    return path


if __name__ == "__main__":
    main()
