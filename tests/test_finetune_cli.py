"""Fine-tuning command line: bad input ends with one `error: ...` line and exit code 2,
before anything is written; earlier results are never lost.  Also the small task
writers the other fine-tuning tests use."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

WORKER = ROOT / "tests" / "workers" / "finetune_worker.py"
LAUNCHER = ROOT / "launchers" / "finetune.py"
WORDS = {"fruit": "apple banana cherry plum".split(), "animal": "dog cat horse owl".split(),
         "color": "red blue green pink".split(), "motion": "run walk jump swim".split()}
FILLER = "the a of and to in it is".split()


def write_local_classification(root: Path, n_train: int = 64, n_dev: int = 37, seed: int = 0) -> Path:
    """4 classes, one text column: the class is given by the first content word."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_dev)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            lines.append(" ".join([rng.choice(WORDS[label])] + rng.choices(FILLER, k=rng.randint(2, 9))) + f"\t{label}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_local_regression(root: Path, n_train: int = 48, n_dev: int = 21, seed: int = 1) -> Path:
    """Two text columns, a real-valued label (word overlap + noise)."""
    rng = random.Random(seed)
    vocab = [w for ws in WORDS.values() for w in ws]
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_dev)):
        lines = ["sentence1\tsentence2\tlabel"]
        for _ in range(n):
            a, b = rng.choices(vocab, k=4), rng.choices(vocab, k=4)
            lines.append(f"{' '.join(a)}\t{' '.join(b)}\t{len(set(a) & set(b)) + rng.random():.3f}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_mnli(glue_root: Path, seed: int = 2) -> Path:
    """MNLI in the original GLUE layout, with matched and mismatched dev sets of different sizes."""
    rng = random.Random(seed)
    vocab = [w for ws in WORDS.values() for w in ws] + FILLER
    d = glue_root / "MNLI"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", 40), ("dev_matched.tsv", 13), ("dev_mismatched.tsv", 11)):
        lines = ["index\tgenre\tsentence1\tsentence2\tgold_label"]
        for i in range(n):
            lines.append(f"{i}\tfiction\t{' '.join(rng.choices(vocab, k=7))}\t{' '.join(rng.choices(vocab, k=4))}\t"
                         f"{rng.choice(['entailment', 'neutral', 'contradiction'])}")
        (d / name).write_text("\n".join(lines) + "\n")
    return glue_root


def run_worker(cases: list[list[str]], tmp_path: Path) -> list[dict]:
    cases_file, out = tmp_path / "cases.json", tmp_path / "out.json"
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TAMT_DEBUG", None)
    subprocess.run([sys.executable, str(WORKER), str(cases_file), str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True, env=env, timeout=300)
    return json.loads(out.read_text())


def error_line(result: dict) -> str:
    lines = [l for l in result["stderr"].splitlines() if l.startswith("error:")]
    assert result["rc"] == 2 and len(lines) == 1, result
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_bert):
    """Every bad input of the issue, run through main() in one process."""
    import torch

    tmp = tmp_path_factory.mktemp("bad")
    good = write_local_classification(tmp / "good")
    no_dev = tmp / "no_dev"
    no_dev.mkdir()
    (no_dev / "train.tsv").write_text((good / "train.tsv").read_text())
    no_column = tmp / "no_column"
    no_column.mkdir()
    for split in ("train", "validation"):
        (no_column / f"{split}.tsv").write_text("text\tlabel\nsome words\tfruit\nmore words\tanimal\n")
    bad_labels = tmp / "bad_labels"
    bad_labels.mkdir()
    (bad_labels / "train.tsv").write_text((good / "train.tsv").read_text())
    (bad_labels / "validation.tsv").write_text("sentence\tlabel\napple pie\tfruit\nsome car\tvehicle\n")
    squad = tmp / "squad"
    squad.mkdir()
    (squad / "train-v1.1.json").write_text(json.dumps({"version": "1.1", "paragraphs": []}))
    (squad / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "paragraphs": []}))
    from transformers import AutoModel

    full = {k: torch.ones_like(v, dtype=torch.bool) for k, v in AutoModel.from_pretrained(tiny_bert).state_dict().items()
            if k.endswith(".weight") and v.dim() == 2 and "position" not in k and "token_type" not in k}
    wrong_mask = tmp / "wrong_mask.pt"  # a mask for another model: one matrix with another shape
    torch.save({**full, "encoder.layer.0.attention.self.query.weight": torch.ones(48, 48, dtype=torch.bool)}, wrong_mask)
    alien_mask = tmp / "alien_mask.pt"  # a mask for a deeper model: a layer this one does not have
    torch.save({**full, "encoder.layer.5.attention.self.query.weight": torch.ones(32, 32, dtype=torch.bool)}, alien_mask)
    not_tamt_mask = tmp / "not_tamt_mask.pt"  # position embeddings are not masked by TAMT
    torch.save({**full, "embeddings.position_embeddings.weight": torch.ones(136, 32, dtype=torch.bool)}, not_tamt_mask)
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "results.json").write_text('{"earlier": true}\n')

    common = ["--model_name_or_path", tiny_bert, "--max_steps", "1", "--max_seq_length", "16",
              "--output_dir", str(tmp / "out")]
    cases = {
        "unknown_task": ["--task", "cola2", *common],
        "no_task": [*common],
        "local_lacks_file": ["--task", f"local:{no_dev}", *common],
        "local_lacks_column": ["--task", f"local:{no_column}", *common],
        "labels_differ": ["--task", f"local:{bad_labels}", *common],
        "squad_layout": ["--task", "squad", "--data_dir", str(squad), *common],
        "mask_shape": ["--task", f"local:{good}", "--mask", str(wrong_mask), *common],
        "mask_alien_matrix": ["--task", f"local:{good}", "--mask", str(alien_mask), *common],
        "mask_not_tamt": ["--task", f"local:{good}", "--mask", str(not_tamt_mask), *common],
        "mask_no_file": ["--task", f"local:{good}", "--mask", str(tmp / "nope.pt"), *common],
        "mask_bad_sparsity": ["--task", f"local:{good}", "--mask", "omp:1.5", *common],
        "bad_model": ["--task", f"local:{good}", *common, "--model_name_or_path", str(tmp / "no_model")],
        "bad_seeds": ["--task", f"local:{good}", "--seeds", "1,x", *common],
        "bad_subset": ["--task", f"local:{good}", "--train_subset", "1000", *common],
        "results_exist": ["--task", f"local:{good}", *common, "--output_dir", str(taken)],
        "results_exist_bad_mask": ["--task", f"local:{good}", "--mask", str(wrong_mask), *common,
                                   "--output_dir", str(taken)],
    }
    results = run_worker(list(cases.values()), tmp)
    return {name: r for name, r in zip(cases, results)}, tmp


@pytest.mark.parametrize("case, needles", [
    ("unknown_task", ["unknown task 'cola2'", "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, squad, squad_v2",
                      "local:DIR"]),
    ("no_task", ["--task", "--tasks"]),
    ("local_lacks_file", ["lacks ['validation.tsv']"]),
    ("local_lacks_column", ["no text column", "sentence"]),
    ("labels_differ", ["'vehicle'", "not in train's label set"]),
    ("squad_layout", ["not in the official SQuAD layout"]),
    ("mask_shape", ["has shape (48, 48)", "(32, 32)", "another model"]),
    ("mask_alien_matrix", ["encoder.layer.5.attention.self.query.weight", "not one of the model's 14 masked",
                           "another model"]),
    ("mask_not_tamt", ["embeddings.position_embeddings.weight", "TAMT does not mask", "drop that entry"]),
    ("mask_no_file", ["no such file", "omp:S"]),
    ("mask_bad_sparsity", ["[0, 1)", "omp:0.7"]),
    ("bad_model", ["cannot load", "--model_name_or_path"]),
    ("bad_seeds", ["--seeds", "1,2,3"]),
    ("bad_subset", ["train_subset=1000", "64 examples"]),
    ("results_exist", ["already exists", "--overwrite_output_dir"]),
    ("results_exist_bad_mask", ["another model"]),
])
def test_bad_input_is_one_line_error_with_exit_code_2(bad_inputs, case, needles):
    results, _ = bad_inputs
    line = error_line(results[case])
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in results[case]["stderr"]


def test_nothing_written_on_bad_input_and_earlier_results_kept(bad_inputs):
    _, tmp = bad_inputs
    assert not (tmp / "out").exists()  # every failing run stopped before writing anything
    assert sorted(os.listdir(tmp / "taken")) == ["results.json"]
    assert (tmp / "taken" / "results.json").read_text() == '{"earlier": true}\n'


def test_real_launcher_exits_2_with_one_line(tmp_path):
    env = {**os.environ}
    env.pop("TAMT_DEBUG", None)
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--task", "nope", "--output_dir", str(tmp_path / "o")],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown task 'nope'; known: cola")
    assert not (tmp_path / "o").exists()
