"""--gradient_checkpointing under ZeRO-3 with frozen weights and trained scores: real 2-rank
fp32 runs, with and without it, must end with the same masks."""
import json

import torch

from tests.conftest import torchrun
from tests.test_search_e2e import LAUNCHER, common
from tests.tiny_models import make_tiny


def _train_rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]


def test_same_masks_with_and_without_gradient_checkpointing(tmp_path):
    # dropout > 0: the recomputed forward must replay the same dropout masks
    model = make_tiny(str(tmp_path / "tiny"), "bert", dropout=0.1, mlm_head=True)
    steps = ["--objective", "mlm_kd", "--max_steps", "6", "--save_steps", "6"]
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    torchrun(LAUNCHER, *common(model, plain, *steps))
    torchrun(LAUNCHER, *common(model, ckpt, *steps, "--gradient_checkpointing"))

    assert json.loads((ckpt / "run_config.json").read_text())["search"]["gradient_checkpointing"] is True
    a = torch.load(plain / "mask.pt", weights_only=True)
    b = torch.load(ckpt / "mask.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = _train_rows(plain), _train_rows(ckpt)
    assert [r["train/loss"] for r in rows_a] == [r["train/loss"] for r in rows_b]
    # the scores really trained through the recomputed layers (reentrant checkpointing gives them no gradient)
    assert rows_b[-1]["mask/distance_to_init"] > 0
