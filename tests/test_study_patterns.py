"""A study whose methods carry a sparsity pattern (issue 18): TAMT-KD 2:4 and structured searches,
OMP 2:4 and head-importance baselines built by evaluate_mask, every mask fine-tuned; the masks'
patterns checked by independent rules, the rows named by method and pattern.  Kept small as
tests/test_study.py's tiny study: a tiny BERT, 3-step searches, one task, one seed."""
import json

import pytest
import torch
import yaml

from tests.test_head_importance import structures
from tests.test_patterns import check_nm
from tests.test_study import run_study, write_task

METHODS = [{"name": "tamt-kd", "sparsity_pattern": "2:4"}, "omp[2:4]", {"name": "tamt-kd", "sparsity_pattern": "structured"},
           "head_importance"]


def config(tmp, model, **change) -> dict:
    data = tmp / "tasks"
    if not data.is_dir():
        write_task(data, "single", pair=False)
    return {"name": "patterns", "output_dir": str(tmp / "study"), "model_name_or_path": model,
            "deepspeed": "ds_configs/zero3_cpu.json", "parallel_jobs": 2, "dense_reference": False,
            "methods": METHODS, "sparsities": [0.5], "mask_seeds": [1],
            "search": {"max_steps": 3, "per_device_train_batch_size": 4, "max_seq_length": 32, "validation_blocks": 4,
                       "save_steps": 3, "eval_steps": 0, "logging_steps": 3, "threshold_reset_steps": 2,
                       "learning_rate": 5e-3},
            "evaluate": {"eval_blocks": 4, "max_seq_length": 32, "per_device_eval_batch_size": 4},
            "finetune": {"tasks": ["single"], "task_data_dir": str(data), "seeds": [1],
                         "args": {"max_steps": 2, "max_seq_length": 32, "per_device_train_batch_size": 8,
                                  "eval_steps": 0, "learning_rate": 1e-3}},
            **change}


def test_study_of_patterns(tiny_bert_dropout, tmp_path):
    """One search with a pattern, two baselines of a pattern built by evaluate_mask (the plan of the
    2:4 search is test_pattern_methods_plan_their_cells')."""
    path = tmp_path / "patterns.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, tiny_bert_dropout, methods=METHODS[1:])))
    proc = run_study(path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "study"
    cells = {"omp[2:4]": "omp_2-4_s0.5",
             "tamt-kd[structured]": "tamt-kd_structured_s0.5_m1", "head_importance[structured]":
             "head_importance_structured_s0.5_m1"}
    masks = {m: torch.load(out / "masks" / c / "mask.pt", weights_only=True) for m, c in cells.items()}
    for key, keep in masks["omp[2:4]"].items():
        if "word_embeddings" not in key:
            check_nm(keep, 2, 4)
    for method in ("tamt-kd[structured]", "head_importance[structured]"):
        kept = structures(masks[method], 2, 2)
        assert sum(int(h.sum()) for h, _ in kept) == 2 and all(int(n.sum()) == 32 for _, n in kept)
    run = json.loads((out / "masks" / "tamt-kd_structured_s0.5_m1" / "run_config.json").read_text())
    assert run["search"]["sparsity_pattern"] == "structured"  # the pattern reached its search
    evals = {m: json.loads((out / "eval" / f"{c}.json").read_text()) for m, c in cells.items()}
    assert evals["omp[2:4]"]["mask"] == "omp:2:4" and evals["head_importance[structured]"]["mask"] == "head_importance:0.5"
    rows = [r for r in json.loads((out / "study.json").read_text()) if r["task"] == "single" and r["split"] == "test"]
    assert {(r["method"], r["sparsity"]) for r in rows} == {(m, 0.5) for m in cells}
    for r in rows:
        assert r["kd_loss"] == evals[r["method"]]["kd_loss"] and r["n"] == 1


@pytest.mark.parametrize("methods, message", [
    (["imp[2:4]"], "IMP prunes a fraction of each matrix's weights per round, unstructured only"),
    (["head_importance[2:4]"], "head_importance ranks heads and FFN neurons"),
    (["omp[2-4]"], "--sparsity_pattern '2-4': use unstructured, structured or N:M"),
    ([{"name": "omp", "pattern": "2:4"}], "a method given as a mapping needs name (and may have sparsity_pattern)"),
    (["omp[2:4]", {"name": "omp", "sparsity_pattern": "2:4"}], "name each method and pattern once"),
    (None, "search: ['sparsity_pattern'] are set by the study for each cell"),
])
def test_bad_pattern_methods_are_study_errors(tiny_bert, tmp_path, methods, message):
    """load_config's StudyError (an InputError: launchers/study.py prints it as one line, exit 2, as
    tests/test_study.py checks for the other config errors)."""
    from tamt_ds.study.config import StudyError, load_config

    path = tmp_path / "bad.yaml"
    cfg = config(tmp_path, tiny_bert, **({"methods": methods} if methods else {}))
    if methods is None:  # a pattern for every search: the methods' entries say it, one cell each
        cfg["search"]["sparsity_pattern"] = "2:4"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(StudyError) as e:
        load_config(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_pattern_methods_plan_their_cells(tiny_bert, tmp_path):
    """Labels, cell ids, N:M's own sparsity, and what each job is asked to do (no job run)."""
    from tamt_ds.study.config import load_config, mask_cells
    from tamt_ds.study.runner import plan

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, tiny_bert, sparsities=[0.3, 0.6],
                                          methods=[*METHODS, "omp", {"name": "random", "sparsity_pattern": "1:4"}])))
    cfg = load_config(str(path))
    assert cfg.methods == ["tamt-kd[2:4]", "omp[2:4]", "tamt-kd[structured]", "head_importance[structured]", "omp",
                           "random[1:4]"]
    assert [c.id for c in mask_cells(cfg)] == [
        "tamt-kd_2-4_s0.5_m1", "omp_2-4_s0.5", "tamt-kd_structured_s0.3_m1", "tamt-kd_structured_s0.6_m1",
        "head_importance_structured_s0.3_m1", "head_importance_structured_s0.6_m1", "omp_s0.3", "omp_s0.6",
        "random_1-4_s0.75_m1"]
    jobs, _ = plan(cfg)
    searches = [j.args for j in jobs if j.stage == "masks"]
    assert [a[a.index("--sparsity_pattern") + 1] for a in searches] == ["2:4", "structured", "structured"]
    (evaluate_job,) = [j for j in jobs if j.stage == "evaluate"]
    evaluate = evaluate_job.args
    names = [n for n in evaluate[evaluate.index("--mask") + 1:evaluate.index("--output")] if not n.endswith("mask.pt")]
    assert names == ["omp:2:4", "omp:0.3", "omp:0.6", "head_importance:0.3", "head_importance:0.6", "random:1:4"]
    # what the evaluation waits for (slurm): the searches' masks, never the baselines it builds itself
    searched = [n for n in evaluate[evaluate.index("--mask") + 1:evaluate.index("--output")] if n.endswith("mask.pt")]
    assert sorted(evaluate_job.needs) == sorted(searched) and len(searched) == 3
