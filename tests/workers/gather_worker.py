"""Runs under torchrun (2 ranks, ZeRO-3, gloo): what a KD search step gathers, by phase.

usage: gather_worker.py MODEL_DIR OUT_FILE STEPS [release|default]
`release`: no reuse, no prefetch, so every module's forward and backward gathers what it uses
and a phase's gathers are exactly its own; `default`: ds_configs/zero3_cpu.json as the search
runs it (prefetch and reuse on).  Counted in ZeRO-3's parameter coordinator (each tensor it
gathers, by name: a score or not, and its full bytes), and by DeepSpeed's communication
logging (`comms_logger`: all-gather message bytes).  Rank 0 writes, for the last step:
{phase: {"names": [...], "bytes": int}} for teacher / student / backward, and
"comms_allgather_bytes".
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from tamt_ds import engine as eng, objectives, sharding  # noqa: E402
from tamt_ds.errors import exit_process, run_cli  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import load_model  # noqa: E402

SPARSITY = 0.7


def main():
    model_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "release"
    import deepspeed.comm
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    eng.init_distributed()
    cfg = eng.load_ds_config(os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero3_cpu.json"),
                             micro_batch=2, grad_accum=1, grad_clip=1.0)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if mode == "release":
        cfg["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_max_live_parameters=0,
                                        stage3_prefetch_bucket_size=0)
    cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    model = load_model(model_dir, with_mlm_head=False, ds_config=cfg)
    masks, params = prepare_search(model, sparsity=SPARSITY)
    engine, _ = eng.build_engine(model, cfg, params=params, lr=1e-3, weight_decay=0.0, total_steps=steps)
    names = {id(p): n for n, p in model.named_parameters()}  # scores included: named before any teacher pass

    phase = ["student"]
    gathered: dict = {}
    gather = PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_

    def counting(self, params, forward, quantize=False):
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                entry = gathered.setdefault(phase[0], {"names": [], "bytes": 0})
                entry["names"].append(names[id(p)])
                entry["bytes"] += p.ds_numel * p.element_size()
        return gather(self, params, forward, quantize)

    PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_ = counting
    teacher = objectives.teacher_hidden_states

    def teacher_phase(*args, **kwargs):
        phase[0] = "teacher"
        try:
            return teacher(*args, **kwargs)
        finally:
            phase[0] = "student"

    objectives.teacher_hidden_states = teacher_phase
    g = torch.Generator().manual_seed(sharding.rank())
    for step in range(steps):
        gathered.clear()
        deepspeed.comm.comms_logger.comms_dict.clear()
        ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        loss = objectives.compute_loss("kd", engine, masks, batch)["loss"]
        phase[0] = "backward"
        engine.backward(loss)
        engine.step()
        phase[0] = "student"
    comms = sum(size * record[0] for name, sizes in deepspeed.comm.comms_logger.comms_dict.items()
                if "all_gather" in name for size, record in sizes.items())
    if sharding.rank() == 0:
        with open(out, "w") as f:
            json.dump({**gathered, "comms_allgather_bytes": comms,
                       "score_names": [f"{s.name}.mask_score" for s in masks]}, f)


if __name__ == "__main__":
    exit_process(run_cli(main))
