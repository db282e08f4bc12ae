"""Evaluations run the student in eval mode, also behind a DeepSpeed engine (whose train() /
eval() set only its module's flag): the dense model measured against itself, with dropout 0.1,
has a KD loss of 0 (to float rounding; dropout gave ~0.05) -- in evaluate_mask and in the search's held-out evaluation."""
import json
import subprocess
import sys

from tests.conftest import ROOT

EVAL_TEXT = ROOT / "tamt_ds" / "data" / "sample" / "validation.txt"
CPU_CONFIG = str(ROOT / "ds_configs" / "zero3_cpu.json")


def test_evaluate_mask_of_the_dense_model_is_zero(tiny_bert_dropout, tmp_path):
    outs = [tmp_path / "none.json", tmp_path / "omp0.json", tmp_path / "omp5.json"]
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "evaluate_mask.py"), "--model_name_or_path",
                           tiny_bert_dropout, "--deepspeed", CPU_CONFIG, "--mask", "none", "omp:0.0", "omp:0.5",
                           "--output", *map(str, outs), "--eval_files", str(EVAL_TEXT), "--eval_blocks", "8",
                           "--max_seq_length", "32"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    none, omp0, omp5 = (json.loads(p.read_text())["kd_loss"] for p in outs)
    assert abs(none) < 1e-6 and abs(omp0) < 1e-6 and omp5 > 1e-3  # (float rounding of 1 - cos); pruning moves it


def test_search_evaluation_of_an_unpruned_mask_is_zero(tiny_bert_dropout, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "search.py"), "--model_name_or_path",
                           tiny_bert_dropout, "--output_dir", str(out), "--deepspeed", CPU_CONFIG, "--sparsity", "0.0",
                           "--max_steps", "2", "--eval_steps", "1", "--per_device_train_batch_size", "4",
                           "--max_seq_length", "32", "--validation_blocks", "8", "--learning_rate", "1e-3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/kd_loss"] for r in rows if "eval/kd_loss" in r]
    trains = [r["train/kd_loss"] for r in rows if "train/kd_loss" in r]
    assert len(evals) == 2 and all(abs(e) < 1e-6 for e in evals)  # the student in eval mode equals its teacher
    assert trains and all(t > 1e-4 for t in trains)  # while training, dropout is on (student vs eval-mode teacher)
