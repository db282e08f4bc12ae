"""Real 2-rank ZeRO-3 fine-tuning runs (gloo, parameter persistence threshold 0), checked
from their outputs with plain transformers.

A: fp32, tiny BERT, OMP mask at 0.5, weight decay 0.1, 2 seeds, a study of a local
   classification task, MNLI (matched / mismatched) and SQuAD, models saved.
B: bf16, tiny RoBERTa, a mask file with different counts in every matrix, weight decay
   0.1, gradient accumulation, a local regression task, model saved.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.test_finetune_cli import LAUNCHER, write_local_classification, write_local_regression, write_mnli

SQUAD = ROOT / "tests" / "fixtures" / "downstream" / "squad"
SEEDS = (1, 2)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    from tests.tiny_models import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("tiny_roberta_ft")), "roberta")


@pytest.fixture(scope="module")
def run_a(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_a")
    cls = write_local_classification(tmp / "cls")
    glue = write_mnli(tmp / "glue")
    out = tmp / "out"
    torchrun(LAUNCHER, "--model_name_or_path", tiny_bert, "--tasks", f"local:{cls},mnli,squad",
             "--data_dir", f"mnli={glue},squad={SQUAD}", "--mask", "omp:0.5", "--weight_decay", "0.1",
             "--seeds", ",".join(map(str, SEEDS)), "--max_seq_length", "32", "--doc_stride", "8",
             "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
             "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--save_model",
             "--deepspeed", ROOT / "ds_configs" / "zero3_cpu.json", "--output_dir", out)
    return {"out": out, "cls": cls, "glue": glue, "model": tiny_bert}


@pytest.fixture(scope="module")
def run_b(tiny_roberta, tmp_path_factory):
    from transformers import AutoModel

    tmp = tmp_path_factory.mktemp("ft_b")
    reg = write_local_regression(tmp / "reg")
    g = torch.Generator().manual_seed(0)
    mask = {}
    for name, w in AutoModel.from_pretrained(tiny_roberta).state_dict().items():
        if name.endswith(".weight") and w.dim() == 2 and "position" not in name and "token_type" not in name:
            mask[name] = torch.rand(w.shape, generator=g) < float(torch.rand(1, generator=g)) * 0.6 + 0.2
    torch.save(mask, tmp / "mask.pt")  # the documented layout: backbone state-dict names -> bool, True = kept
    cfg = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "bf16.json").write_text(json.dumps(cfg))
    out = tmp / "out"
    torchrun(LAUNCHER, "--model_name_or_path", tiny_roberta, "--task", f"local:{reg}", "--mask", tmp / "mask.pt",
             "--weight_decay", "0.1", "--gradient_accumulation_steps", "2", "--max_seq_length", "24",
             "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
             "--num_train_epochs", "2", "--eval_steps", "3", "--save_model", "--deepspeed", tmp / "bf16.json",
             "--output_dir", out)
    return {"out": out, "mask": mask, "model": tiny_roberta}


def expected_omp(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned entries of one-shot magnitude pruning: the k smallest |W|, ties in tie-key order."""
    from tamt_ds.thresholds import tie_keys

    k = int(weight.numel() * sparsity)
    magnitude = weight.abs().flatten()
    by_key = torch.sort(tie_keys(torch.arange(magnitude.numel()))).indices
    order = by_key[torch.sort(magnitude[by_key], stable=True).indices]  # by |W|, ties by tie key
    pruned = torch.zeros(weight.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    return pruned.view_as(weight)


def plain_logits(model_dir: Path, texts: list[tuple[str, ...]], max_len: int) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    enc = tok(*map(list, zip(*texts)), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def results_of(out: Path, task_dir: str) -> dict:
    return json.loads((out / task_dir / "results.json").read_text())


# ----------------------------------------------------------------------------- A


def test_a_results_are_complete_for_every_task_and_seed(run_a):
    out = run_a["out"]
    for task_dir, main in (("local-cls", "accuracy"), ("mnli", "matched_accuracy"), ("squad", "f1")):
        r = results_of(out, task_dir)
        assert r["complete"] and r["seeds_done"] == list(SEEDS) and r["world_size"] == 2
        assert r["precision"] == "float32" and r["main_metric"] == main
        for which in ("best", "final"):
            assert len(r[which][main]["values"]) == len(SEEDS)
            assert r[which][main]["mean"] == pytest.approx(np.mean(r[which][main]["values"]))
            assert r[which][main]["std"] == pytest.approx(np.std(r[which][main]["values"], ddof=1))
        for seed in r["per_seed"]:
            steps = seed["steps"]  # 3 epochs capped at 4 steps: SQuAD's one question makes 1 step per epoch
            assert steps == (3 if task_dir == "squad" else 4)
            assert [h["step"] for h in seed["history"]] == [2, 4][:steps // 2] + ([steps] if steps % 2 else [])
            assert seed["best"][main] == max(h[main] for h in seed["history"])
            assert seed["final"] == {k: v for k, v in seed["history"][-1].items() if k != "step"}
        # sparsity counted from the trained weights: exactly the OMP cut, nothing leaked
        assert r["sparsity"]["measured"] == 0.5 and r["sparsity"]["pruned_nonzero"] == 0
        assert r["mask_sparsity"] == 0.5
        assert set(r["sparsity"]["per_matrix"].values()) == {0.5}


def test_a_mnli_matched_and_mismatched_are_kept_apart(run_a):
    r = results_of(run_a["out"], "mnli")
    assert r["eval_splits"] == ["validation_matched", "validation_mismatched"]
    assert set(r["best"]) == {"matched_accuracy", "mismatched_accuracy"}
    labels = ["entailment", "neutral", "contradiction"]
    for seed in SEEDS:
        model_dir = run_a["out"] / "mnli" / f"model_seed{seed}"
        final = next(s for s in r["per_seed"] if s["seed"] == seed)["final"]
        for split, key in (("dev_matched", "matched_accuracy"), ("dev_mismatched", "mismatched_accuracy")):
            rows = read_tsv(run_a["glue"] / "MNLI" / f"{split}.tsv")
            pred = plain_logits(model_dir, [(x["sentence1"], x["sentence2"]) for x in rows], 32).argmax(-1)
            gold = np.array([labels.index(x["gold_label"]) for x in rows])
            assert final[key] == pytest.approx(100 * (pred == gold).mean()), (split, seed)


def test_a_eval_gathers_the_full_dev_set_exactly_once(run_a):
    """The harness's final metrics equal plain transformers on the saved model, on all 37
    dev examples (an odd count: rank 1's shard is padded, the padding dropped)."""
    from transformers import AutoConfig

    r = results_of(run_a["out"], "local-cls")
    rows = read_tsv(run_a["cls"] / "validation.tsv")
    assert len(rows) == 37
    for seed in SEEDS:
        model_dir = run_a["out"] / "local-cls" / f"model_seed{seed}"
        label2id = AutoConfig.from_pretrained(model_dir).label2id
        pred = plain_logits(model_dir, [(x["sentence"],) for x in rows], 32).argmax(-1)
        gold = np.array([label2id[x["label"]] for x in rows])
        final = next(s for s in r["per_seed"] if s["seed"] == seed)["final"]
        assert final["accuracy"] == pytest.approx(100 * (pred == gold).mean())


def test_a_saved_models_load_with_plain_transformers_zeros_intact_and_trained(run_a):
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    original = AutoModel.from_pretrained(run_a["model"]).state_dict()
    for task_dir, auto in (("local-cls", AutoModelForSequenceClassification), ("squad", AutoModelForQuestionAnswering)):
        for seed in SEEDS:
            model = auto.from_pretrained(run_a["out"] / task_dir / f"model_seed{seed}")
            state = model.state_dict()
            assert not any("score" in k for k in state)
            prefix = model.base_model_prefix + "."
            masked = [k for k in original if k.endswith(".weight") and original[k].dim() == 2
                      and "position" not in k and "token_type" not in k and prefix + k in state]
            assert len(masked) == (14 if task_dir == "local-cls" else 13)  # a QA model has no pooler
            for k in masked:
                w, pruned = state[prefix + k], expected_omp(original[k], 0.5)
                assert torch.equal(w == 0, pruned), k  # zeros exactly where OMP pruned, nowhere else
                kept_changed = (w != original[k]) & ~pruned
                assert kept_changed.sum() > 0.9 * (~pruned).sum(), k  # kept weights trained
            for k in original:
                if (k.endswith("bias") or "LayerNorm" in k) and prefix + k in state:
                    assert not torch.equal(state[prefix + k], original[k]), k


def test_a_study_table_and_rank0_outputs(run_a):
    out = run_a["out"]
    md = (out / "study.md").read_text()
    for row in ("| mnli | **matched_accuracy** |", "| mnli | mismatched_accuracy |", "| squad | **f1** |",
                "| squad | exact_match |", "**accuracy**", "Average of main metrics"):
        assert row in md, row
    table = json.loads((out / "study.json").read_text())
    assert set(table["tasks"]) == {f"local:{run_a['cls']}", "mnli", "squad"}
    assert table["average"]["value"] == pytest.approx(np.mean([
        results_of(out, d)["best"][m]["mean"] for d, m in (("local-cls", "accuracy"), ("mnli", "matched_accuracy"),
                                                          ("squad", "f1"))]))
    assert (out / "study_final.md").exists()
    for task_dir in ("local-cls", "mnli", "squad"):
        events = list((out / task_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert len(events) == 1  # rank 0 only
        logged = [json.loads(line) for line in (out / task_dir / "metrics.jsonl").read_text().splitlines()]
        for seed in SEEDS:
            assert any(f"seed{seed}/train/loss" in x for x in logged)
            assert any(any(k.startswith(f"seed{seed}/eval/") for k in x) for x in logged)


# ----------------------------------------------------------------------------- B


def test_b_bf16_file_mask_kept_exactly_through_training_and_saving(run_b):
    from transformers import AutoModelForSequenceClassification

    r = json.loads((run_b["out"] / "results.json").read_text())
    assert r["complete"] and r["precision"] == "bfloat16" and r["world_size"] == 2
    assert set(r["best"]) == {"pearson", "spearman"} and r["main_metric"] == "pearson"
    mask = {k: v for k, v in run_b["mask"].items() if not k.startswith("pooler")}  # RoBERTa's classifier: no pooler
    zeros = sum(int((~m).sum()) for m in mask.values())
    numel = sum(m.numel() for m in mask.values())
    assert r["mask_sparsity"] == pytest.approx(zeros / numel)  # counted over the model's 13 matrices
    assert r["sparsity"]["pruned_nonzero"] == 0 and r["sparsity"]["measured"] >= r["mask_sparsity"]
    assert r["per_seed"][0]["sparsity"]["pruned_nonzero_fp32_master"] == 0
    assert r["per_seed"][0]["steps"] == 6  # 2 epochs of ceil(24 / 4 / 2) optimizer steps

    model = AutoModelForSequenceClassification.from_pretrained(run_b["out"] / "model")
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    from transformers import AutoModel

    original = AutoModel.from_pretrained(run_b["model"]).state_dict()
    state = model.state_dict()
    for k, keep in mask.items():
        w = state["roberta." + k]
        assert (w[~keep] == 0).all(), k  # every pruned entry exactly 0
        assert ((w != original[k]) & keep).sum() > 0.9 * keep.sum(), k  # kept ones trained
