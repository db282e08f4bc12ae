"""Fine-tune a fixed subnetwork (or the dense model) downstream: the loop, top to bottom.

    set up ranks -> load the task(s) -> for each seed:
        load the model with a new head (partitioned by ZeRO-3) -> fix the mask (pruned weights := 0)
        -> engine -> [forward, backward, mask gradients, step, log, eval every --eval_steps and at the end]
        -> count zeros in the trained weights -> [save the model]
    -> results.json (best and final dev metrics, per seed and mean +- std) [-> study table]

One job per file beside this one: arguments.py (the command line), data.py (task
data and batches), fixed_mask.py (the mask: pruned weights 0, their gradients 0),
evaluation.py, audit.py (zeros counted after training), saving.py, results.py.
"""
from __future__ import annotations

import gc
import math
import os
import time

import torch
from torch import nn

from tamt_ds import engine as eng, sharding
from tamt_ds.downstream.arguments import (FinetuneArguments, MaskSpec, check_zero_stage, mask_label, parse_args,
                                          parse_mask, parse_seeds, slug, task_names, validate)
from tamt_ds.downstream.audit import measure_sparsity
from tamt_ds.downstream.data import TaskData, examples_sha256, load_data, train_batches
from tamt_ds.downstream.evaluation import evaluate
from tamt_ds.downstream.fixed_mask import FixedMask, mask_for_task
from tamt_ds.downstream.metrics import main_score
from tamt_ds.downstream.results import prepare_output_dirs, summarize, write_results, write_study_tables
from tamt_ds.downstream.saving import save_model
from tamt_ds.downstream.tasks import TaskSpec
from tamt_ds.engine import to_device
from tamt_ds.guards import NonFiniteGuard, check_shared_dir
from tamt_ds.maskfile import read_mask_file
from tamt_ds.models import load_task_model, load_tokenizer
from tamt_ds.monitor import Monitor, memory_mb


def run_seed(args: FinetuneArguments, data: TaskData, seed: int, ds_config: dict, tokenizer, mask: MaskSpec,
             mask_file: dict | None, monitor: Monitor, model_dir: str | None) -> dict:
    """Fine-tune one seed from the pre-trained weights; its best / final dev metrics and sparsity."""
    from transformers import DataCollatorWithPadding

    spec = data.spec
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # same on every rank: the new head starts identical everywhere
    model = load_model_for(args, spec, ds_config)
    fixed = FixedMask.build(model, mask, mask_file, args.mask_seed)  # before the engine: fp32 masters get the zeros

    features = data.train_features(args, tokenizer, seed)
    collate = DataCollatorWithPadding(tokenizer)
    total, per_epoch = steps_for(args, len(features))
    engine, scheduler = eng.build_engine(model, ds_config, params=param_groups(model, args.weight_decay),
                                         lr=args.learning_rate, weight_decay=args.weight_decay, total_steps=total,
                                         warmup_steps=math.ceil(args.warmup_ratio * total))
    device = engine.device
    batches = train_batches(features.with_format(None), collate, args.per_device_train_batch_size, seed)
    tag = f"seed{seed}"
    monitor.write(f"{spec.name} | seed {seed} | {len(features)} train features | {total} steps "
                  f"({per_epoch}/epoch) | {mask_label(mask)} | world size {sharding.world_size()} | "
                  f"{eng.precision_line(ds_config)} | ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}")

    history, best, best_step, final = [], None, 0, None
    # The loss adds up on the device and is read once per logging step: no host sync per step.
    window = {"t": time.perf_counter(), "loss": torch.zeros((), device=device), "n": 0, "tokens": 0}
    engine.train()
    diverged = NonFiniteGuard(device)
    for step in range(1, total + 1):
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)  # on the host: counting its tokens costs no device sync
            window["tokens"] += int(batch["attention_mask"].sum())
            loss = engine(**to_device(batch, device)).loss
            engine.backward(loss)
            if fixed is not None and engine.is_gradient_accumulation_boundary():
                fixed.mask_gradients()  # pruned weights: zero gradient, before clipping and AdamW see it
            engine.step()  # DeepSpeed steps the optimizer (and the schedule) at the accumulation boundary
            diverged.observe(loss, step)
            window["loss"] += loss.detach().float()
            window["n"] += 1
        monitor.step()

        if step % args.logging_steps == 0 or (args.eval_steps and step % args.eval_steps == 0) or step == total:
            diverged.check(kept="results.json keeps the seeds finished before")
        if step % args.logging_steps == 0 or step == total:
            log_train(monitor, step, tag, scheduler, window)
        if (args.eval_steps and step % args.eval_steps == 0) or step == total:
            metrics = final = evaluate(engine, data, collate, args.per_device_eval_batch_size)
            history.append({"step": step, **metrics})
            if best is None or main_score(spec, metrics) > main_score(spec, best):
                best, best_step = metrics, step
            monitor.log(step, {f"{tag}/eval/{k}": v for k, v in metrics.items()})
            monitor.write(f"{spec.name} seed {seed} step {step}/{total}: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))

    sparsity = measure_sparsity(model, fixed)
    if sparsity["pruned_nonzero"] or sparsity["pruned_nonzero_fp32_master"]:
        raise RuntimeError(f"the mask leaked: {sparsity['pruned_nonzero']} pruned weights "
                           f"({sparsity['pruned_nonzero_fp32_master']} fp32 masters) are not zero")
    if model_dir is not None:
        save_model(model, tokenizer, spec.head, model_dir)
    engine.destroy()  # releases ZeRO-3's hooks and buffers before the next seed builds its engine
    del engine, model, fixed
    gc.collect()
    used = data.train_examples(args, seed)
    return {"seed": seed, "steps": total, "train_examples": len(used), "train_sha256": examples_sha256(used),
            "best_step": best_step, "best": best, "final": final,
            "history": history, "sparsity": sparsity, "train_time_s": time.perf_counter() - t0,
            **({"model_dir": model_dir} if model_dir else {})}


def load_model_for(args: FinetuneArguments, spec: TaskSpec, ds_config: dict) -> nn.Module:
    if spec.kind == "squad":
        return load_task_model(args.model_name_or_path, head="question_answering", ds_config=ds_config)
    kwargs = {"num_labels": spec.num_labels}
    if spec.kind == "regression":
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(spec.label_list))
        kwargs["label2id"] = {name: i for i, name in enumerate(spec.label_list)}
    return load_task_model(args.model_name_or_path, head="classification", ds_config=ds_config, **kwargs)


def steps_for(args: FinetuneArguments, n_features: int, world_size: int | None = None) -> tuple[int, int]:
    """(optimizer steps per seed, per epoch): --num_train_epochs of this rank's share, capped by --max_steps
    (world_size: this run's; the study's plan passes the one its job will have)."""
    micro = math.ceil(math.ceil(n_features / (world_size or sharding.world_size())) / args.per_device_train_batch_size)
    per_epoch = math.ceil(micro / args.gradient_accumulation_steps)  # DistributedSampler pads the last share
    total = max(1, math.ceil(args.num_train_epochs * per_epoch))
    return (min(total, args.max_steps) if args.max_steps else total), per_epoch


def log_train(monitor: Monitor, step: int, tag: str, scheduler, window: dict) -> None:
    """Training loss averaged over the window and the ranks."""
    loss = window["loss"].double().cpu() / max(window["n"], 1)  # the one sync
    values = torch.stack([loss, torch.tensor(float(window["tokens"]), dtype=torch.float64)])
    sharding.all_reduce_(values)
    elapsed = time.perf_counter() - window["t"]
    loss = float(values[0]) / sharding.world_size()
    monitor.step(0, loss=loss)
    monitor.log(step, {
        f"{tag}/train/loss": loss,
        f"{tag}/train/learning_rate": scheduler.get_last_lr()[0] if scheduler is not None else float("nan"),
        f"{tag}/perf/tokens_per_s": float(values[1]) / elapsed,
        **{f"{tag}/perf/{k}": v for k, v in memory_mb().items()},
    })
    window.update(t=time.perf_counter(), loss=torch.zeros_like(window["loss"]), n=0, tokens=0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Everything trains; biases and LayerNorms are exempt from weight decay (as in BERT's
    fine-tuning and HF's Trainer).  Masked weights decay like any weight: a pruned one is
    0 and stays 0 under decoupled decay."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or id(p) in norms else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]



def finetune(args: FinetuneArguments) -> dict:
    """Fine-tune every task for every seed; returns {task: results}."""
    validate(args)
    names = task_names(args)
    seeds = parse_seeds(args.seeds)
    eng.init_distributed(args.dist_timeout)  # before the file checks: a node may lack a file the others have
    mask = parse_mask(args.mask)
    mask_file = read_mask_file(mask.path) if mask.kind == "file" else None
    if sharding.rank() != 0:  # one copy of the load reports and progress bars
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    ds_config = eng.load_ds_config(args.deepspeed, micro_batch=args.per_device_train_batch_size,
                                   grad_accum=args.gradient_accumulation_steps, grad_clip=args.max_grad_norm)
    check_zero_stage(mask, ds_config)
    tokenizer = load_tokenizer(args.model_name_or_path)
    # Every input error comes before any training and before anything is written.
    tasks = {name: load_data(args, name, tokenizer) for name in names}
    task_masks = {name: mask_for_task(args, data.spec, mask, mask_file) for name, data in tasks.items()}

    study = args.tasks is not None
    task_dirs = {n: os.path.join(args.output_dir, slug(n)) if study else args.output_dir for n in names}
    prepare_output_dirs(args, list(task_dirs.values()), study)
    check_shared_dir(args.output_dir)
    all_results = {}
    for name, data in tasks.items():
        out_dir = task_dirs[name]
        total, _ = steps_for(args, len(data.train_features(args, tokenizer, seeds[0])))
        monitor = Monitor(out_dir, total_steps=total * len(seeds), desc=slug(name))
        per_seed = []
        for seed in seeds:
            model_dir = None
            if args.save_model:
                model_dir = os.path.join(out_dir, "model" if len(seeds) == 1 else f"model_seed{seed}")
            per_seed.append(run_seed(args, data, seed, ds_config, tokenizer, task_masks[name], mask_file, monitor,
                                     model_dir))
            results = summarize(args, data, task_masks[name], ds_config, seeds, per_seed)
            write_results(os.path.join(out_dir, "results.json"), results)  # after every seed: nothing done is lost
        best = results["best"]
        monitor.write(f"{data.spec.name}: best " + ", ".join(f"{k} {v['mean']:.2f} ± {v['std']:.2f}"
                                                              for k, v in best.items())
                      + f" | measured sparsity {results['sparsity']['measured']:.4f} -> {out_dir}/results.json")
        monitor.close()
        all_results[name] = results

    if study:
        write_study_tables(args, all_results)
    return all_results



def main(argv=None) -> int:
    from tamt_ds import preflight

    return preflight.run_entry("finetune", lambda: finetune(parse_args(argv)), argv)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
