"""--mask_snapshot_steps: real 2-rank ZeRO-3 searches (dropout on, so the RNG matters).  A snapshot
is the mask a search stopped at that step exports, and taking it changes nothing of the run."""
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, torchrun

LAUNCHER = ROOT / "launchers" / "search.py"


def constant_lr_config(tmp):
    """zero3_cpu.json (stage3_param_persistence_threshold 0) with a learning rate that does not
    depend on --max_steps: only then is a 2-step search the first 2 steps of a 5-step one (the
    default linear decay ends at --max_steps; its snapshots are steps of the longer schedule)."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 5e-3, "warmup_max_lr": 5e-3,
                                                       "warmup_num_steps": 1, "warmup_type": "linear"}}
    path = tmp / "ds_constant_lr.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tiny_bert_dropout, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snapshots")
    ds = constant_lr_config(tmp)

    def search(name, steps, *extra):
        torchrun(LAUNCHER, "--model_name_or_path", tiny_bert_dropout, "--output_dir", tmp / name, "--deepspeed", ds,
                 "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--validation_blocks", "8",
                 "--threshold_reset_steps", "3", "--logging_steps", "1", "--max_steps", steps, "--sparsity", "0.6",
                 *extra)
        return tmp / name

    return {"snap": search("snap", 5, "--mask_snapshot_steps", "2", "4", "--eval_steps", "3", "--save_steps", "2"),
            "plain": search("plain", 5, "--eval_steps", "0", "--save_steps", "5"),
            "short": search("short", 2, "--eval_steps", "0", "--save_steps", "2")}


def load(path):
    return torch.load(path, weights_only=True)


def test_snapshot_is_the_shorter_search_and_the_run_is_unchanged(runs):
    snap, plain, short = runs["snap"], runs["plain"], runs["short"]
    early, later, final = load(snap / "snapshots/2/mask.pt"), load(snap / "snapshots/4/mask.pt"), load(snap / "mask.pt")
    separate = load(short / "mask.pt")
    assert early.keys() == separate.keys() == final.keys() and len(early) == 14
    for key in early:
        assert torch.equal(early[key], separate[key]), key  # snapshot at 2 == a search of 2 steps
        assert torch.equal(final[key], load(plain / "mask.pt")[key]), key  # snapshots leave the run as it was
        for mask in (early, later):  # exactly the target sparsity, though step 2 and 4 fall between resets
            assert mask[key].dtype == torch.bool and int((~mask[key]).sum()) == int(mask[key].numel() * 0.6), key
    assert any(not torch.equal(early[k], final[k]) for k in early)  # the search moved: the test can fail

    def trace(run):  # loss (dropout: the RNG) and live-mask movement at every step
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"], r["mask/change_since_last_log"], r["mask/distance_to_init"])
                for r in rows if "train/loss" in r]
    assert trace(snap) == trace(plain)
    assert trace(snap)[:2] == trace(short)
    for rank in (0, 1):  # the last checkpoint: live thresholds, scores and Adam state, bit for bit
        a, b = (load(run / f"checkpoints/step5/rank{rank}.pt") for run in (snap, plain))
        assert a["state"]["cuts"] == b["state"]["cuts"] and a["rng"]["torch"].equal(b["rng"]["torch"])
        for name, entry in a["params"].items():
            for key, value in entry.items():
                assert value.equal(b["params"][name][key]) if torch.is_tensor(value) else value == b["params"][name][key]


def test_cost_recorded_with_each_mask(runs):
    snap, plain, short = runs["snap"], runs["plain"], runs["short"]
    costs = {step: json.loads((snap / f"snapshots/{step}/cost.json").read_text()) for step in (2, 4)}
    final = json.loads((snap / "cost.json").read_text())
    assert costs[2]["search_tokens"] == json.loads((short / "cost.json").read_text())["search_tokens"]
    assert final["search_tokens"] == json.loads((plain / "cost.json").read_text())["search_tokens"]
    # 2 ranks x 4 blocks x up to 32 tokens per step, packed blocks: nearly full
    for step, cost in [*costs.items(), (5, final)]:
        assert cost["search_steps"] == step and cost["world_size"] == 2
        assert 0.9 * step * 2 * 4 * 32 <= cost["search_tokens"] <= step * 2 * 4 * 32
        assert cost["search_flops"] == cost["search_tokens"] * cost["flops_per_token"] > 0
        assert cost["search_device_seconds"] > 0
    assert costs[2]["search_device_seconds"] < costs[4]["search_device_seconds"] < final["search_device_seconds"]


def test_snapshot_step_out_of_range_refused(tiny_bert, tmp_path):
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--model_name_or_path", tiny_bert, "--output_dir",
                           str(tmp_path / "o"), "--max_steps", "4", "--mask_snapshot_steps", "2", "9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "--mask_snapshot_steps 9" in errors[0] and "1..--max_steps (4)" in errors[0]
    assert not (tmp_path / "o").exists()
