"""Pre-training losses of any mask, on held-out text: KD loss against the dense model and,
where the checkpoint has a pre-trained MLM head, MLM loss and accuracy.

    load the model (partitioned by ZeRO-3) -> attach TAMT's masks -> engine (no optimizer)
    -> held-out blocks, streamed -> dense teacher's hidden states (once)
    -> for each mask: set it -> KD loss (and MLM loss / accuracy) -> JSON

Masks of the search, IMP and the baselines all go through the same code: a mask.pt
(exactly as written, whatever its per-matrix counts), omp:S, random:S (seeded), or none.
The measures are the search's own (`objectives.kd_loss_sum`, `teacher_hidden_states`,
`mlm_accuracy`, `data.corpus.build_validation_batches`): KD = mean over layers of mean
over real tokens of 1 - cos(h_masked, h_dense), on uncorrupted text; MLM on the same
blocks with the 80/10/10 corruption, the head's tied decoder reading the unmasked
embedding matrix (as in the search).  A model without a pre-trained MLM head (the
packaged all-MiniLM-L6-v2) reports KD only: a freshly initialised head measures nothing.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import torch

from tamt_ds import checkpoint, engine as eng, sharding
from tamt_ds.cli import check_at_least, parse_arguments
from tamt_ds.engine import to_device
from tamt_ds.data.corpus import CorpusArguments, build_validation_batches, default_validation_files
from tamt_ds.maskfile import masks_for_model, read_mask_file, save_mask_file
from tamt_ds.masking import TAMT_PATTERNS, MaskSet, attach_masks, parse_baseline
from tamt_ds.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path
from tamt_ds.objectives import kd_loss_sum, mlm_accuracy, teacher_hidden_states
from tamt_ds.pattern_baselines import BASELINE_KINDS, baseline_masks, parse_pattern_baseline
from tamt_ds.errors import InputError


@dataclass
class EvaluateMaskArguments:
    mask: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "one or more masks: a mask.pt (search, IMP, a file in the TAMT authors' layout), omp:S, "
                "random:S, a baseline of a sparsity pattern (omp:N:M, random:N:M, omp:structured:S, "
                "random:structured:S, head_importance:S; docs/patterns.md), or none (the dense model)"})
    output: list[str] | None = field(default=None, metadata={
        "help": "one JSON file per --mask (default: print only)"})
    save_mask: list[str] | None = field(default=None, metadata={
        "help": "write each evaluated mask as a mask.pt (one path per --mask; '-' to skip one), e.g. to keep "
                "an omp:S mask"})
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "hub name or local model directory"})
    mask_seed: int = field(default=0, metadata={"help": "seed of random:S masks"})
    eval_files: list[str] | None = field(default=None, metadata={
        "help": "held-out text files (.txt one document a line, .jsonl, .parquet, ...); default: the shipped "
                "validation sample"})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "or a hub dataset, streamed"})
    eval_dataset_config_name: str | None = None
    eval_split: str = field(default="validation", metadata={"help": "the hub dataset's held-out split"})
    text_column: str = "text"
    eval_blocks: int = field(default=64, metadata={"help": "held-out blocks (of --max_seq_length tokens)"})
    max_seq_length: int = 128
    per_device_eval_batch_size: int = 16
    mlm_probability: float = 0.15
    seed: int = field(default=42, metadata={"help": "order of the blocks over ranks and the MLM corruption"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (default: one for this machine)"})
    dist_timeout: float = field(default=eng.DEFAULT_DIST_TIMEOUT_S, metadata={
        "help": "seconds a dead or frozen peer goes unnoticed before the run stops (launchers/slurm/node.sh sets it)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


class EvaluateMaskError(InputError):
    pass


@dataclass(frozen=True)
class MaskChoice:
    text: str  # as given
    kind: str  # file | omp | random | head_importance | dense
    sparsity: float = 0.0
    path: str | None = None
    pattern: str | None = None  # a baseline of this sparsity pattern (pattern_baselines), built once as a mask file


def parse_mask(text: str) -> MaskChoice:
    if text.lower() in ("none", "dense"):
        return MaskChoice(text, "dense")
    of_pattern = parse_pattern_baseline(text)
    if of_pattern is not None:
        return MaskChoice(text, text.partition(":")[0], of_pattern[2], pattern=of_pattern[1])
    baseline = parse_baseline(text)
    if baseline is not None:
        return MaskChoice(text, *baseline)
    if not os.path.isfile(text):
        raise EvaluateMaskError(f"--mask {text!r}: no such file; pass a mask.pt, omp:S, random:S or none")
    return MaskChoice(text, "file", path=text)


def validate(args: EvaluateMaskArguments) -> list[MaskChoice]:
    choices = [parse_mask(m) for m in args.mask]
    for name in ("output", "save_mask"):
        given = getattr(args, name)
        if given is not None and len(given) != len(choices):
            raise EvaluateMaskError(f"--{name} names {len(given)} files for {len(choices)} masks: give one per --mask")
    check_at_least(args, 1, ("eval_blocks", "max_seq_length", "per_device_eval_batch_size", "dist_timeout"),
                   EvaluateMaskError)
    if not 0.0 < args.mlm_probability <= 1.0:
        raise EvaluateMaskError(f"--mlm_probability must be in (0, 1], got {args.mlm_probability}: "
                                f"pass e.g. --mlm_probability 0.15")
    return choices


def corpus_arguments(args: EvaluateMaskArguments) -> CorpusArguments:
    """The held-out text as the search's data pipeline reads it (streamed, packed into blocks)."""
    files = args.eval_files or (None if args.eval_dataset_name else default_validation_files())
    return CorpusArguments(train_files=files, validation_files=files, dataset_name=args.eval_dataset_name,
                           dataset_config_name=args.eval_dataset_config_name, validation_split=args.eval_split,
                           text_column=args.text_column, validation_blocks=args.eval_blocks,
                           max_seq_length=args.max_seq_length, mlm_probability=args.mlm_probability,
                           dataloader_num_workers=0)


# ------------------------------------------------------------------------- model


def checkpoint_keys(name_or_path: str) -> set[str]:
    """Tensor names stored in a checkpoint (safetensors or PyTorch), read without loading tensors."""
    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    keys: set[str] = set()
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        from safetensors import safe_open

        with safe_open(f, "pt") as sf:
            keys |= set(sf.keys())
    if not keys:
        for f in glob.glob(os.path.join(path, "pytorch_model*.bin")):
            keys |= set(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    return keys


def has_pretrained_mlm_head(name_or_path: str) -> bool:
    """True when the checkpoint stores MLM head weights (BERT / RoBERTa pre-training checkpoints
    do; sentence encoders such as all-MiniLM-L6-v2 do not)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from tamt_ds.models import zero3_init

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    with zero3_init(None), torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    prefix = model.base_model_prefix + "."
    head_modules = {n.split(".")[0] for n, _ in model.named_parameters() if not n.startswith(prefix)}
    return any(k.split(".")[0] in head_modules for k in checkpoint_keys(name_or_path))


def inference_engine(model, ds_config: dict):
    """deepspeed.initialize without an optimizer: ZeRO-3 partitioned inference (hooks gather
    each module's parameters for its forward)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config={k: v for k, v in ds_config.items() if not k.startswith("_")})
    return engine


@torch.no_grad()
def set_mask(masks: MaskSet, model, choice: MaskChoice, mask_file: dict | None, seed: int) -> None:
    """Make `choice` the masks' current mask (each rank writes its own score shards)."""
    if choice.kind == "file" or choice.pattern:
        file_masks = masks_for_model(mask_file, model, masks, choice.text)
        masks.fix_counts(file_masks)  # exactly the file's mask, whatever its per-matrix counts
        masks.init_scores("file", mask_file=file_masks)
    else:
        masks.fixed_k, masks.sparsity = None, choice.sparsity  # int(numel * S) per matrix, as OMP / random prune
        masks.init_scores("random" if choice.kind == "random" else "magnitude", seed=seed)


@torch.no_grad()
def measure(engine, masks: MaskSet, clean: list, teachers: list, corrupted: list | None, device) -> dict:
    """KD loss against the cached dense hidden states (and MLM loss / accuracy), over all ranks."""
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # kd summed over tokens, tokens, mlm loss, correct, predicted
    for batch, teacher in zip(clean, teachers):
        batch = to_device(batch, device)
        student = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
        sums[0] += kd_loss_sum(student.hidden_states, teacher, batch["attention_mask"])
        sums[1] += batch["attention_mask"].sum()
    for batch in corrupted or []:
        sums[2:] += torch.stack(mlm_accuracy(engine, to_device(batch, device))).double()
    sums = sharding.all_reduce_(sums).cpu()
    out = {"kd_loss": float(sums[0] / max(sums[1], 1)), "tokens": int(sums[1]),
           "mlm_loss": None, "mlm_accuracy": None}
    if corrupted is not None:
        out["mlm_loss"] = float(sums[2] / max(sums[4], 1))
        out["mlm_accuracy"] = float(sums[3] / max(sums[4], 1))
    out["sparsity"] = masks.stats(update_last=False)["sparsity"]
    return out


def evaluate_masks(args: EvaluateMaskArguments) -> list[dict]:
    choices = validate(args)
    files = {c.text: read_mask_file(c.path) for c in choices if c.kind == "file"}
    eng.init_distributed(args.dist_timeout)
    for c in choices:  # same-pattern baselines: built once, on rank 0, as the mask files they are
        if c.pattern:
            built = baseline_masks(args.model_name_or_path, c.pattern, c.sparsity, BASELINE_KINDS[c.kind],
                                   args.mask_seed) if sharding.rank() == 0 else None
            files[c.text] = sharding.broadcast_object(built)
    ds_config = eng.load_ds_config(args.deepspeed, micro_batch=args.per_device_eval_batch_size, grad_accum=1,
                                   grad_clip=1.0)
    with_head = has_pretrained_mlm_head(args.model_name_or_path)
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_model(args.model_name_or_path, with_mlm_head=with_head, ds_config=ds_config)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = attach_masks(model, TAMT_PATTERNS, sparsity=0.0)
    for p in masks.scores:
        p.requires_grad_(False)
    for choice in choices:  # every mask file checked against the model before anything is computed
        if choice.text in files:
            masks_for_model(files[choice.text], model, masks, choice.text)
    engine = inference_engine(model, ds_config)
    engine.eval()
    device = engine.device
    data = corpus_arguments(args)
    rank, world = sharding.rank(), sharding.world_size()
    clean = build_validation_batches(data, tokenizer, batch_size=args.per_device_eval_batch_size, rank=rank,
                                     world_size=world, seed=args.seed, mlm=False)
    corrupted = build_validation_batches(data, tokenizer, batch_size=args.per_device_eval_batch_size, rank=rank,
                                         world_size=world, seed=args.seed, mlm=True) if with_head else None
    if not clean:
        raise EvaluateMaskError("no held-out blocks: pass --eval_files with text, or a larger --eval_blocks")
    if rank == 0:
        print(f"evaluate_mask | world size {world} | {eng.precision_line(ds_config)}", flush=True)
    teachers = [teacher_hidden_states(engine, masks, to_device(b, device)) for b in clean]  # the dense model, once

    results = []
    for i, choice in enumerate(choices):
        set_mask(masks, model, choice, files.get(choice.text), args.mask_seed)
        # ZeRO-3 may still hold gathered copies of parameters prefetched by the last forward,
        # made before the scores changed: release them so the forward sees the new mask.
        engine.empty_partition_cache()
        scores = measure(engine, masks, clean, teachers, corrupted, device)
        result = {"mask": choice.text, "mask_kind": choice.kind, "mask_seed": args.mask_seed
                  if choice.kind in ("random", "head_importance") else None, "sparsity_pattern": choice.pattern,
                  "model": args.model_name_or_path, **scores,
                  "mlm_head": "pre-trained" if with_head else None,
                  "eval": {"files": data.validation_files, "dataset": args.eval_dataset_name,
                           "split": args.eval_split if args.eval_dataset_name else None,
                           "blocks": args.eval_blocks, "max_seq_length": args.max_seq_length, "seed": args.seed},
                  "world_size": world, "precision": str(eng.precision(ds_config)).removeprefix("torch.")}
        if args.save_mask and args.save_mask[i] != "-":
            full = masks.full_masks()  # collective
            if rank == 0:
                save_mask_file(full, model, args.save_mask[i])
            result["mask_file"] = args.save_mask[i]
        if rank == 0:
            if args.output:
                checkpoint.atomic_write_text(args.output[i], json.dumps(result, indent=2) + "\n")
            mlm = (f", MLM loss {result['mlm_loss']:.4f}, MLM accuracy {result['mlm_accuracy']:.4f}"
                   if with_head else " (no pre-trained MLM head: KD only)")
            print(f"{choice.text}: sparsity {result['sparsity']:.4f}, KD loss {result['kd_loss']:.5f}{mlm} "
                  f"on {result['tokens']} held-out tokens", flush=True)
        results.append(result)
    sharding.barrier()
    return results


def parse_args(argv=None) -> EvaluateMaskArguments:
    (args,) = parse_arguments((EvaluateMaskArguments,), argv)
    return args


def main(argv=None) -> int:
    from tamt_ds import preflight

    return preflight.run_entry("evaluate_mask", lambda: evaluate_masks(parse_args(argv)), argv)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
