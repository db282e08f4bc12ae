"""Runs under torchrun: builds the search's engine (objective mlm_kd: scores and an MLM head
train) on this world size, loads the newest checkpoint under CKPT_ROOT with
tamt_ds.checkpoint, and checks that every trainable tensor and its Adam moments,
consolidated over the ranks, equal what was saved -- read here straight from the rank
files, on whatever world size wrote them.  Rank 0 writes what it compared to OUT_JSON.

usage: resume_worker.py MODEL_DIR CKPT_ROOT OUT_JSON [CONFIG]   (CONFIG: a ds_configs/ name, default zero3_cpu.json;
under bf16 the forward's copy must be the restored fp32 value rounded to bf16)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

from tamt_ds.errors import exit_process, run_cli  # noqa: E402
from tamt_ds import checkpoint, engine as eng, sharding  # noqa: E402
from tamt_ds.masking import attach_masks  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402


def saved_full(files: list[dict], name: str, key: str) -> torch.Tensor:
    """A parameter's full flat tensor from the pieces every saved rank holds."""
    entry = files[0]["params"][name]
    full = torch.full((entry["numel"],), float("nan"))
    for f in files:
        piece = f["params"][name]
        full[piece["offset"]:piece["offset"] + piece[key].numel()] = piece[key]
    assert not full.isnan().any(), f"{name} {key}: the saved pieces do not cover the tensor"
    return full


def main():
    model_dir, root, out = sys.argv[1], sys.argv[2], sys.argv[3]
    config = sys.argv[4] if len(sys.argv) > 4 else "zero3_cpu.json"
    eng.init_distributed()
    torch.manual_seed(0)
    cfg = eng.load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", config),
                             micro_batch=4, grad_accum=1, grad_clip=1.0)
    # As in the GPU configs: ZeRO-3 keeps parameters under 1e5 elements gathered ("persistent");
    # here that is every score of the tiny model and the MLM head's bias. Their full copies
    # must show the loaded values too.
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1e5
    model = load_model(model_dir, with_mlm_head=True, ds_config=cfg)
    head = [p for n, p in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
    for p in model.parameters():
        p.requires_grad_(False)
    masks = attach_masks(model, sparsity=0.7)
    masks.init_scores("magnitude")
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    for p in head:
        if id(p) not in tied:
            p.requires_grad_(True)
    engine, _ = eng.build_engine(model, cfg, params=masks.scores + [p for p in head if p.requires_grad], lr=1.0,
                                 weight_decay=0.5, total_steps=1000, warmup_steps=0)

    # A step before loading: the optimizer state exists and must be overwritten, and the
    # persistent parameters stay gathered with their old values.
    ids = torch.arange(10, 26).reshape(2, 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    engine.backward(compute_loss("mlm_kd", engine, masks, batch)["loss"])
    engine.step()

    found = checkpoint.find(root, checkpoint.model_fingerprint(model_dir))
    restored = checkpoint.load(engine, found)
    files = [torch.load(os.path.join(found.folder, f"rank{r}.pt"), weights_only=False) for r in range(found.world_size)]

    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    elements = 0
    for name, p in trainable:
        got = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        with sharding.gathered([p]):
            live = p.data.detach().flatten().cpu().clone()  # what the forward computes with
        for key, value in got.items():
            want = saved_full(files, name, key)
            assert torch.equal(value.detach().flatten().cpu(), want), f"{name} {key} differs after loading"
        assert torch.equal(live, saved_full(files, name, "fp32").to(live.dtype)), f"{name}: the module's copy differs"
        elements += p.ds_numel
    base = engine.optimizer.optimizer
    steps = {float(base.state[flat]["step"]) for flat in engine.optimizer.fp32_partitioned_groups_flat}
    assert steps == {float(files[0]["optimizer"]["scalars"]["step"])}, steps
    assert base.param_groups[0]["lr"] == files[0]["optimizer"]["param_groups"][0]["lr"]
    assert base.param_groups[0]["weight_decay"] == files[0]["optimizer"]["param_groups"][0]["weight_decay"]
    assert engine.lr_scheduler.last_epoch == files[0]["scheduler"]["last_epoch"]
    if sharding.rank() == 0:
        with open(out, "w") as f:
            json.dump({"saved_on": found.world_size, "loaded_on": sharding.world_size(), "step": restored.step,
                       "tensors": len(trainable), "scores": len(masks), "elements": elements,
                       "adam_step": steps.pop(), "lr": base.param_groups[0]["lr"],
                       "data_positions": len(restored.data), "dtypes": sorted({str(p.dtype) for _, p in trainable})}, f)


if __name__ == "__main__":
    exit_process(run_cli(main))  # the launchers' exit path: a clean run ends its process group
