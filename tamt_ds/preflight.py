"""Pre-flight: everything that can be checked before a job runs, as each of its N ranks would see it.

    python launchers/search.py --preflight_world_size 64 [--gpu_memory_gb 80] [the job's arguments]

(and the same for imp.py, finetune.py, evaluate_mask.py).  One CPU process: no process group,
no weights, no GPU; the model from its config alone.  It prints one table and returns 0 when
the job would start and fit, or 2 with one line per problem, each naming the fix:

    arguments      parsed and checked by the entry point's own parse_args / validate
    DeepSpeed      the config as the job resolves it on a GPU node (precision, stage, offload)
    model          config (hub name, local dir or config:), the masked set, each rank's share of
                   every partitioned score and weight (ZeRO's layout, `zero_share`)
    corpus         sources readable, readers = ranks x workers, every reader's share non-empty,
                   validation blocks per rank, tokens per step, steps per epoch
    memory         the planner's per-rank parts (tamt_ds.plan) against --gpu_memory_gb; host per node
    disk           checkpoint bytes per rank and in all, times what --save_total_limit keeps, against
                   the free space of --output_dir, which must be writable
    resume         the newest complete checkpoint (search: checkpoint._choose; IMP: its last finished
                   level) reshards to N ranks

Every per-rank figure is a pure function of (rank, world_size), so N = 512 is checked here as is.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from tamt_ds.cli import PreflightArguments, split_preflight

GB = 1e9
CHECKPOINT_BYTES_PER_ENTRY = 12  # fp32 master + Adam m, v of each trainable entry (checkpoint._engine_state)


def requested(argv: list[str] | None = None) -> bool:
    """Whether the command line asks for the pre-flight (each entry point's main asks first)."""
    import sys

    from tamt_ds.cli import PREFLIGHT_FLAG

    return any(a.split("=", 1)[0] == PREFLIGHT_FLAG for a in (sys.argv[1:] if argv is None else argv))


def run_entry(entry: str, job, argv: list[str] | None = None) -> int:
    """An entry point's main: its pre-flight for N ranks when the command line asks for one
    (this one process, then exit), else the job itself under run_cli's exit codes."""
    from tamt_ds.errors import run_cli

    return main(entry, argv) if requested(argv) else run_cli(job)


# ---- ZeRO's layout, per rank ----------------------------------------------------------------
def zero_share(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, real elements) of rank `rank` in a parameter of `numel` elements: ZeRO-3 pads the
    flat parameter to a multiple of the world size and gives rank r [r*P, (r+1)*P), P = ceil(numel/N)
    (sharding.local_shard reads the same range off a live parameter)."""
    part = -(-numel // world_size)
    start = rank * part
    return start, max(0, min(part, numel - start))


def rank_elements(sizes: dict[str, int], rank: int, world_size: int, persistence_threshold: int = 0) -> int:
    """Elements of `sizes` held on `rank`: its share of each partitioned tensor, the whole of each
    tensor small enough for ZeRO to keep on every rank (param_persistence_threshold)."""
    return sum(n if n <= persistence_threshold else zero_share(n, rank, world_size)[1] for n in sizes.values())


def checkpoint_rank_bytes(trainable: dict[str, int], rank: int, world_size: int) -> int:
    """Bytes of rank<r>.pt's tensors: its real share of every trainable tensor, fp32 master and Adam
    moments (ZeRO's padding is not saved; the data position and RNG add a few kB)."""
    return sum(zero_share(n, rank, world_size)[1] for n in trainable.values()) * CHECKPOINT_BYTES_PER_ENTRY


def validation_share(n_blocks: int, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(real blocks, batches) of `rank` in a validation set of `n_blocks`, as validation.rank_batches deals it."""
    lo, hi = rank * n_blocks // world_size, (rank + 1) * n_blocks // world_size
    most = -(-n_blocks // world_size)
    return hi - lo, -(-most // batch_size)


# ---- the job, from any entry point's arguments ----------------------------------------------
@dataclass
class Job:
    entry: str
    model: str
    deepspeed: str | None
    micro_batch: int
    grad_accum: int
    grad_clip: float
    max_seq_length: int
    objective: str = "kd"             # for the planner: kd, mlm, mlm_kd
    trainable: str = "scores"         # scores (search) | all (IMP, fine-tuning) | none (evaluation)
    gradient_checkpointing: bool = False
    mask_patterns: list[str] | None = None
    corpus: object | None = None      # CorpusArguments
    trains_on_corpus: bool = True
    output_dir: str | None = None
    checkpoints_kept: int = 0         # search checkpoints alive at once at the peak (0: none written)
    levels: int = 0                   # IMP: one mask.pt (+ MLM head) per level
    saved_models: int = 0             # fine-tuning with --save_model: one model per task and seed
    outputs_bytes: float = 0.0        # set by check_model: what the run writes besides checkpoints
    outputs_note: str = ""
    resume: bool = False
    resume_level: str | None = None   # IMP --resume: the folder of the last finished level (None: none finished)
    mask: object | None = None        # fine-tuning: its --mask (MaskSpec)
    seed: int = 42
    start_problems: list[str] = field(default_factory=list)  # what the entry point's own start checks refuse


def job_of(entry: str, argv: list[str]) -> Job:
    """The entry point's own parsing and checks, then the settings the pre-flight needs."""
    if entry == "search":
        from tamt_ds import search as s

        args, data = s.parse_args(argv)
        s.validate(args, data)
        saves = math.ceil(args.max_steps / args.save_steps)
        # a save completes before the oldest beyond the limit is deleted: limit + 1 exist for a moment
        kept = saves if args.save_total_limit == 0 else min(saves, args.save_total_limit + 1)
        job = Job(entry, args.model_name_or_path, args.deepspeed, args.per_device_train_batch_size,
                   args.gradient_accumulation_steps, args.max_grad_norm, data.max_seq_length, args.objective, "scores",
                  args.gradient_checkpointing, args.mask_patterns, data, True, args.output_dir, kept,
                  resume=args.resume, seed=args.seed)
        job.start_problems = _refused(s.check_output_dir, args)
        return job
    if entry == "imp":
        from tamt_ds import imp as m

        args, data = m.parse_args(argv)
        levels = m.validate(args, data)
        job = Job(entry, args.model_name_or_path, args.deepspeed, args.per_device_train_batch_size,
                  args.gradient_accumulation_steps, args.max_grad_norm, data.max_seq_length, "mlm", "all",
                  corpus=data, output_dir=args.output_dir, levels=len(levels), resume=args.resume, seed=args.seed)
        done = m.finished_levels(args, levels) if args.resume else 0  # the job's own choice of where to go on
        job.resume_level = m.level_dir(args.output_dir, levels[done - 1]) if done else None
        job.start_problems = _refused(m.check_output_dir, args)
        return job
    if entry == "finetune":
        from tamt_ds.downstream import arguments as f

        args = f.parse_args(argv)
        f.validate(args)
        saved = len(f.task_names(args)) * len(f.parse_seeds(args.seeds)) if getattr(args, "save_model", False) else 0
        return Job(entry, args.model_name_or_path, args.deepspeed, args.per_device_train_batch_size,
                   args.gradient_accumulation_steps, args.max_grad_norm, args.max_seq_length, "kd", "all",
                   trains_on_corpus=False, output_dir=args.output_dir, saved_models=saved, mask=f.parse_mask(args.mask))
    if entry == "evaluate_mask":
        from tamt_ds import evaluate_mask as e

        args = e.parse_args(argv)
        e.validate(args)
        out = next((os.path.dirname(p) or "." for p in (args.output or []) + (args.save_mask or []) if p != "-"), None)
        return Job(entry, args.model_name_or_path, args.deepspeed, args.per_device_eval_batch_size, 1, 1.0,
                   args.max_seq_length, "kd", "none", corpus=e.corpus_arguments(args), trains_on_corpus=False,
                   output_dir=out, seed=args.seed)
    raise ValueError(f"no pre-flight for entry point {entry!r}")


def _refused(check, *args) -> list[str]:
    from tamt_ds.errors import InputError

    try:
        check(*args)
    except InputError as e:
        return [str(e)]
    return []


# ---- the report -----------------------------------------------------------------------------
@dataclass
class Report:
    world_size: int
    rows: list[tuple[str, str, str]] = field(default_factory=list)   # (section, item, value)
    problems: list[str] = field(default_factory=list)                # each one line naming the fix: exit 2
    warnings: list[str] = field(default_factory=list)

    def add(self, section: str, item: str, value: str) -> None:
        self.rows.append((section, item, value))

    def render(self) -> str:
        width = max(len(i) for _, i, _ in self.rows) if self.rows else 10
        lines, last = [], None
        for section, item, value in self.rows:
            if section != last:
                lines.append(f"-- {section}")
                last = section
            lines.append(f"   {item:<{width}}  {value}")
        lines.append(f"pre-flight at {self.world_size} ranks: "
                     + (f"{len(self.problems)} problem(s), the job would not start or fit" if self.problems
                        else "the job would start and fit"))
        return "\n".join(lines)


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.3f} GB"


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f}M"


# ---- the checks -----------------------------------------------------------------------------
def check_deepspeed(job: Job, report: Report) -> dict:
    from tamt_ds import engine
    from tamt_ds.plan import _default_config

    # The job's own default depends on the device it finds; its ranks run on GPUs: bf16 there
    # (Ampere on; pass --deepspeed ds_configs/zero3_fp16.json for older GPUs).
    path = job.deepspeed or _default_config("gpu")
    cfg = engine.load_ds_config(path, micro_batch=job.micro_batch, grad_accum=job.grad_accum,
                                grad_clip=job.grad_clip, check_this_device=False)
    zero = cfg.get("zero_optimization", {})
    precision = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"
    offload = [k.split("_", 1)[1] for k in ("offload_param", "offload_optimizer")
               if str((zero.get(k) or {}).get("device", "none")) == "cpu"]
    report.add("deepspeed", "config", cfg["_source"] + ("" if job.deepspeed else " (the default on a bf16 GPU)"))
    report.add("deepspeed", "precision / stage / offload",
               f"{precision} / ZeRO stage {zero.get('stage', 0)} / {', '.join(offload) or 'none'}")
    report.add("deepspeed", "micro batch x accumulation", f"{job.micro_batch} x {job.grad_accum}")
    if job.entry == "search" and zero.get("stage") != 3:
        report.problems.append(f"{path} has ZeRO stage {zero.get('stage', 0)}: search checkpoints need stage 3, "
                               f"pass --deepspeed {engine.CONFIG_DIR / 'zero3_bf16.json'} or another zero3_*.json")
    if job.entry == "finetune":
        from tamt_ds.downstream.arguments import check_zero_stage

        report.problems.extend(_refused(check_zero_stage, job.mask, cfg))  # a --mask needs stage 3 (or none)
    return cfg


def check_model(job: Job, report: Report, cfg: dict) -> dict[str, dict[str, int]]:
    """The model's tensors from its config, the masked set and each rank's share."""
    from tamt_ds.models import RANDOM_PREFIX
    from tamt_ds.plan import Shape, ZeroSettings, _model_shape, masked_tensors, parameter_tensors

    shape: Shape = _model_shape(job.model)
    with_head = "mlm" in job.objective
    tensors = parameter_tensors(shape, pooler=True, mlm_head=with_head)
    masked = masked_tensors(tensors, job.mask_patterns)  # None: TAMT's set, as every entry point masks
    scores = {n[: -len(".weight")] + ".score": k for n, k in masked.items()}
    head = {n: k for n, k in tensors.items() if n.startswith("head.")}
    trainable = {"search": {**scores, **head}, "imp": tensors, "finetune": tensors}.get(job.entry, {})
    kind = "random weights, published shape" if job.model.startswith(RANDOM_PREFIX) else "config.json"
    report.add("model", "model", f"{job.model} ({kind}): {shape.layers} layers, hidden {shape.hidden}, "
                                 f"vocab {shape.vocab}, stored {shape.stored_bytes} B per weight")
    report.add("model", "parameters / masked / trainable",
               f"{_millions(sum(tensors.values()))} / {_millions(sum(masked.values()))} in {len(masked)} matrices / "
               f"{_millions(sum(trainable.values()))}")
    threshold = ZeroSettings.from_ds_config(cfg).param_persistence_threshold
    n = report.world_size
    for label, sizes in (("weights", tensors), ("scores", scores)):
        if not sizes:
            continue
        per_rank = [rank_elements(sizes, r, n, threshold) for r in range(n)]
        lo, hi = min(per_rank), max(per_rank)
        report.add("model", f"{label} per rank", f"rank 0: {_millions(per_rank[0])}, rank {n - 1}: "
                   f"{_millions(per_rank[-1])} (min {_millions(lo)}, max {_millions(hi)}; "
                   f"tensors <= {threshold} elements whole on every rank)")
        empty = [name for name, k in sizes.items() if k > threshold and zero_share(k, n - 1, n)[1] == 0]
        if empty:
            report.add("model", f"{label} padding only", f"{len(empty)} tensors leave rank {n - 1} padding only "
                                                         f"(fewer elements than ranks x ceil(numel / ranks))")
    if job.entry == "search":
        job.outputs_bytes = sum(masked.values()) + sum(tensors.values()) * shape.stored_bytes
        job.outputs_note = "mask.pt + pruned_model/"
    elif job.levels:
        job.outputs_bytes = job.levels * (sum(masked.values()) + 4 * sum(head.values()))
        job.outputs_note = f"{job.levels} levels of mask.pt + MLM head"
    elif job.saved_models:
        job.outputs_bytes = job.saved_models * sum(tensors.values()) * shape.stored_bytes
        job.outputs_note = f"{job.saved_models} saved models (--save_model)"
    return {"tensors": tensors, "masked": masked, "trainable": trainable}


def check_corpus(job: Job, report: Report) -> None:
    """Sources readable, one non-empty share per reader, validation blocks per rank, tokens per step."""
    if job.corpus is None:
        report.add("corpus", "corpus", "none (the job reads task data: checked when it loads)")
        return
    from tamt_ds.data import corpus as c
    from tamt_ds.data.sources import open_source, reader_share

    data, n = job.corpus, report.world_size
    if job.trains_on_corpus:
        workers = max(1, data.dataloader_num_workers)
        readers = n * workers
        specs, _ = c._train_sources(data)
        opened = []
        for spec in specs:
            try:
                opened.append(open_source(spec))
            except c.CorpusError as e:
                report.problems.append(str(e))
                return
        report.add("corpus", "readers", f"{readers} = {n} ranks x {workers} workers")
        try:
            c._check_hub_files(specs, opened, readers, n, data.allow_hub_strided)
        except c.CorpusError as e:
            report.problems.append(str(e))
        tokenizer = _tokenizer_of(job.model)
        tokens = 0.0
        for spec, ds in zip(specs, opened):
            docs, source_tokens, exact = _source_size(spec, ds, tokenizer)
            share = reader_share(ds.num_shards, 0, readers).mode
            label = os.path.basename(spec.label.rstrip("/")) or spec.label
            about = "" if exact else "~"
            report.add("corpus", f"source {label}", f"{ds.num_shards} shard(s), {about}{docs:,.0f} documents, "
                                                    f"~{source_tokens:,.0f} tokens; readers read {share}" if docs else
                       f"{ds.num_shards} shard(s), size unknown; readers read {share}")
            tokens = tokens + source_tokens if docs and tokens is not None else None
            if docs and share == "strided" and docs < readers:
                report.problems.append(
                    f"source {spec.label} holds {about}{docs:,.0f} documents for {readers} readers: readers from "
                    f"{int(docs)} on would get none; use more data, fewer ranks or --dataloader_num_workers 0")
        tokens_per_step = n * job.micro_batch * job.grad_accum * data.max_seq_length
        report.add("corpus", "tokens per step", f"{tokens_per_step:,} = {n} ranks x {job.micro_batch} x "
                                                 f"{job.grad_accum} accumulation x {data.max_seq_length}")
        if tokens:
            report.add("corpus", "steps per epoch", f"~{tokens / tokens_per_step:,.1f} (~{tokens:,.0f} tokens)")
            if tokens < readers * data.max_seq_length:
                report.problems.append(
                    f"corpus too short: ~{tokens:,.0f} tokens, fewer than one block of {data.max_seq_length} for each "
                    f"of the {readers} readers; use more data, a smaller --max_seq_length or fewer ranks / workers")
    blocks = data.validation_blocks
    if blocks > 0:
        try:
            mode, vspecs = c._validation_plan(data, c._train_sources(data)[0])
            for spec in vspecs:
                open_source(spec)
            report.add("corpus", "validation set", f"{mode}: " + ", ".join(
                os.path.basename(v.label.rstrip("/")) or v.label for v in vspecs))
        except c.CorpusError as e:
            report.problems.append(str(e))
        per_rank = [validation_share(blocks, r, n, job.micro_batch) for r in range(n)]
        real = [b for b, _ in per_rank]
        report.add("corpus", "validation blocks per rank", f"{min(real)}..{max(real)} of {blocks} "
                                                            f"({per_rank[0][1]} batch(es) per rank)")
        idle = sum(1 for b in real if b == 0)
        if idle:
            report.warnings.append(f"{idle} of {n} ranks get no real validation block (padding only: every rank "
                                   f"still evaluates in step); pass --validation_blocks {n} or more to use every rank")
    else:
        report.add("corpus", "validation blocks per rank", "none (--validation_blocks 0)")


def _tokenizer_of(model: str):
    from tamt_ds.models import DEFAULT_MODEL, RANDOM_PREFIX, load_tokenizer

    # config: models carry the packaged MiniLM tokenizer (models.build_random_model): nothing to build
    return load_tokenizer(DEFAULT_MODEL if model.startswith(RANDOM_PREFIX) else model)


def _source_size(spec, ds, tokenizer, sample_docs: int = 512) -> tuple[float | None, float, bool]:
    """(documents, tokens, whether the document count is exact) of one source, from its first
    documents: the count where the source knows it (parquet, hub), else its files' bytes over the
    bytes per document (uncompressed local files); (None, 0, False) where neither is known."""
    from tamt_ds.data.sources import column_texts, examples_per_shard, shard_dataset

    texts = []
    for batch in shard_dataset(ds, 0).iter(batch_size=sample_docs):
        texts = [t for t in column_texts(batch, spec.text_column) or [] if t and not t.isspace()]
        break
    if not texts:
        return None, 0.0, False
    tokens_per_doc = sum(len(i) for i in tokenizer(texts, add_special_tokens=False)["input_ids"]) / len(texts)
    sizes = examples_per_shard(spec, ds)
    if sizes:
        return float(sum(sizes)), tokens_per_doc * sum(sizes), True
    if spec.files and not any(f.endswith((".gz", ".zst", ".parquet")) for f in spec.files):
        bytes_per_doc = sum(len(t.encode()) + 1 for t in texts) / len(texts)  # + its separator
        docs = sum(os.path.getsize(f) for f in spec.files) / bytes_per_doc
        return docs, docs * tokens_per_doc, False
    return None, 0.0, False


def check_memory(job: Job, report: Report, preflight: PreflightArguments) -> None:
    from tamt_ds.plan import CUDA_CONTEXT_GB, ALLOCATOR_SLACK, PlanInput, estimate

    n = report.world_size
    inp = PlanInput(model=job.model, world_size=n, deepspeed=job.deepspeed, per_device_train_batch_size=job.micro_batch,
                    max_seq_length=job.max_seq_length, objective=job.objective,
                    trainable="all" if job.trainable == "all" else "scores",
                    gradient_checkpointing=job.gradient_checkpointing, device="gpu",
                    gpu_memory_gb=preflight.gpu_memory_gb)
    plan = estimate(inp)
    if job.trainable == "none":  # evaluation: the frozen weights, the forward's buffers; no optimizer
        keep = {"frozen weights", "activations", "gather buffers", "masked weights"}
        parts = [p for p in plan.parts if p.name in keep]
        peak = sum(p.gb for p in parts if p.where == "device")
        usable = (preflight.gpu_memory_gb - CUDA_CONTEXT_GB) / ALLOCATOR_SLACK
        fits, fix = peak <= usable, "use more ranks or a smaller --per_device_eval_batch_size"
    else:
        parts, peak, fits = plan.parts, plan.process_per_rank_gb, plan.fits
        usable = (preflight.gpu_memory_gb - CUDA_CONTEXT_GB) / ALLOCATOR_SLACK
        fix = plan.alternatives[0].split(":")[0] if plan.alternatives else \
            "use more ranks or a smaller --per_device_train_batch_size"
        fix = f"pass {fix}" if plan.alternatives else fix
    for p in parts:
        report.add("memory per rank", p.name, f"{p.gb:8.3f} GB  {p.kind:<10} {p.where}")
    report.add("memory per rank", "GPU peak", f"{peak:8.3f} GB of {usable:.1f} GB usable "
                                              f"({preflight.gpu_memory_gb:g} GB GPU, --gpu_memory_gb)")
    if not fits:
        report.problems.append(f"{peak:.1f} GB per rank does not fit {usable:.1f} GB usable of a "
                               f"{preflight.gpu_memory_gb:g} GB GPU at {n} ranks: {fix}")
    # Host memory of one node: every rank's offloaded parts and host copies, plus rank 0's whole-model
    # phases (the checkpoint read at load, the export) on the node it runs on.
    ranks = min(preflight.ranks_per_node, n)
    host = lambda kind: sum(p.gb for p in parts if p.where == "host" and p.kind == kind)  # noqa: E731
    node = max(ranks * host("persistent") + host("load"), ranks * (host("persistent") + host("checkpoint")),
               ranks * host("persistent") + host("export"))
    report.add("memory per node", "host (load / checkpoint / export)",
               f"{node:8.3f} GB for {ranks} ranks per node (--ranks_per_node)"
               + (f" of {preflight.host_memory_gb:g} GB (--host_memory_gb)" if preflight.host_memory_gb else ""))
    if preflight.host_memory_gb is not None and node > preflight.host_memory_gb:
        report.problems.append(f"{node:.1f} GB of host memory per node does not fit {preflight.host_memory_gb:g} GB: "
                               f"use fewer ranks per node or a config without offload")


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_disk(job: Job, report: Report, model: dict) -> None:
    if job.output_dir is None:
        report.add("disk", "output", "none written (no --output / --save_mask)")
        return
    n, where = report.world_size, _existing_ancestor(job.output_dir)
    try:
        if not os.path.isdir(where):
            raise NotADirectoryError(f"{where} is not a directory")
        fd, probe = tempfile.mkstemp(dir=where, prefix=".tamt-preflight-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        report.problems.append(f"--output_dir {job.output_dir} is not writable ({e.strerror or e}): pass an "
                               f"--output_dir on a filesystem this user can write, shared by every node")
        return
    need = job.outputs_bytes
    if job.checkpoints_kept:
        trainable = model["trainable"]
        per_rank = [checkpoint_rank_bytes(trainable, r, n) for r in range(n)]
        one = sum(per_rank)
        report.add("disk", "checkpoint per rank", f"rank 0: {_gb(per_rank[0])}, rank {n - 1}: {_gb(per_rank[-1])} "
                                                 f"({CHECKPOINT_BYTES_PER_ENTRY} B per trainable entry)")
        report.add("disk", "checkpoints", f"{_gb(one)} each x {job.checkpoints_kept} alive at once "
                                          f"(--save_total_limit, + the one being written) = {_gb(one * job.checkpoints_kept)}")
        need += one * job.checkpoints_kept
    if job.outputs_bytes:
        report.add("disk", "outputs", f"{_gb(job.outputs_bytes)} ({job.outputs_note})")
    free = free_bytes(where)
    report.add("disk", "needed / free", f"{_gb(need)} / {_gb(free)} free at {where}")
    if need > free:
        report.problems.append(f"--output_dir {job.output_dir} has {_gb(free)} free, the run writes {_gb(need)}: "
                               f"free space there, pass --save_total_limit 1, or another --output_dir")


def check_resume(job: Job, report: Report, model: dict) -> None:
    """The newest complete checkpoint, and whether every one of the N ranks' ranges is covered by
    the pieces it holds (checkpoint.load reads any world size's pieces by offset)."""
    if not job.resume:
        return
    if job.entry == "imp":
        check_imp_resume(job, report, model)
        return
    if job.entry != "search":
        report.add("resume", "resume", f"{job.entry} resumes after its last finished run: not checked here")
        return
    import torch

    from tamt_ds import checkpoint

    root = os.path.join(job.output_dir, "checkpoints")
    tag, notes = checkpoint._choose(root)
    report.warnings.extend(notes)
    if tag is None:
        report.add("resume", "newest checkpoint", f"none in {root}: the search starts at step 0")
        return
    with open(os.path.join(root, tag, checkpoint.COMPLETE)) as f:
        found = checkpoint.Found(tag, os.path.join(root, tag), json.load(f))
    if found.meta["model"]["name"] != job.model:
        report.problems.append(f"checkpoint {found.folder} was made from model {found.meta['model']['name']!r}: resume "
                               f"with --model_name_or_path {found.meta['model']['name']}, or use another --output_dir")
        return
    old = found.world_size
    pieces: dict[str, list[tuple[int, int]]] = {}
    numel: dict[str, int] = {}
    for r in range(old):
        saved = torch.load(os.path.join(found.folder, f"rank{r}.pt"), map_location="cpu", mmap=True, weights_only=False)
        for name, entry in saved["params"].items():
            pieces.setdefault(name, []).append((entry["offset"], entry["fp32"].numel()))
            numel[name] = entry["numel"]
    # The model's names carry its class's prefix (bert. with an MLM head): the tensors' sizes are compared
    want = sorted(model["trainable"].values())
    if sorted(numel.values()) != want:
        report.problems.append(f"checkpoint {found.folder} trains {len(numel)} tensors of {sum(numel.values()):,} "
                               f"entries, this run {len(want)} of {sum(want):,}: resume with the same --objective "
                               f"and --mask_patterns, or use another --output_dir")
        return
    n, gaps = report.world_size, []
    for name, size in numel.items():
        covered = _covered(pieces[name])
        for r in range(n):
            lo, real = zero_share(size, r, n)
            if real and not _contains(covered, lo, lo + real):
                gaps.append((name, r))
    report.add("resume", "newest checkpoint", f"{found.folder}: step {found.step}, saved on {old} rank(s)")
    if gaps:
        name, r = gaps[0]
        report.problems.append(f"checkpoint {found.folder} misses part of {name} (rank {r} of {n}): it cannot be "
                               f"resharded; pass --overwrite_output_dir instead of --resume to start over")
    else:
        report.add("resume", f"reshards to {n} ranks", f"yes: every rank's range of all {len(numel)} trainable "
                                                       f"tensors is in the saved pieces")


def check_imp_resume(job: Job, report: Report, model: dict) -> None:
    """IMP goes on after its last finished level (imp.finished_levels: mask.pt written last) from
    that level's mask.pt and MLM head, full tensors every rank takes its share of at load, and
    every saved rank's data position, re-dealt to the N ranks' readers."""
    import torch

    from tamt_ds.imp import DATA_POSITIONS, read_data_positions
    from tamt_ds.maskfile import read_mask_file

    folder = job.resume_level
    if folder is None:
        report.add("resume", "newest checkpoint", f"no finished level in {job.output_dir}: IMP starts at round 1")
        return
    heads = {n: k for n, k in model["tensors"].items() if n.startswith("head.")}
    try:
        masks = read_mask_file(os.path.join(folder, "mask.pt"))
        head = torch.load(os.path.join(folder, "mlm_head.pt"), map_location="cpu", weights_only=True)
        positions = read_data_positions(folder)
    except (OSError, RuntimeError, ValueError) as e:
        report.problems.append(f"level {folder} cannot be read ({str(e).splitlines()[0]}): delete its mask.pt to redo "
                               f"that level, or pass --overwrite_output_dir instead of --resume to start over")
        return
    # The model's names carry its class's prefix: the tensors' sizes are compared (as for the search)
    theirs = (sorted(m.numel() for m in masks.values()), sum(t.numel() for t in head.values()))
    ours = (sorted(model["masked"].values()), sum(heads.values()))
    report.add("resume", "newest checkpoint", f"{folder}: level {os.path.basename(folder)}, saved on "
                                              f"{len(positions)} rank(s)")
    if theirs != ours:
        report.problems.append(f"level {folder} holds masks of {len(theirs[0])} matrices ({sum(theirs[0]):,} entries) and "
                               f"an MLM head of {theirs[1]:,}, this model {len(ours[0])} ({sum(ours[0]):,}) and "
                               f"{ours[1]:,}: resume with the model it was made from, or use another --output_dir")
    elif not positions:
        report.problems.append(f"level {folder} has no data positions ({DATA_POSITIONS}): delete its mask.pt to "
                               f"redo that level, or pass --overwrite_output_dir instead of --resume to start over")
    else:
        report.add("resume", f"reshards to {report.world_size} ranks",
                   f"yes: mask.pt and mlm_head.pt hold full tensors, and the {len(positions)} saved data positions "
                   f"are re-dealt to the {report.world_size} ranks' readers")


def _covered(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans = []
    for lo, length in sorted(pieces):
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], lo + length))
        else:
            spans.append((lo, lo + length))
    return spans


def _contains(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a <= lo and hi <= b for a, b in spans)


# ---- entry ----------------------------------------------------------------------------------
def preflight(entry: str, argv: list[str] | None = None) -> Report:
    options, job_argv = split_preflight(argv)
    job = job_of(entry, job_argv)
    report = Report(options.preflight_world_size)
    report.add("job", "entry point", f"{entry}, {report.world_size} ranks")
    report.problems.extend(job.start_problems)
    cfg = check_deepspeed(job, report)
    model = check_model(job, report, cfg)
    check_corpus(job, report)
    check_memory(job, report, options)
    check_disk(job, report, model)
    check_resume(job, report, model)
    return report


def main(entry: str, argv: list[str] | None = None) -> int:
    """Print the table; 0 if the job would start and fit, 2 with one line per problem."""
    import sys

    from tamt_ds.errors import run_cli

    result = {}

    def run():
        result["report"] = preflight(entry, argv)

    code = run_cli(run)
    if code:
        return code
    report = result["report"]
    print(report.render(), flush=True)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in report.problems:
        print(f"error: {p}", file=sys.stderr)
    sys.stderr.flush()
    return 2 if report.problems else 0
