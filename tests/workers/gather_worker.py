"""Runs under torchrun (2 ranks, ZeRO-3, gloo): what a KD search step gathers, by phase.

usage: gather_worker.py MODEL_DIR OUT_FILE STEPS [release|default]
`release`: no reuse, no prefetch, so every module's forward and backward gathers what it uses
and a phase's gathers are exactly its own; `default`: ds_configs/zero3_cpu.json as the search
runs it (prefetch and reuse on), and before and between the KD steps the other orders of
passes the project runs on one engine, each of which ZeRO-3's prefetch trace must survive:
evaluate_mask's on the fresh engine (every teacher pass, then every student pass), and the
search's held-out evaluation (teacher, student, per batch).  Counted in ZeRO-3's parameter
coordinator (each tensor it gathers, by name: a score or not, and its full bytes), and by
DeepSpeed's communication logging (`comms_logger`: all-gather message bytes).  Rank 0 writes, for the last KD step:
{phase: {"names": [...], "bytes": int}} for teacher / student / backward,
"comms_allgather_bytes", "score_names" and "weight_names" (of the masked matrices), and for
every KD step "invalidations" (of ZeRO-3's recorded trace during the step) and "replayed"
(whether the whole step, teacher to backward, ran on the trace recorded by an earlier one).
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
from tamt_ds.search import evaluate  # noqa: E402

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
    engine, _ = eng.build_engine(model, cfg, params=params, lr=1e-3, weight_decay=0.0, total_steps=2 * steps)
    names = {id(p): n for n, p in model.named_parameters()}

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
    invalidations = [0]
    invalidate = PartitionedParameterCoordinator._invalidate_trace

    def counting_invalidations(self):
        invalidations[0] += 1
        return invalidate(self)

    PartitionedParameterCoordinator._invalidate_trace = counting_invalidations
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    per_step = {"invalidations": [], "replayed": []}
    teacher = objectives.teacher_hidden_states

    def teacher_phase(*args, **kwargs):
        phase[0] = "teacher"
        try:
            return teacher(*args, **kwargs)
        finally:
            phase[0] = "student"

    objectives.teacher_hidden_states = teacher_phase
    g = torch.Generator().manual_seed(sharding.rank())

    def batch():
        ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def kd_step():
        gathered.clear()
        deepspeed.comm.comms_logger.comms_dict.clear()
        invalidations[0] = 0
        loss = objectives.compute_loss("kd", engine, masks, batch())["loss"]
        phase[0] = "backward"
        engine.backward(loss)
        phase[0] = "student"
        # the mode changes only where a step begins, or where the trace is dropped
        per_step["replayed"].append(coordinator.is_complete_trace() and not invalidations[0])
        engine.step()
        per_step["invalidations"].append(invalidations[0])

    held_out = [batch() for _ in range(3)]
    if mode == "default":
        with torch.no_grad():  # evaluate_mask's order on a fresh engine: every dense pass, then the mask's
            engine.eval()
            for b in held_out:
                objectives.teacher_hidden_states(engine, masks, b)
            for b in held_out:
                engine(**b, output_hidden_states=True)
            engine.train()
    for _ in range(steps):
        kd_step()
    if mode == "default":
        evaluate(engine, masks, held_out, engine.device, "kd")  # the search's evaluation
        for _ in range(steps):
            kd_step()
    comms = sum(size * record[0] for name, sizes in deepspeed.comm.comms_logger.comms_dict.items()
                if "all_gather" in name for size, record in sizes.items())
    if sharding.rank() == 0:
        with open(out, "w") as f:
            json.dump({**gathered, **per_step, "comms_allgather_bytes": comms,
                       "score_names": [names[id(s.score)] for s in masks],
                       "weight_names": [names[id(s.weight)] for s in masks]}, f)


if __name__ == "__main__":
    exit_process(run_cli(main))
