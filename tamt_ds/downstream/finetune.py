"""Fine-tune a fixed subnetwork (or the dense model) downstream, top to bottom.

    set up ranks -> load the task(s) -> for each seed:
        load the model with a new head (partitioned by ZeRO-3) -> fix the mask, zero pruned weights
        -> engine -> [forward, backward, step, log, eval every --eval_steps and at the end]
        -> count zeros in the trained weights -> [save the model]
    -> results.json (best and final dev metrics, per seed and mean +- std) [-> study table]

The mask is the search's mechanism used the other way round: a frozen `mask_score` next
to each masked weight, W_eff = W * m, so dL/dW = dL/dW_eff * m and a pruned weight gets
exactly zero gradient.  It starts at exactly 0 (written before DeepSpeed copies its fp32
masters), and AdamW (decoupled weight decay) leaves a zero weight with zero gradient at
exactly 0 in every precision.  The harness counts it after training, from the weights.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tamt_ds import engine as eng, sharding
from tamt_ds.checkpoint import atomic_write_text
from tamt_ds.downstream.metrics import main_score, split_metrics
from tamt_ds.downstream.squad import postprocess_predictions, squad_metrics
from tamt_ds.downstream.study import _json_safe, aggregate_seeds, study_table, write_study
from tamt_ds.downstream.tasks import KNOWN_TASKS, LOCAL_PREFIX, TaskError, TaskSpec, _subset, load_task, \
    tokenize_split
from tamt_ds.errors import InputError
from tamt_ds.export import replace_dir
from tamt_ds.guards import NonFiniteGuard, check_shared_dir
from tamt_ds.maskfile import masks_for_model, read_mask_file
from tamt_ds.masking import TAMT_PATTERNS, MaskError, MaskSet, attach_masks
from tamt_ds.models import (DEFAULT_MODEL, ModelError, export_name, load_task_model, load_tokenizer,
                            resolve_model_path, task_model_class, zero3_init)
from tamt_ds.monitor import Monitor, memory_mb

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "hub name or local model directory"})
    mask: str | None = field(default=None, metadata={
        "help": "a search's mask.pt (or a mask in the TAMT authors' layout); omp:S or random:S to build "
                "that baseline at sparsity S; none (default) for the dense model"})
    mask_seed: int = field(default=0, metadata={"help": "seed of a random:S mask"})
    task: str | None = field(default=None, metadata={
        "help": f"one of {', '.join(KNOWN_TASKS)}, or local:DIR (DIR/train.tsv, DIR/validation.tsv)"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma-separated tasks: a study, one table of mean +- std over seeds (instead of --task)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "original task files (GLUE root or task folder; SQuAD JSON folder), or task=DIR,task=DIR; "
                "default: the hub"})
    text_columns: str | None = field(default=None, metadata={"help": "local tasks: one or two columns, e.g. word,sentence1"})
    max_seq_length: int = 128
    doc_stride: int = field(default=128, metadata={"help": "SQuAD: step between window starts, in tokens"})
    train_subset: int | None = field(default=None, metadata={"help": "train on a seeded random N-example subset"})
    seeds: str = field(default="42", metadata={"help": "comma-separated fine-tuning seeds, e.g. 1,2,3"})
    # The packaged MiniLM on CPU-sized runs; the paper's BERT-base GLUE runs use 2e-5 (SQuAD 3e-5),
    # and a sparse subnetwork recovers faster with more (see docs/finetune.md).
    learning_rate: float = 1e-4
    num_train_epochs: float = 3.0
    max_steps: int | None = field(default=None, metadata={"help": "cap on optimizer steps per seed"})
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's; biases and LayerNorms are exempt"})
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = field(default=500, metadata={"help": "evaluate every N steps (0: only at the end)"})
    logging_steps: int = 50
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (default: one for this machine)"})
    output_dir: str = "outputs/finetune"
    overwrite_output_dir: bool = False
    save_model: bool = field(default=False, metadata={"help": "save the fine-tuned model (plain transformers layout)"})
    dist_timeout: float = field(default=eng.DEFAULT_DIST_TIMEOUT_S, metadata={
        "help": "seconds a rank waits for its peers before the run stops (see docs/cluster.md)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


class FinetuneError(InputError):
    pass


# ------------------------------------------------------------------ arguments


@dataclass(frozen=True)
class MaskSpec:
    kind: str  # dense | omp | random | file
    sparsity: float | None = None  # omp / random: the target; file: set per task, over the matrices it covers
    path: str | None = None
    unmasked: tuple[str, ...] = ()  # file: the task model's TAMT matrices it has no mask for (they stay dense)


def parse_mask(text: str | None) -> MaskSpec:
    if text is None or text.lower() in ("", "none", "dense"):
        return MaskSpec("dense", 0.0)
    kind, _, value = text.partition(":")
    if kind in ("omp", "random") and value:
        try:
            s = float(value)
        except ValueError:
            s = -1.0
        if not 0.0 <= s < 1.0:
            raise FinetuneError(f"--mask {text}: the sparsity must be a number in [0, 1), e.g. --mask {kind}:0.7")
        return MaskSpec(kind, s)
    if not os.path.isfile(text):
        raise FinetuneError(f"--mask {text!r}: no such file; pass a search's mask.pt, omp:S, random:S or none")
    return MaskSpec("file", path=text)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise FinetuneError(f"--seeds {text!r}: pass comma-separated integers, e.g. --seeds 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"--seeds {text!r}: pass distinct comma-separated integers, e.g. --seeds 1,2,3")
    return seeds


def task_names(args: FinetuneArguments) -> list[str]:
    if (args.task is None) == (args.tasks is None):
        raise FinetuneError("pass exactly one of --task NAME or --tasks NAME,NAME,... "
                            f"(known: {', '.join(KNOWN_TASKS)}, or local:DIR)")
    names = [args.task] if args.task is not None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    for name in names:  # fail before any training, not when a study reaches a typo
        if name not in KNOWN_TASKS and not name.startswith(LOCAL_PREFIX):
            raise TaskError(f"unknown task {name!r}; known: {', '.join(KNOWN_TASKS)}, or local:DIR")
    if len(set(names)) != len(names):
        raise FinetuneError(f"--tasks {args.tasks!r} names a task twice")
    return names


def data_dir_for(args: FinetuneArguments, task: str) -> str | None:
    """--data_dir DIR (every hub task) or task=DIR,task=DIR; local:DIR tasks carry their own."""
    if task.startswith(LOCAL_PREFIX) or not args.data_dir:
        return None
    if "=" not in args.data_dir:
        return args.data_dir
    pairs = dict(p.split("=", 1) for p in args.data_dir.split(",") if "=" in p)
    return pairs.get(task)


def validate(args: FinetuneArguments) -> None:
    for name in ("max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise FinetuneError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_train_epochs <= 0:
        raise FinetuneError(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    if args.max_steps is not None and args.max_steps < 1:
        raise FinetuneError(f"--max_steps must be at least 1 (or left out), got {args.max_steps}")
    if not 0.0 <= args.warmup_ratio < 1.0:
        raise FinetuneError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.dist_timeout <= 0:
        raise FinetuneError(f"--dist_timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.eval_steps < 0:
        raise FinetuneError(f"--eval_steps must be >= 0 (0: evaluate at the end only), got {args.eval_steps}")


def slug(task: str) -> str:
    """A directory name for a task: mnli, local-supersense_verb."""
    if task.startswith(LOCAL_PREFIX):
        task = "local-" + os.path.basename(os.path.normpath(task[len(LOCAL_PREFIX):]))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


# ----------------------------------------------------------------------- data


@dataclass
class TaskData:
    spec: TaskSpec
    train: object  # datasets.Dataset of raw examples (the full train split)
    evals: dict  # split -> (raw examples, tokenised features)
    _cache: tuple = (None, None)  # (subset seed or None, train features): tokenised once per subset

    def train_features(self, args: FinetuneArguments, tokenizer, seed: int):
        key = seed if args.train_subset is not None else None  # the subset depends on the seed
        if self._cache[1] is None or self._cache[0] != key:
            raw = _subset(self.train, args.train_subset, seed) if args.train_subset is not None else self.train
            self._cache = (key, tokenize_split(self.spec, raw, tokenizer, max_seq_length=args.max_seq_length,
                                               doc_stride=args.doc_stride, train=True))
        return self._cache[1]


def load_data(args: FinetuneArguments, name: str, tokenizer) -> TaskData:
    text_columns = tuple(c.strip() for c in args.text_columns.split(",")) if args.text_columns else None
    if args.tasks is not None and not name.startswith(LOCAL_PREFIX):
        text_columns = None  # a study may mix local and hub tasks: --text_columns is for the local ones
    spec, splits = load_task(name, data_dir=data_dir_for(args, name), text_columns=text_columns)
    if args.train_subset is not None:
        _subset(splits["train"], args.train_subset, 0)  # a bad N fails now, with the task's size in the message
    evals = {split: (splits[split], tokenize_split(spec, splits[split], tokenizer, max_seq_length=args.max_seq_length,
                                                   doc_stride=args.doc_stride, train=False))
             for split in spec.eval_splits}
    return TaskData(spec, splits["train"], evals)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_batches(features, collate, batch_size: int, seed: int):
    """Endless micro-batches of this rank's share, reshuffled every epoch (same order for a seed)."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(features, num_replicas=sharding.world_size(), rank=sharding.rank(),
                                 shuffle=True, seed=seed)
    loader = DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------- mask


def tamt_matrices(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules TAMT masks (as attach_masks picks them): where sparsity is counted."""
    regexes = [re.compile(p) for p in TAMT_PATTERNS]
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and any(r.search(n) for r in regexes)]


def fix_mask(model: nn.Module, mask: MaskSpec, mask_file: dict | None, mask_seed: int = 0) -> MaskSet | None:
    """Attach the fixed mask: frozen scores whose cut is the mask; pruned weights := 0."""
    if mask.kind == "dense":
        return None
    if mask.kind == "file":  # exactly the matrices the file covers (see mask_for_task)
        names = [n for n, _ in tamt_matrices(model) if export_name(model, n) in mask_file]
        masks = attach_masks(model, [f"^{re.escape(n)}$" for n in names], sparsity=0.0)
        file_masks = masks_for_model(mask_file, model, masks, mask.path)
        masks.fix_counts(file_masks)  # keep exactly the file's mask, whatever its per-matrix counts
        masks.init_scores("file", mask_file=file_masks)
    else:
        masks = attach_masks(model, TAMT_PATTERNS, sparsity=mask.sparsity)
        masks.init_scores("magnitude" if mask.kind == "omp" else "random", seed=mask_seed)
    for p in masks.scores:
        p.requires_grad_(False)
    # Before deepspeed.initialize, so that its fp32 master copies start from the zeros too.
    masks.zero_pruned_weights()
    return masks


def mask_for_task(args: FinetuneArguments, spec: TaskSpec, mask: MaskSpec, mask_file: dict | None) -> MaskSpec:
    """Check a mask file against weightless (meta-device) copies of the model, before anything
    is written: every entry must be one of the backbone's TAMT matrices, with its shape (else
    the file was made for another model).  Matrices the file does not cover stay dense (a QA
    model has no pooler; a hand-made mask may skip the embeddings).  The file's sparsity is
    counted over the matrices it masks in this task's model."""
    if mask.kind != "file":
        return mask
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(args.model_name_or_path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {args.model_name_or_path!r} ({str(e).strip().splitlines()[0]}): pass "
                         f"--model_name_or_path with a local model directory or a reachable hub name") from e
    with zero3_init(None), torch.device("meta"):
        backbone, model = AutoModel.from_config(config), task_model_class(head_of(spec)).from_config(config)
    maskable = {export_name(backbone, n): tuple(m.weight.shape) for n, m in tamt_matrices(backbone)}
    for key, keep in mask_file.items():
        if key not in maskable and key in dict(backbone.named_parameters()):
            raise MaskError(f"mask file {mask.path!r} has a mask for {key}, which TAMT does not mask (it masks the "
                            f"attention, feed-forward, pooler and word-embedding matrices): drop that entry")
        if key not in maskable:
            raise MaskError(f"mask file {mask.path!r} has a mask for {key}, which is not one of the model's "
                            f"{len(maskable)} masked matrices (such as {next(iter(maskable))}): it was made for "
                            f"another model; pass a mask from a search on this model")
        if tuple(keep.shape) != maskable[key]:
            raise MaskError(f"mask file {mask.path!r}: {key} has shape {tuple(keep.shape)} but the model's is "
                            f"{maskable[key]}: it was made for another model")
    keys = [export_name(model, n) for n, _ in tamt_matrices(model)]
    covered = [k for k in keys if k in mask_file]
    if not covered:
        raise MaskError(f"mask file {mask.path!r} masks none of the matrices of the {spec.name} model: pass a mask "
                        f"with entries such as {keys[0]}")
    zeros = sum(int((~mask_file[k].bool()).sum()) for k in covered)
    return dataclasses.replace(mask, sparsity=zeros / sum(mask_file[k].numel() for k in covered),
                               unmasked=tuple(k for k in keys if k not in mask_file))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Everything but the mask trains; biases and LayerNorms are exempt from weight decay
    (as in BERT's fine-tuning and HF's Trainer).  Masked weights decay like any weight:
    a pruned one is 0 and stays 0 under decoupled decay."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("mask_score"):
            continue
        (no_decay if name.endswith("bias") or id(p) in norms else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _local_fp32_master(weight: torch.Tensor, n: int) -> torch.Tensor | None:
    """This rank's slice of the optimizer's fp32 copy of a ZeRO-3 weight (None elsewhere)."""
    if not sharding.is_partitioned(weight) or not hasattr(weight, "_z3_optimizer"):
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    master = safe_get_local_fp32_param(weight)
    return None if master is None else master.reshape(-1)[:n]


@torch.no_grad()
def measure_sparsity(model: nn.Module, masks: MaskSet | None) -> dict:
    """Exact zeros of the masked matrices, counted in the trained weights (each rank its own
    shard, summed); and pruned entries that are not zero, in the weights and in the fp32
    master copy (0 when the mask held)."""
    if masks is not None:
        matrices = [(s.name, s.weight, s) for s in masks]
    else:
        matrices = [(n, m.weight, None) for n, m in tamt_matrices(model)]
    counts = torch.zeros(len(matrices), 3, dtype=torch.int64)  # zeros, pruned nonzero (weight), (fp32 master)
    for i, (_, weight, site) in enumerate(matrices):
        shard = sharding.local_shard(weight)
        counts[i, 0] = int((shard.values == 0).sum())
        if site is not None:
            pruned = ~site.local_keep()
            counts[i, 1] = int((shard.values[pruned] != 0).sum())
            master = _local_fp32_master(weight, shard.values.numel())
            if master is not None:
                counts[i, 2] = int((master[pruned] != 0).sum())
    sharding.all_reduce_(counts, enabled=sharding.shards_are_disjoint([w for _, w, _ in matrices]))
    numel = [w.ds_numel if sharding.is_partitioned(w) else w.numel() for _, w, _ in matrices]
    return {
        "measured": float(counts[:, 0].sum()) / sum(numel),
        "pruned_nonzero": int(counts[:, 1].sum()),
        "pruned_nonzero_fp32_master": int(counts[:, 2].sum()),
        "matrices": len(matrices),
        "numel": sum(numel),
        "per_matrix": {name: float(counts[i, 0]) / numel[i] for i, (name, _, _) in enumerate(matrices)},
    }


# ------------------------------------------------------------------ evaluation


def gather_to_rank0(rows: list) -> list | None:
    """Every rank's rows, concatenated in rank order on rank 0 (None elsewhere)."""
    parts = sharding.gather_objects(rows, dst=0)
    return [r for part in parts for r in part] if parts is not None else None


@torch.no_grad()
def predict(engine, features, collate, batch_size: int, squad: bool) -> list | None:
    """Model outputs for every feature, in order, on rank 0.

    Rank r takes the contiguous block r of the features, padded to the same length on
    every rank (with copies of feature 0): under ZeRO-3 each forward gathers parameters
    collectively, so all ranks must run the same number of forward passes.  Within its
    block a rank runs the features shortest first (less padding per batch) and puts the
    outputs back in feature order.
    """
    n, world, rank = len(features), sharding.world_size(), sharding.rank()
    per = math.ceil(n / world)
    mine = range(rank * per, min(n, (rank + 1) * per))
    lengths = [len(ids) for ids in features.select(mine)["input_ids"]]
    order = sorted(range(len(mine)), key=lengths.__getitem__)
    index = [mine[i] for i in order] + [0] * (per - len(mine))
    inputs = features.select_columns([c for c in MODEL_INPUTS if c in features.column_names]).select(index)
    rows = []
    engine.eval()
    for start in range(0, per, batch_size):
        batch = collate([inputs[i] for i in range(start, min(per, start + batch_size))])
        out = engine(**to_device(batch, engine.device))
        if squad:
            starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            rows += [(s, e) for s, e in zip(starts, ends)]
        else:
            rows += list(out.logits.float().cpu().numpy())
    engine.train()
    in_feature_order = [None] * len(mine)
    for row, i in zip(rows, order):  # the padding rows (beyond len(mine)) drop out here
        in_feature_order[i] = row
    return gather_to_rank0(in_feature_order)


def evaluate(engine, data: TaskData, collate, batch_size: int) -> dict[str, float]:
    """Metrics of every eval split on the full split, computed once (rank 0) and shared."""
    spec = data.spec
    metrics: dict[str, float] = {}
    for split, (examples, features) in data.evals.items():
        rows = predict(engine, features, collate, batch_size, spec.kind == "squad")
        if rows is None:
            continue  # not rank 0
        if spec.kind == "squad":
            answers = postprocess_predictions(examples, features, [s for s, _ in rows], [e for _, e in rows],
                                              version_2=spec.version_2)
            metrics.update(squad_metrics(answers, examples, version_2=spec.version_2))
        else:
            metrics.update(split_metrics(spec, split, np.stack(rows), examples["label"]))
    return sharding.broadcast_object(metrics)


# ---------------------------------------------------------------------- saving


@torch.no_grad()
def full_weight(p: nn.Parameter) -> torch.Tensor:
    """The full tensor of a parameter (collective): the optimizer's fp32 copy when it
    has one (bf16 training keeps the exact weights there), else the gathered parameter."""
    if sharding.is_partitioned(p) and p.requires_grad and hasattr(p, "_z3_optimizer"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).reshape(p.ds_shape).cpu()
    with sharding.gathered([p]):
        return p.data.detach().float().cpu().clone()


@torch.no_grad()
def save_model(model: nn.Module, masks: MaskSet | None, tokenizer, head: str, out_dir: str) -> None:
    """A plain transformers checkpoint: no mask_score, pruned weights exactly 0 (checked).
    Parameters are consolidated one at a time; rank 0 writes, into a temporary
    directory that replaces out_dir only when complete."""
    keep = masks.full_masks() if masks is not None else {}  # collective
    weight_of = {s.name + ".weight": s.name for s in masks} if masks is not None else {}
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("mask_score"):
            continue
        full = full_weight(p)
        if sharding.rank() != 0:
            continue
        if name in weight_of:
            pruned = ~keep[weight_of[name]]
            if (full[pruned] != 0).any():
                raise RuntimeError(f"{name}: {int((full[pruned] != 0).sum())} pruned weights are not zero")
            full = full * keep[weight_of[name]]  # a no-op, as just checked: the mask is in the weights
        state[name] = full
    if sharding.rank() == 0:
        with zero3_init(None):  # a plain, whole model: the layout save_pretrained writes
            plain = task_model_class(head).from_config(model.config)
        plain.load_state_dict(state, strict=True)  # every parameter, and no mask_score
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-model-")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    sharding.barrier()


# ------------------------------------------------------------------- training


def run_seed(args: FinetuneArguments, data: TaskData, seed: int, ds_config: dict, tokenizer, mask: MaskSpec,
             mask_file: dict | None, monitor: Monitor, model_dir: str | None) -> dict:
    """Fine-tune one seed from the pre-trained weights; its best / final dev metrics and sparsity."""
    from transformers import DataCollatorWithPadding

    spec = data.spec
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # same on every rank: the new head starts identical everywhere
    model = load_model_for(args, spec, ds_config)
    masks = fix_mask(model, mask, mask_file, args.mask_seed)

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
                  f"{eng.precision(ds_config)} | ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}")

    history, best, best_step, final = [], None, 0, None
    window = {"t": time.perf_counter(), "loss": 0.0, "n": 0, "tokens": 0}
    engine.train()
    diverged = NonFiniteGuard(device)
    for step in range(1, total + 1):
        for _ in range(args.gradient_accumulation_steps):
            batch = to_device(next(batches), device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer (and the schedule) at the accumulation boundary
            diverged.observe(loss, step)
            loss = float(loss.detach())
            window["loss"] += loss
            window["n"] += 1
            window["tokens"] += int(batch["attention_mask"].sum())
        monitor.step(loss=loss)

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

    sparsity = measure_sparsity(model, masks)
    if sparsity["pruned_nonzero"] or sparsity["pruned_nonzero_fp32_master"]:
        raise RuntimeError(f"the mask leaked: {sparsity['pruned_nonzero']} pruned weights are not zero")
    if model_dir is not None:
        save_model(model, masks, tokenizer, head_of(spec), model_dir)
    engine.destroy()  # releases ZeRO-3's hooks and buffers before the next seed builds its engine
    del engine, model, masks
    gc.collect()
    return {"seed": seed, "steps": total, "best_step": best_step, "best": best, "final": final,
            "history": history, "sparsity": sparsity, "train_time_s": time.perf_counter() - t0,
            **({"model_dir": model_dir} if model_dir else {})}


def head_of(spec: TaskSpec) -> str:
    return "question_answering" if spec.kind == "squad" else "classification"


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


def steps_for(args: FinetuneArguments, n_features: int) -> tuple[int, int]:
    """(optimizer steps per seed, per epoch): --num_train_epochs of this rank's share, capped by --max_steps."""
    micro = math.ceil(math.ceil(n_features / sharding.world_size()) / args.per_device_train_batch_size)
    per_epoch = math.ceil(micro / args.gradient_accumulation_steps)  # DistributedSampler pads the last share
    total = max(1, math.ceil(args.num_train_epochs * per_epoch))
    return (min(total, args.max_steps) if args.max_steps else total), per_epoch


def log_train(monitor: Monitor, step: int, tag: str, scheduler, window: dict) -> None:
    """Training loss averaged over the window and the ranks."""
    values = torch.tensor([window["loss"] / max(window["n"], 1), window["tokens"]], dtype=torch.float64)
    sharding.all_reduce_(values)
    elapsed = time.perf_counter() - window["t"]
    monitor.log(step, {
        f"{tag}/train/loss": float(values[0]) / sharding.world_size(),
        f"{tag}/train/learning_rate": scheduler.get_last_lr()[0] if scheduler is not None else float("nan"),
        f"{tag}/perf/tokens_per_s": float(values[1]) / elapsed,
        **{f"{tag}/perf/{k}": v for k, v in memory_mb().items()},
    })
    window.update(t=time.perf_counter(), loss=0.0, n=0, tokens=0)


def mask_label(mask: MaskSpec) -> str:
    if mask.kind == "dense":
        return "dense"
    if mask.kind == "file":
        dense = f"; {len(mask.unmasked)} matrices stay dense: {', '.join(mask.unmasked)}" if mask.unmasked else ""
        return f"mask {mask.path} (sparsity {mask.sparsity:.4f}{dense})"
    return f"{mask.kind} mask at sparsity {mask.sparsity}"


# --------------------------------------------------------------------- results


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


def parse_args(argv=None) -> FinetuneArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser((FinetuneArguments,)).parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli

    return run_cli(lambda: finetune(parse_args(argv)))


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
