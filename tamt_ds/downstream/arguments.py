"""Fine-tuning arguments (`launchers/finetune.py --help`) and their checks, made before
anything is loaded or written."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tamt_ds import engine as eng
from tamt_ds.cli import check_at_least, parse_arguments
from tamt_ds.downstream.tasks import KNOWN_TASKS, LOCAL_PREFIX, TaskError
from tamt_ds.errors import InputError
from tamt_ds.masking import parse_baseline
from tamt_ds.models import DEFAULT_MODEL


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
        "help": "seconds a dead or frozen peer goes unnoticed before the run stops; a peer alive but stuck: "
                "60 s more (see docs/cluster.md)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


class FinetuneError(InputError):
    pass



@dataclass(frozen=True)
class MaskSpec:
    kind: str  # dense | omp | random | file
    sparsity: float | None = None  # omp / random: the target; file: set per task, over the matrices it covers
    path: str | None = None
    unmasked: tuple[str, ...] = ()  # file: the task model's TAMT matrices it has no mask for (they stay dense)


def parse_mask(text: str | None) -> MaskSpec:
    if text is None or text.lower() in ("", "none", "dense"):
        return MaskSpec("dense", 0.0)
    baseline = parse_baseline(text)
    if baseline is not None:
        return MaskSpec(*baseline)
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
    check_at_least(args, 1, ("max_seq_length", "doc_stride", "per_device_train_batch_size",
                             "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                             "train_subset"), FinetuneError)
    check_at_least(args, 0, ("learning_rate", "weight_decay", "max_grad_norm"), FinetuneError)
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


def check_zero_stage(mask: MaskSpec, ds_config: dict) -> None:
    """A fixed mask masks ZeRO-3's gradient partitions (or plain gradients without ZeRO);
    ZeRO stages 1 and 2 keep gradients in buffers of their own."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if mask.kind != "dense" and stage in (1, 2):
        raise FinetuneError(f"--mask needs ZeRO stage 3 (or no ZeRO), but {ds_config.get('_source', 'the config')} "
                            f"has stage {stage}: pass --deepspeed ds_configs/zero3_cpu.json or another stage-3 config")


def slug(task: str) -> str:
    """A directory name for a task: mnli, local-supersense_verb."""
    if task.startswith(LOCAL_PREFIX):
        task = "local-" + os.path.basename(os.path.normpath(task[len(LOCAL_PREFIX):]))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)



def mask_label(mask: MaskSpec) -> str:
    if mask.kind == "dense":
        return "dense"
    if mask.kind == "file":
        dense = f"; {len(mask.unmasked)} matrices stay dense: {', '.join(mask.unmasked)}" if mask.unmasked else ""
        return f"mask {mask.path} (sparsity {mask.sparsity:.4f}{dense})"
    return f"{mask.kind} mask at sparsity {mask.sparsity}"



def parse_args(argv=None) -> FinetuneArguments:
    (args,) = parse_arguments((FinetuneArguments,), argv)
    return args

