"""results.json (per task), the study tables, and the output directories they go to."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from tamt_ds import engine as eng, sharding
from tamt_ds.checkpoint import atomic_write_text
from tamt_ds.downstream.arguments import FinetuneArguments, FinetuneError, MaskSpec
from tamt_ds.downstream.data import TaskData
from tamt_ds.downstream.study import _json_safe, aggregate_seeds, study_table, write_study


def summarize(args: FinetuneArguments, data: TaskData, mask: MaskSpec, ds_config: dict, seeds: list[int],
              per_seed: list[dict]) -> dict:
    """results.json: the run, best / final metrics as mean ± std over the seeds done so far,
    the sparsity measured from the trained weights, and every seed's details."""
    spec, done = data.spec, per_seed
    out = {
        "task": spec.name, "kind": spec.kind, "main_metric": spec.main_metric, "eval_splits": list(spec.eval_splits),
        "model": args.model_name_or_path, "mask": args.mask or "none", "mask_kind": mask.kind,
        "mask_sparsity": mask.sparsity, "unmasked_matrices": list(mask.unmasked),
        "precision": str(eng.precision(ds_config)).removeprefix("torch."), "world_size": sharding.world_size(),
        "seeds": seeds, "seeds_done": [r["seed"] for r in done], "complete": len(done) == len(seeds),
    }
    if done:
        out["best"] = aggregate_seeds([r["best"] for r in done])
        out["final"] = aggregate_seeds([r["final"] for r in done])
        measured = [r["sparsity"]["measured"] for r in done]
        out["sparsity"] = {
            "measured": float(np.mean(measured)), "values": measured, "mask": mask.sparsity,
            "pruned_nonzero": sum(r["sparsity"]["pruned_nonzero"] for r in done),
            "matrices": done[-1]["sparsity"]["matrices"], "numel": done[-1]["sparsity"]["numel"],
            "per_matrix": done[-1]["sparsity"]["per_matrix"],
        }
    out["per_seed"] = [{k: v for k, v in r.items() if k != "sparsity"}
                       | {"sparsity": {k: v for k, v in r["sparsity"].items() if k != "per_matrix"}} for r in done]
    out["args"] = dataclasses.asdict(args)
    out["deepspeed"] = dict(ds_config)
    return out


def write_results(path: str, results: dict) -> None:
    if sharding.rank() == 0:
        atomic_write_text(path, json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")


def prepare_output_dirs(args: FinetuneArguments, task_dirs: list[str], study: bool) -> None:
    """Refuse to overwrite earlier results unless asked (decided on rank 0, agreed by all)."""
    error = None
    if sharding.rank() == 0:
        taken = [os.path.join(d, "results.json") for d in task_dirs if os.path.exists(os.path.join(d, "results.json"))]
        if study and os.path.exists(os.path.join(args.output_dir, "study.json")):
            taken.append(os.path.join(args.output_dir, "study.json"))
        if taken and not args.overwrite_output_dir:
            error = (f"{taken[0]} already exists: pass --overwrite_output_dir to replace it, "
                     f"or another --output_dir")
        elif taken:  # replacing: earlier curves must not mix with the new ones
            for d in task_dirs:
                shutil.rmtree(os.path.join(d, "tensorboard"), ignore_errors=True)
                if os.path.exists(os.path.join(d, "metrics.jsonl")):
                    os.remove(os.path.join(d, "metrics.jsonl"))
        if error is None:
            for d in task_dirs:
                os.makedirs(d, exist_ok=True)
    error = sharding.broadcast_object(error)
    if error:
        raise FinetuneError(error)



def write_study_tables(args: FinetuneArguments, all_results: dict) -> None:
    """study.md / study.json (best dev score, as the paper reports) and study_final.*."""
    if sharding.rank() != 0:
        return
    mains = {n: r["main_metric"] for n, r in all_results.items()}
    for which, stem in (("best", "study"), ("final", "study_final")):
        md, table = study_table({n: r[which] for n, r in all_results.items()}, main_metrics=mains)
        write_study(os.path.join(args.output_dir, stem), md, table)
        if which == "best":
            print(f"\nBest dev score, mean ± std over seeds ({args.output_dir}/study.md):\n\n{md}", flush=True)

