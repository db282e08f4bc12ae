"""TAMT mask search: learn a binary mask over frozen pre-trained weights, top to bottom.

    set up ranks -> load model (partitioned by ZeRO-3) -> attach scores -> init scores
    -> engine -> stream blocks -> [loss, backward, step, reset thresholds, log, eval, save]
    -> consolidate and export mask.pt + pruned_model/
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from tamt_ds import checkpoint, engine as eng, guards, sharding, zero
from tamt_ds.cli import check_at_least, parse_arguments
from tamt_ds.engine import to_device
from tamt_ds.data.corpus import CorpusArguments, build_block_loader, build_validation_batches, with_default_corpus
from tamt_ds.errors import InputError
from tamt_ds.export import export_mask_snapshot, export_search_outputs
from tamt_ds.host_memory import release_freed_memory_for
from tamt_ds.maskfile import read_mask_file
from tamt_ds.masking import TAMT_PATTERNS, check_settings
from tamt_ds.mfu import SearchMFU
from tamt_ds.models import DEFAULT_MODEL, enable_gradient_checkpointing, load_model, load_tokenizer, random_weights_note
from tamt_ds.monitor import Monitor, memory_mb
from tamt_ds.patterns import check_resume_pattern, parse_pattern, prepare_pattern_search
from tamt_ds.objectives import OBJECTIVES, compute_loss, kd_loss_sum, mlm_accuracy, teacher_hidden_states
from tamt_ds.search_cost import CostMeter, write_cost


SEARCH_MAX_SEQ_LENGTH = 32  # tokens per block of the default search (CorpusArguments' default is 64)


@dataclass
class SearchArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": "hub name, local model directory, or config:NAME (published shape, random weights: "
                "config:bert-base-uncased, config:bert-large-uncased, config:roberta-base, config:roberta-large)"})
    objective: str = field(default="kd", metadata={"help": "mlm, kd or mlm_kd"})
    sparsity: float = field(default=0.7, metadata={"help": "fraction of masked weights pruned, in [0, 1)"})
    mask_init: str = field(default="magnitude", metadata={
        "help": "magnitude, random, or a mask file path: the search starts from exactly that mask, whose pruned "
                "counts must be the ones --sparsity prunes (per matrix, or in all with --threshold_scope global); "
                "a file of another sparsity is refused"})
    sparsity_pattern: str = field(default="unstructured", metadata={
        "help": "unstructured, N:M (e.g. 2:4: N kept of every M weights along the input dimension; sparsity "
                "1 - N/M, --sparsity unused) or structured (attention heads and FFN neurons; --sparsity: the "
                "fraction of their weights removed); see docs/patterns.md"})
    mask_patterns: list[str] = field(default_factory=lambda: list(TAMT_PATTERNS),
                                     metadata={"help": "regexes of module names to mask"})
    threshold_scope: str = field(default="per_matrix", metadata={"help": "per_matrix (TAMT) or global"})
    threshold_reset_steps: int = field(default=10, metadata={"help": "reset tau to the k-th score every N steps"})
    # Defaults: the embedded run, sized to its 10-minute budget on 2 CPU cores: 500 steps of 64
    # blocks x 32 tokens (SEARCH_MAX_SEQ_LENGTH), 6.5 min in bf16 (270 in fp32 took 8.7 min; the
    # 500-step mask's held-out KD loss is 11-12% lower than 270's).  A short search needs a larger
    # step than the paper's 2e-5 over 17k steps for scores to cross tau0 = 0.01; 5e-4 over 270
    # steps beat 1e-3 over 120 and 7e-4 over 270 on held-out KD loss; short blocks (more
    # block starts per token) served short held-out text best.  Measured in docs/benchmarks.md.
    # The warm-up keeps Adam's first, sign-sized steps from flipping masks on noise.
    per_device_train_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_steps: int = 500
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in backward (less memory, ~1/3 more compute); same masks"})
    seed: int = 42
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (default: one for this machine)"})
    output_dir: str = "outputs/search"
    overwrite_output_dir: bool = False
    resume: bool = field(default=False, metadata={"help": "continue from the latest complete checkpoint"})
    save_steps: int = 100
    save_total_limit: int = field(default=2, metadata={
        "help": "keep the newest N checkpoints; older ones are deleted once a newer one is complete (0: keep all)"})
    logging_steps: int = 10
    eval_steps: int = 100
    mask_snapshot_steps: list[int] = field(default_factory=list, metadata={
        "help": "also export the mask at these steps, e.g. 30 60 120: OUTPUT/snapshots/STEP/mask.pt (+ cost.json), "
                "each cut at exactly --sparsity from the live scores; the run itself is unchanged"})
    dist_timeout: float = field(default=eng.DEFAULT_DIST_TIMEOUT_S, metadata={
        "help": "seconds a dead or frozen peer goes unnoticed before the run stops; a peer alive but stuck: "
                "60 s more (see docs/cluster.md)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


def parse_args(argv=None) -> tuple[SearchArguments, CorpusArguments]:
    args, data = parse_arguments((SearchArguments, CorpusArguments), argv,
                                 defaults={"max_seq_length": SEARCH_MAX_SEQ_LENGTH})
    return args, with_default_corpus(data)


class SearchError(InputError):
    pass


def validate(args: SearchArguments, data: CorpusArguments) -> None:
    """Every setting that could stop the run later, checked before anything is loaded or written."""
    check_at_least(args, 1, ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                             "threshold_reset_steps", "logging_steps", "save_steps"), SearchError)
    check_at_least(args, 0, ("eval_steps", "warmup_steps", "learning_rate", "weight_decay", "max_grad_norm",
                             "save_total_limit"), SearchError)
    check_at_least(data, 1, ("max_seq_length",), SearchError)
    if "mlm" in args.objective and not 0.0 < data.mlm_probability <= 1.0:
        raise SearchError(f"--mlm_probability must be in (0, 1], got {data.mlm_probability}: pass e.g. --mlm_probability 0.15")
    if args.objective not in OBJECTIVES:
        raise SearchError(f"unknown --objective {args.objective!r}: use one of {', '.join(OBJECTIVES)}")
    check_settings(args.sparsity, args.threshold_scope)
    bad = [s for s in args.mask_snapshot_steps if not 1 <= s <= args.max_steps]
    if bad:
        raise SearchError(f"--mask_snapshot_steps {' '.join(map(str, bad))}: a snapshot step must be in "
                          f"1..--max_steps ({args.max_steps}); pass e.g. --mask_snapshot_steps {max(1, args.max_steps // 4)}")
    if parse_pattern(args.sparsity_pattern).kind != "unstructured" and args.threshold_scope != "per_matrix":
        raise SearchError(f"--threshold_scope {args.threshold_scope} is for unstructured masks: leave it out with "
                          f"--sparsity_pattern {args.sparsity_pattern}")
    if args.dist_timeout <= 0:
        raise SearchError(f"--dist_timeout must be a positive number of seconds, got {args.dist_timeout}")


def run_config(args: SearchArguments, data: CorpusArguments, ds_config: dict, model: dict,
               random_weights: dict | None = None) -> dict:
    return {"search": dataclasses.asdict(args), "data": dataclasses.asdict(data), "deepspeed": ds_config,
            "precision": ds_config["_precision"], "world_size": sharding.world_size(), "model": model,
            "random_weights": random_weights}


def check_output_dir(args: SearchArguments) -> None:
    """Refuse to mix two runs in one directory unless asked; nothing is written here."""
    holds_run = os.path.isdir(args.output_dir) and bool(os.listdir(args.output_dir))
    if holds_run and not (args.resume or args.overwrite_output_dir):
        raise SearchError(f"--output_dir {args.output_dir} already holds a run: pass --resume to continue it, "
                          f"--overwrite_output_dir to replace it, or another --output_dir")


def start_output_dir(args: SearchArguments, config: dict) -> None:
    """Called once everything loaded: only a run that can start touches the directory."""
    if sharding.rank() == 0:
        if args.overwrite_output_dir and not args.resume:
            for sub in ("checkpoints", "tensorboard", "pruned_model", "compact_model", "snapshots"):
                shutil.rmtree(os.path.join(args.output_dir, sub), ignore_errors=True)
            for f in ("metrics.jsonl", "mask.pt", "cost.json"):
                if os.path.exists(os.path.join(args.output_dir, f)):
                    os.remove(os.path.join(args.output_dir, f))
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoint.atomic_write_text(os.path.join(args.output_dir, "run_config.json"),
                                     json.dumps(config, indent=2, default=str))
    sharding.barrier()
    guards.check_shared_dir(args.output_dir)


@torch.no_grad()
def evaluate(model, masks, batches, device, objective: str) -> dict[str, float]:
    """KD loss (and MLM loss/accuracy with a head) of the current subnetwork on the fixed held-out set.
    The training run's RNG is left as it was: the search does not depend on --eval_steps."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # kd_sum, real tokens, mlm_loss_sum, mlm_correct, mlm_count
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        for batch in batches:
            batch = to_device(batch, device)
            teacher = teacher_hidden_states(model, masks, batch)
            with zero.same_step(model):  # as in a KD step: teacher, then student
                student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=True)
            sums[0] += kd_loss_sum(student.hidden_states, teacher, batch["attention_mask"])
            sums[1] += batch["attention_mask"].sum()
            if "mlm" in objective:
                sums[2:] += torch.stack(mlm_accuracy(model, batch)).double()
    zero.release_prefetched(model)
    model.train()
    sums = sharding.all_reduce_(sums).cpu()
    out = {"eval/kd_loss": float(sums[0] / max(sums[1], 1))}
    if "mlm" in objective:
        out["eval/mlm_loss"] = float(sums[2] / max(sums[4], 1))
        out["eval/mlm_accuracy"] = float(sums[3] / max(sums[4], 1))
    return out


def search(args: SearchArguments, data: CorpusArguments) -> dict:
    validate(args, data)
    release_freed_memory_for(args.model_name_or_path)  # large models: a CPU rank's resident set follows its use
    eng.init_distributed(args.dist_timeout)
    check_output_dir(args)  # after the group forms: a rank-local view of the directory may differ
    torch.manual_seed(args.seed)  # the same on every rank: one dropout stream, whatever the world size
    ds_config = eng.load_ds_config(args.deepspeed, micro_batch=args.per_device_train_batch_size,
                                   grad_accum=args.gradient_accumulation_steps, grad_clip=args.max_grad_norm)
    mask_file = read_mask_file(args.mask_init) if args.mask_init not in ("magnitude", "random") else None

    # Model: frozen weights, partitioned at load under ZeRO-3; one score next to each masked
    # weight, initialised; the MLM head (if any) trains with the scores.
    tokenizer = load_tokenizer(args.model_name_or_path)
    use_mlm = "mlm" in args.objective
    random_weights = random_weights_note(args.model_name_or_path)  # None for a pre-trained model
    model = load_model(args.model_name_or_path, with_mlm_head=use_mlm, ds_config=ds_config)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # Which checkpoint to continue, and whether it was made from this model: checkpoints
    # hold no frozen weights, the ones just loaded take their place (hashed now that the
    # model's files are on disk).
    model_id = checkpoint.model_fingerprint(args.model_name_or_path)
    ckpt_root = os.path.join(args.output_dir, "checkpoints")
    resume_from = checkpoint.find(ckpt_root, model_id) if args.resume else None
    if resume_from is not None:
        check_resume_pattern(resume_from.saved_state().get("sparsity_pattern", "unstructured"),
                             args.sparsity_pattern, resume_from.folder)
    masks, trainable = prepare_pattern_search(model, pattern=parse_pattern(args.sparsity_pattern),
                                              sparsity=args.sparsity, patterns=args.mask_patterns,
                                              scope=args.threshold_scope, init=args.mask_init, seed=args.seed,
                                              mask_file=mask_file)

    engine, scheduler = eng.build_engine(model, ds_config, params=trainable, lr=args.learning_rate,
                                         weight_decay=args.weight_decay, total_steps=args.max_steps,
                                         warmup_steps=args.warmup_steps)
    device = engine.device
    loader = build_block_loader(data, tokenizer, batch_size=args.per_device_train_batch_size,
                                rank=sharding.rank(), world_size=sharding.world_size(), seed=args.seed, mlm=use_mlm)
    eval_batches = build_validation_batches(data, tokenizer, batch_size=args.per_device_train_batch_size,
                                            rank=sharding.rank(), world_size=sharding.world_size(),
                                            seed=args.seed, mlm=use_mlm)
    step = 0
    mfu = SearchMFU(model, args.objective, seq_len=data.max_seq_length, dtype=eng.precision(ds_config), device=device,
                    gradient_checkpointing=args.gradient_checkpointing)
    meter = CostMeter(mfu.flops_per_token)  # one count of the step's FLOPs for the MFU and cost.json
    if resume_from is not None:
        restored = checkpoint.load(engine, resume_from)
        step = restored.step
        masks.load_cuts(restored.state["cuts"])
        meter.device_seconds = restored.state.get("device_seconds", 0.0)  # absent in checkpoints made before it
        loader.load_state_dict(restored.data)  # re-dealt over the readers if the world size changed
        masks.restore_initial()
    start_output_dir(args, run_config(args, data, ds_config, model_id, random_weights))

    monitor = Monitor(args.output_dir, total_steps=args.max_steps, start_step=step)
    pattern = "" if args.sparsity_pattern == "unstructured" else f" ({args.sparsity_pattern}: {masks.sparsity:g})"
    monitor.write(f"TAMT-{args.objective} | sparsity {args.sparsity}{pattern} | {len(masks)} masked matrices | "
                  f"world size {sharding.world_size()} | {eng.precision_line(ds_config)} | "
                  f"ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}")
    if resume_from is not None:
        monitor.write(f"resumed from {resume_from.tag} at step {step}, saved on {resume_from.world_size} rank(s)")
    if random_weights:
        monitor.write(f"model {args.model_name_or_path}: RANDOM weights (seed {random_weights['seed']}), "
                      f"published shapes only: for system and scaling runs, not a pre-trained model")
    monitor.write(mfu.text)
    batches = iter(loader)
    engine.train()  # from_pretrained returns the model in eval mode: the student trains with its dropout
    diverged = guards.NonFiniteGuard(device)
    # Loss terms add up on the device and are read once per logging step: no host sync per step.
    window = {"t": time.perf_counter(), "tokens": 0, "blocks": 0, "terms": {}, "n": 0}
    snapshot_steps = set(args.mask_snapshot_steps)
    meter.start()
    while step < args.max_steps:
        for _ in range(args.gradient_accumulation_steps):
            batch = next(batches)  # on the host: counting its tokens costs no device sync
            window["tokens"] += int(batch["attention_mask"].sum())
            window["blocks"] += batch["input_ids"].shape[0]
            terms = compute_loss(args.objective, engine, masks, to_device(batch, device))
            engine.backward(terms["loss"])
            engine.step()
            diverged.observe(terms["loss"], step + 1)
            for k, v in terms.items():
                window["terms"][k] = window["terms"].get(k, 0.0) + v.detach().float()
            window["n"] += 1
        step += 1
        if step % args.threshold_reset_steps == 0:
            masks.reset_thresholds()
        monitor.step()

        if step % args.logging_steps == 0 or step == args.max_steps:
            diverged.check(kept=f"checkpoints saved before it stay in {ckpt_root}")
            log_step(monitor, step, masks, scheduler, window, loader, mfu)
        if step in snapshot_steps:  # the run's thresholds, RNG and optimizer are left as they are
            export_mask_snapshot(args.output_dir, step, model, masks, meter.totals(loader, step))
            meter.start()
        if args.eval_steps and (step % args.eval_steps == 0 or step == args.max_steps) and eval_batches:
            meter.pause()
            monitor.log(step, evaluate(engine, masks, eval_batches, device, args.objective))
            meter.start()
        if step % args.save_steps == 0 or step == args.max_steps:
            diverged.check(kept=f"checkpoints saved before it stay in {ckpt_root}")
            meter.pause()
            # The live thresholds, not reset here: a save must not change the search (a run
            # saved every 7 steps and one saved every 1000 end with the same mask), and a
            # resume goes on with exactly the thresholds the run had.
            checkpoint.save(engine, ckpt_root, step, {"cuts": masks.cuts(), "device_seconds": meter.device_seconds,
                                                     "sparsity_pattern": args.sparsity_pattern},
                            data=loader.state_dict(), model=model_id, keep=args.save_total_limit)
            meter.start()

    # The search is over: the exported mask is cut at exactly the target sparsity (between
    # resets the live thresholds let it drift), whatever step the last reset fell on.
    cost = meter.totals(loader, step)
    masks.reset_thresholds()
    final = masks.stats(update_last=False)
    write_cost(args.output_dir, cost)
    export_search_outputs(args.output_dir, model, masks, args.model_name_or_path, tokenizer)
    monitor.write(f"done: sparsity {final['sparsity']:.4f}, distance to initial mask {final['distance_to_init']:.4f}; "
                  f"outputs in {args.output_dir}")
    monitor.close()
    return final


def log_step(monitor: Monitor, step: int, masks, scheduler, window: dict, loader, mfu: SearchMFU) -> None:
    """Loss terms averaged over the window and ranks, mask statistics from the live masks,
    corpus progress summed over ranks."""
    names = sorted(window["terms"])
    progress = loader.progress()
    terms = torch.stack([window["terms"][k] for k in names]).double().cpu() / window["n"]  # the one sync
    values = torch.cat([terms, torch.tensor([progress["tokens_seen"], progress["blocks_seen"], window["blocks"],
                                             window["tokens"]], dtype=torch.float64)])
    sharding.all_reduce_(values)
    world = sharding.world_size()
    elapsed = time.perf_counter() - window["t"]
    scalars = {f"train/{k}": float(values[i]) / world for i, k in enumerate(names)}
    stats = masks.stats()
    scalars.update({
        "train/learning_rate": scheduler.get_last_lr()[0] if scheduler is not None else float("nan"),
        "mask/sparsity": stats["sparsity"], "mask/change_since_last_log": stats["mask_change"],
        "mask/distance_to_init": stats["distance_to_init"],
        "perf/tokens_per_s": float(values[-1]) / elapsed, "perf/mfu": mfu.of(float(values[-1]) / elapsed),
        **{f"perf/{k}": v for k, v in memory_mb().items()},
        "data/tokens_seen": float(values[-4]), "data/blocks_seen": float(values[-3]),
        "data/blocks_per_s": float(values[-2]) / elapsed, "data/epoch": progress["epoch"],
    })
    if progress["epoch_fraction"] is not None:
        scalars["data/epoch_fraction"] = progress["epoch_fraction"]
    per = stats["per_matrix"]
    monitor.step(0, **{"loss": scalars["train/loss"], "tok/s": scalars["perf/tokens_per_s"],
                       "MFU %": 100 * scalars["perf/mfu"]})
    monitor.log(step, scalars, groups={
        "sparsity": {n: v["sparsity"] for n, v in per.items()},
        "threshold": {n: v["threshold"] for n, v in per.items()},
        "distance_to_init": {n: v["distance_to_init"] for n, v in per.items()},
    })
    window.update(t=time.perf_counter(), tokens=0, blocks=0, terms={}, n=0)


def main(argv=None) -> int:
    from tamt_ds import preflight

    return preflight.run_entry("search", lambda: search(*parse_args(argv)), argv)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
