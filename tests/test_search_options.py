"""Search options not covered elsewhere, each a real run: --threshold_scope global under 2-rank
ZeRO-3 against one plain process, --gradient_accumulation_steps against the same batch in one
micro-batch, --overwrite_output_dir over a finished run, and ds_configs/zero3_offload.json for
the search and for fine-tuning against the same config without offload."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.cluster import search_args
from tests.conftest import ROOT, torchrun
from tests.test_finetune_cli import write_local_classification

SEARCH = ROOT / "launchers" / "search.py"
FINETUNE = ROOT / "launchers" / "finetune.py"
SCOPE_WORKER = ROOT / "tests" / "workers" / "scope_worker.py"


def load_mask(out):
    return torch.load(out / "mask.pt", weights_only=True)


def assert_same_masks(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_rows(path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if "train/loss" in l]


# ---- --threshold_scope global -----------------------------------------------------------------
def test_global_scope_under_zero3_equals_one_process_with_exact_global_sparsity(tiny_bert, tmp_path):
    ref, z3 = tmp_path / "ref.pt", tmp_path / "z3.pt"
    subprocess.run([sys.executable, str(SCOPE_WORKER), tiny_bert, ref, "6", "plain", "global"], check=True, cwd=ROOT,
                   capture_output=True)
    torchrun(SCOPE_WORKER, tiny_bert, z3, 6, "zero3", "global")
    ref, z3 = torch.load(ref, weights_only=False), torch.load(z3, weights_only=False)
    assert torch.allclose(torch.tensor(ref["losses"]), torch.tensor(z3["losses"]), rtol=1e-5, atol=1e-7)
    assert_same_masks(ref["final_masks"], z3["final_masks"])
    masks = z3["final_masks"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == int(total * 0.7)  # one k over all matrices, exactly
    per_matrix = [float((~m).float().mean()) for m in masks.values()]
    assert max(per_matrix) - min(per_matrix) > 0.05, per_matrix  # one threshold, not one per matrix
    taus = {v["threshold"] for v in z3["stats"]["per_matrix"].values()}
    assert len(taus) == 1, taus


# ---- --gradient_accumulation_steps, --overwrite_output_dir ------------------------------------
STEPS = ["--max_steps", "3", "--save_steps", "3", "--threshold_reset_steps", "2", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def batch4(tiny_bert, tmp_path_factory):
    """2 ranks x 4 blocks per step, no accumulation."""
    out = tmp_path_factory.mktemp("batch4") / "run"
    args = search_args(tiny_bert, out, *STEPS)
    args[args.index("--per_device_train_batch_size") + 1] = "4"
    torchrun(SEARCH, *args)
    return out


def test_accumulation_equals_the_whole_batch_and_overwrite_replaces_the_run(batch4, tiny_bert, tmp_path):
    """--per_device_train_batch_size 2 --gradient_accumulation_steps 2 sees the blocks of one
    batch of 4 (one reader per rank deals them in order) and averages their gradients: the same
    losses and mask.  It runs over a copy of that run with --overwrite_output_dir, whose stale
    checkpoints and log must be gone, not mixed in (the newest-two retention would keep step1)."""
    out = tmp_path / "run"
    shutil.copytree(batch4, out)
    stale = out / "checkpoints" / "step1"
    shutil.copytree(out / "checkpoints" / "step3", stale)  # as if a run had also saved at step 1
    (out / "checkpoints" / "latest").write_text("step1")
    (out / "mask.pt").write_bytes(b"stale")
    torchrun(SEARCH, *search_args(tiny_bert, out, *STEPS, "--gradient_accumulation_steps", "2",
                                  "--overwrite_output_dir"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step3"]
    assert (out / "checkpoints" / "latest").read_text() == "step3"
    rows, ref_rows = train_rows(out / "metrics.jsonl"), train_rows(batch4 / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # the old run's log replaced, not appended to
    cfg = json.loads((out / "run_config.json").read_text())["search"]
    assert (cfg["gradient_accumulation_steps"], cfg["per_device_train_batch_size"]) == (2, 2)
    for r, ref in zip(rows, ref_rows):
        assert r["data/blocks_seen"] == ref["data/blocks_seen"] == r["step"] * 2 * 4
        assert r["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-5), r["step"]
        assert r["train/learning_rate"] == ref["train/learning_rate"]
    assert_same_masks(load_mask(out), load_mask(batch4))
    assert rows[-1]["mask/distance_to_init"] > 0  # the masks really moved


# ---- ds_configs/zero3_offload.json ------------------------------------------------------------
def offload_configs(tmp) -> tuple[str, str]:
    """zero3_offload.json (persistence threshold 0: real partitioning), and the same without offload."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "offload.json").write_text(json.dumps(cfg))
    for key in ("offload_optimizer", "offload_param"):
        del cfg["zero_optimization"][key]
    (tmp / "device.json").write_text(json.dumps(cfg))
    return str(tmp / "offload.json"), str(tmp / "device.json")


def with_config(args: list[str], config: str) -> list[str]:
    args = list(args)
    args[args.index("--deepspeed") + 1] = config
    return args


def test_offload_search_and_finetuning_equal_the_runs_without_offload(tiny_bert, tmp_path):
    offload, device = offload_configs(tmp_path)
    runs = {}
    for name, config in (("offload", offload), ("device", device)):
        search_out = tmp_path / name / "search"
        torchrun(SEARCH, *with_config(search_args(tiny_bert, search_out, *STEPS), config))
        runs[name] = search_out
    assert json.loads((runs["offload"] / "run_config.json").read_text())["deepspeed"]["zero_optimization"][
        "offload_optimizer"]["device"] == "cpu"
    searched = [train_rows(runs[n] / "metrics.jsonl") for n in ("offload", "device")]
    assert [r["step"] for r in searched[0]] == [1, 2, 3]
    assert [r["train/loss"] for r in searched[0]] == [r["train/loss"] for r in searched[1]]
    assert_same_masks(load_mask(runs["offload"]), load_mask(runs["device"]))

    task = write_local_classification(tmp_path / "task")
    finetuned = {}
    for name, config in (("offload", offload), ("device", device)):
        out = tmp_path / name / "finetune"
        torchrun(FINETUNE, "--model_name_or_path", tiny_bert, "--task", f"local:{task}", "--mask",
                 runs["device"] / "mask.pt", "--max_seq_length", "16", "--per_device_train_batch_size", "4",
                 "--learning_rate", "1e-3", "--max_steps", "4", "--logging_steps", "1", "--eval_steps", "0",
                 "--deepspeed", config, "--output_dir", out)
        finetuned[name] = out
    results = [json.loads((finetuned[n] / "results.json").read_text()) for n in ("offload", "device")]
    assert all(r["complete"] and r["world_size"] == 2 and r["per_seed"][0]["steps"] == 4 for r in results)
    losses = [[v for r in map(json.loads, (finetuned[n] / "metrics.jsonl").read_text().splitlines())
               for k, v in r.items() if k.endswith("/train/loss")] for n in ("offload", "device")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert results[0]["best"] == results[1]["best"]
    assert results[0]["sparsity"]["pruned_nonzero"] == 0
