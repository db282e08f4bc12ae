"""A real short run, as a user would start it: all-MiniLM-L6-v2 fine-tuned (dense) on the
WordNet verb-supersense task (the sample shipped in tests/fixtures), 15 unbalanced classes,
in one plain process."""
import csv
import json
import os
import subprocess
import sys
from collections import Counter

from tests.conftest import ROOT
from tests.test_finetune_cli import LAUNCHER

TASK = ROOT / "tests" / "fixtures" / "downstream" / "supersense_verb"  # a sample of ../shared's task


def test_supersense_verb_short_run_beats_the_majority_class_clearly(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ}
    env.pop("TAMT_DEBUG", None)
    subprocess.run([sys.executable, str(LAUNCHER), "--task", f"local:{TASK}", "--max_seq_length", "48",
                    "--per_device_train_batch_size", "16", "--learning_rate", "2e-4", "--warmup_ratio", "0.06",
                    "--max_steps", "100", "--eval_steps", "0", "--output_dir", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, env=env, timeout=600)
    r = json.loads((out / "results.json").read_text())
    with open(TASK / "validation.tsv", newline="") as f:
        labels = [row["label"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    majority = 100 * Counter(labels).most_common(1)[0][1] / len(labels)  # 15.75% (verb.change)
    assert r["complete"] and r["per_seed"][0]["steps"] == 100
    assert r["best"]["accuracy"]["mean"] > 2 * majority, (r["best"], majority)
    assert r["best"]["test_accuracy"]["mean"] > 2 * majority  # the held-out test split, scored beside dev
    assert r["sparsity"]["measured"] < 1e-4  # dense: (almost) no exact zeros in the masked matrices
    assert (out / "tensorboard").is_dir()
