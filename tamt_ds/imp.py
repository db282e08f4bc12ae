"""Iterative magnitude pruning (IMP) on the MLM objective, on the search's engine, top to bottom.

    set up ranks -> stream MLM blocks (one stream across rounds) -> for round r = 1 .. R:
        load the pre-trained model (every weight rewound) -> fix the round's mask
        -> MLM head: carried over from the last round -> fresh engine (new optimizer, new schedule)
        -> train all weights for --prune_interval steps (the mask fixed)
        -> prune --prune_fraction of each matrix's ORIGINAL entries more, smallest |trained W| among the kept ones
        -> OUTPUT/<level>/mask.pt (+ the MLM head and every rank's data position, so a killed run resumes
           at this level, on any number of ranks)

The baseline of Chen et al. 2020 ("The Lottery Ticket Hypothesis for Pre-trained BERT
Networks") as the TAMT paper runs it: MLM training of all weights, 10% of the original
weights of every masked matrix pruned per round by magnitude, then all weights rewound to
the pre-trained values and the optimizer reset; the mask for sparsity s is the one read
after 10 * s rounds.  The matrices are TAMT's (word embeddings and pooler included), so
IMP masks are like for like with the search's, OMP's and random ones, and each level
prunes exactly int(numel * level) entries per matrix, as they do.

Rewinding under ZeRO-3: DeepSpeed keeps fp32 master copies of every trained weight inside
its optimizer, so rewinding the model's weights alone would be undone at the next step.
Each round therefore builds a fresh engine on freshly loaded pre-trained weights; only the
MLM head (not rewound, as in Chen et al.) and the mask travel from round to round.

The fixed mask is the fine-tuning harness's mechanism (a frozen score beside each weight,
W_eff = W * m, dL/dW = dL/dW_eff * m), except that pruned weights are not zeroed: the
MLM decoder is tied to the word-embedding matrix and reads it whole (as in the search,
and in Chen et al.'s code, whose pruning reparametrisation leaves the decoder the
unmasked `weight_orig`).  Pruned entries get exactly zero gradient through the masked
forward; only the embedding's get one, through the decoder.  Pruning ranks kept entries
only, so a pruned entry never comes back.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch

from tamt_ds import checkpoint, engine as eng, mfu, sharding, zero
from tamt_ds.cli import check_at_least, parse_arguments
from tamt_ds.engine import to_device
from tamt_ds.data.corpus import CorpusArguments, build_block_loader, build_validation_batches, with_default_corpus
from tamt_ds.maskfile import atomic_torch_save, masks_for_model, read_mask_file
from tamt_ds.masking import INIT_SCORE, TAMT_PATTERNS, MaskSet, attach_masks
from tamt_ds.models import DEFAULT_MODEL, export_name, load_model, load_tokenizer, model_config
from tamt_ds.monitor import Monitor, memory_mb
from tamt_ds.objectives import compute_loss, mlm_accuracy
from tamt_ds.search_cost import CostMeter, read_cost, write_cost
from tamt_ds.thresholds import Cut, bottom_k_cuts
from tamt_ds.errors import InputError


@dataclass
class IMPArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "hub name or local model directory"})
    max_sparsity: float = field(default=0.9, metadata={"help": "last level; masks are written for every level up to it"})
    prune_fraction: float = field(default=0.1, metadata={"help": "fraction of each matrix's original entries pruned per round"})
    # The paper's BERT-base runs: 2792 steps of 16 x 512 tokens per round.  The default is a short
    # run for this CPU machine (9 rounds in a few minutes): IMP "short" of the embedded study.
    prune_interval: int = field(default=20, metadata={"help": "training steps per round (between two prunings)"})
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = field(default=0, metadata={"help": "per round: the schedule restarts every round"})
    max_grad_norm: float = 1.0
    seed: int = 42
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (default: one for this machine)"})
    output_dir: str = "outputs/imp"
    overwrite_output_dir: bool = False
    resume: bool = field(default=False, metadata={"help": "continue after the last finished level"})
    logging_steps: int = 10
    dist_timeout: float = field(default=eng.DEFAULT_DIST_TIMEOUT_S, metadata={
        "help": "seconds a dead or frozen peer goes unnoticed before the run stops (launchers/slurm/node.sh sets it)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


class IMPError(InputError):
    pass


def parse_args(argv=None) -> tuple[IMPArguments, CorpusArguments]:
    if any(a.split("=", 1)[0] == "--sparsity_pattern" for a in (sys.argv[1:] if argv is None else argv)):
        raise IMPError("IMP has no --sparsity_pattern: it prunes a fraction of each matrix's weights per round, "
                       "unstructured only; for N:M or structured masks use launchers/search.py --sparsity_pattern and "
                       "the same-pattern baselines of python -m tamt_ds.pattern_baselines (docs/patterns.md)")
    args, data = parse_arguments((IMPArguments, CorpusArguments), argv)
    return args, with_default_corpus(data)


def levels(args: IMPArguments) -> list[float]:
    """Sparsity after each round: prune_fraction, 2 * prune_fraction, ..., max_sparsity."""
    if not 0.0 < args.prune_fraction < 1.0:
        raise IMPError(f"--prune_fraction must be in (0, 1), got {args.prune_fraction}: pass e.g. --prune_fraction 0.1")
    if not 0.0 < args.max_sparsity < 1.0:
        raise IMPError(f"--max_sparsity must be in (0, 1), got {args.max_sparsity}: pass e.g. --max_sparsity 0.9")
    rounds = round(args.max_sparsity / args.prune_fraction)
    if rounds < 1 or not math.isclose(rounds * args.prune_fraction, args.max_sparsity, abs_tol=1e-9):
        raise IMPError(f"--max_sparsity {args.max_sparsity} is not a multiple of --prune_fraction {args.prune_fraction}: "
                       f"pass e.g. --max_sparsity {max(1, rounds) * args.prune_fraction:g}")
    return [round(r * args.prune_fraction, 10) for r in range(1, rounds + 1)]


def level_dir(output_dir: str, level: float) -> str:
    """OUTPUT/0.7: the search's layout, one directory per sparsity."""
    return os.path.join(output_dir, f"{level:g}")


def validate(args: IMPArguments, data: CorpusArguments) -> list[float]:
    """Every setting that could stop the run later, checked before anything is loaded or written."""
    check_at_least(args, 1, ("prune_interval", "per_device_train_batch_size", "gradient_accumulation_steps",
                             "logging_steps"), IMPError)
    check_at_least(args, 0, ("warmup_steps", "learning_rate", "weight_decay", "max_grad_norm"), IMPError)
    check_at_least(args, 1, ("dist_timeout",), IMPError)
    check_at_least(data, 1, ("max_seq_length",), IMPError)
    if not 0.0 < data.mlm_probability <= 1.0:
        raise IMPError(f"--mlm_probability must be in (0, 1], got {data.mlm_probability}: pass e.g. --mlm_probability 0.15")
    return levels(args)


def finished_levels(args: IMPArguments, all_levels: list[float]) -> int:
    """How many levels, from the first, are complete (mask.pt is written last)."""
    done = 0
    for level in all_levels:
        if not os.path.isfile(os.path.join(level_dir(args.output_dir, level), "mask.pt")):
            break
        done += 1
    return done


def check_output_dir(args: IMPArguments) -> None:
    holds_run = os.path.isdir(args.output_dir) and bool(os.listdir(args.output_dir))
    if holds_run and not (args.resume or args.overwrite_output_dir):
        raise IMPError(f"--output_dir {args.output_dir} already holds a run: pass --resume to continue it, "
                       f"--overwrite_output_dir to replace it, or another --output_dir")


def start_output_dir(args: IMPArguments, all_levels: list[float], config: dict) -> None:
    if sharding.rank() == 0:
        if args.overwrite_output_dir and not args.resume:
            for sub in ["tensorboard"] + [f"{lv:g}" for lv in all_levels]:
                shutil.rmtree(os.path.join(args.output_dir, sub), ignore_errors=True)
            if os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")):
                os.remove(os.path.join(args.output_dir, "metrics.jsonl"))
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoint.atomic_write_text(os.path.join(args.output_dir, "run_config.json"),
                                     json.dumps(config, indent=2, default=str))
    sharding.barrier()


# One file of every rank's data position after a level, in rank order: a resume on any
# number of ranks reads them all and re-deals the rest of the epoch (as the search's
# checkpoints do), instead of each rank reading back its own.
DATA_POSITIONS = "data_positions.pt"


def read_data_positions(level_folder: str) -> list[dict]:
    path = os.path.join(level_folder, DATA_POSITIONS)
    if os.path.isfile(path):
        return torch.load(path, weights_only=False)
    old, r = [], 0  # a level written before DATA_POSITIONS: data_rank<r>.pt, one per rank
    while os.path.isfile(os.path.join(level_folder, f"data_rank{r}.pt")):
        old.append(torch.load(os.path.join(level_folder, f"data_rank{r}.pt"), weights_only=False))
        r += 1
    return old


# ------------------------------------------------------------------ one round's model


def fixed_mask(model, mask_file: dict[str, torch.Tensor] | None, path: str = "IMP mask") -> MaskSet:
    """The round's mask on TAMT's matrices, held fixed (frozen scores) while the weights train.

    The one call site of the fixed-mask mechanism (see the module docstring for why pruned
    weights are not zeroed here).  `mask_file` None: nothing pruned (the first round)."""
    masks = attach_masks(model, TAMT_PATTERNS, sparsity=0.0)
    if mask_file is None:
        masks.init_scores("magnitude")  # sparsity 0: every entry kept
    else:
        file_masks = masks_for_model(mask_file, model, masks, path)
        masks.fix_counts(file_masks)
        masks.init_scores("file", mask_file=file_masks)
    for p in masks.scores:
        p.requires_grad_(False)
    return masks


def head_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The MLM head (everything outside the backbone; the tied decoder weight is the embedding's)."""
    prefix = model.base_model_prefix + "."
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix)}


@torch.no_grad()
def full_tensor(p: torch.nn.Parameter) -> torch.Tensor:
    """The full fp32 tensor of a (possibly partitioned) parameter, on the CPU (collective):
    the optimizer's fp32 master where it has one (exact under bf16), else the gathered values."""
    if zero.has_fp32_master(p):
        return zero.full_fp32_master(p).float().cpu()
    with sharding.gathered([p]):
        return p.data.detach().float().cpu().clone()


@torch.no_grad()
def load_full_tensor(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """Write this rank's slice of `full` into p (before deepspeed.initialize copies its fp32 masters)."""
    shard = sharding.local_shard(p)
    n = shard.values.numel()
    shard.values.copy_(full.reshape(-1)[shard.offset:shard.offset + n].to(shard.values.dtype))


def trained_magnitudes(weight: torch.nn.Parameter, device: torch.device) -> sharding.Shard:
    """|W| of this rank's shard on `device`, from the optimizer's fp32 master where it has one.

    The master and the shard need not share a device: DeepSpeed hands the master back on the
    accelerator even when it lives offloaded on the CPU, while an offloaded parameter's shard
    stays on the CPU (and a small one kept whole, under the persistence threshold, on the GPU)."""
    shard = sharding.local_shard(weight)
    values = shard.values
    master = zero.local_fp32_master(weight)
    if master is not None:
        values = master.reshape(-1)[:values.numel()]
    return sharding.Shard(values.detach().to(device).abs().float(), shard.offset, shard.numel)


@torch.no_grad()
def prune(masks: MaskSet, level: float) -> None:
    """Prune each matrix to exactly int(numel * level) entries, removing the smallest |W| among
    the entries still kept (already pruned ones rank below everything), and make the result
    the masks' current mask.  Exact under ZeRO-3: the project's distributed bottom-k over the
    local shards, nothing gathered."""
    ranks = []
    for site in masks:
        # Everything on the score shard's device, where the current mask is read and the new one
        # written (the GPU, or the CPU when parameters are offloaded); the cuts' counts go to the
        # CPU, and to the communication device inside all_reduce_.
        pruned_before = ~site.local_keep()
        mag = trained_magnitudes(site.weight, pruned_before.device)
        ranks.append(sharding.Shard(mag.values.masked_fill(pruned_before, -1.0), mag.offset, mag.numel))
    cuts = bottom_k_cuts(ranks, [int(r.numel * level) for r in ranks],
                         reduce=sharding.shards_are_disjoint(masks.scores))
    for site, r, cut in zip(masks, ranks, cuts):
        keep = cut.keep(r.values, r.offset)
        sharding.local_shard(site.score).values.copy_(keep.to(site.score.dtype) * INIT_SCORE)
        site.module.mask_cut = Cut(INIT_SCORE / 2, 0)


def quiet_loading() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@torch.no_grad()
def validation_mlm(engine, batches, device) -> dict[str, float]:
    """MLM loss / accuracy of the round's subnetwork (trained weights, the round's mask) on the held-out blocks."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        sums += torch.stack(mlm_accuracy(engine, to_device(batch, device))).double()
    engine.train()
    sums = sharding.all_reduce_(sums).cpu()
    return {"eval/mlm_loss": float(sums[0] / max(sums[2], 1)), "eval/mlm_accuracy": float(sums[1] / max(sums[2], 1))}


# ------------------------------------------------------------------------ the loop


def imp(args: IMPArguments, data: CorpusArguments) -> dict:
    all_levels = validate(args, data)
    check_output_dir(args)
    eng.init_distributed(args.dist_timeout)
    ds_config = eng.load_ds_config(args.deepspeed, micro_batch=args.per_device_train_batch_size,
                                   grad_accum=args.gradient_accumulation_steps, grad_clip=args.max_grad_norm)
    tokenizer = load_tokenizer(args.model_name_or_path)
    rank, world = sharding.rank(), sharding.world_size()
    loader = build_block_loader(data, tokenizer, batch_size=args.per_device_train_batch_size, rank=rank,
                                world_size=world, seed=args.seed, mlm=True)
    eval_batches = build_validation_batches(data, tokenizer, batch_size=args.per_device_train_batch_size, rank=rank,
                                            world_size=world, seed=args.seed, mlm=True)
    done = finished_levels(args, all_levels) if args.resume else 0
    mask_file, head_state = None, None
    imp_model = mfu.meta_model(model_config(args.model_name_or_path), "imp")
    meter = CostMeter(mfu.search_flops_per_token(imp_model, "imp", seq_len=data.max_seq_length))
    if done:  # continue after the last finished level: its mask, MLM head and data position
        last = level_dir(args.output_dir, all_levels[done - 1])
        mask_file = read_mask_file(os.path.join(last, "mask.pt"))
        head_state = torch.load(os.path.join(last, "mlm_head.pt"), map_location="cpu", weights_only=True)
        loader.load_state_dict(read_data_positions(last))  # re-dealt if the world size changed
        meter.device_seconds = (read_cost(last) or {}).get("search_device_seconds", 0.0)
    start_output_dir(args, all_levels, {"imp": dataclasses.asdict(args), "data": dataclasses.asdict(data),
                                        "deepspeed": ds_config, "precision": ds_config["_precision"],
                                        "world_size": world, "levels": all_levels})
    monitor = Monitor(args.output_dir, total_steps=len(all_levels) * args.prune_interval,
                      start_step=done * args.prune_interval, desc="imp")
    monitor.write(f"IMP (MLM) | levels {all_levels[0]:g} .. {all_levels[-1]:g} | {args.prune_interval} steps per round"
                  f" | world size {world} | {eng.precision_line(ds_config)} | ZeRO stage "
                  f"{ds_config.get('zero_optimization', {}).get('stage', 0)}"
                  + (f" | resuming after level {all_levels[done - 1]:g}" if done else ""))
    batches = iter(loader)
    summary = {}
    for r in range(done + 1, len(all_levels) + 1):
        if r > done + 1 or sharding.rank() != 0:
            quiet_loading()  # one load report (rank 0, first round) is enough
        mask_file, head_state, summary = run_round(args, ds_config, r, all_levels[r - 1], mask_file, head_state,
                                                   batches, loader, eval_batches, monitor, meter)
    monitor.write(f"done: masks for levels {', '.join(f'{lv:g}' for lv in all_levels)} in {args.output_dir}")
    monitor.close()
    return summary


def run_round(args: IMPArguments, ds_config: dict, r: int, level: float, mask_file, head_state, batches, loader,
              eval_batches, monitor: Monitor, meter: CostMeter):
    """Round r: rewound weights under the last level's mask, trained; pruned to `level`; saved."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed * 1000 + r)  # dropout: a function of (seed, round), so a resumed round is the same
    model = load_model(args.model_name_or_path, with_mlm_head=True, ds_config=ds_config)  # the rewind
    masks = fixed_mask(model, mask_file)
    head = head_parameters(model)
    if head_state is not None:  # the MLM head is not rewound
        for name, p in head.items():
            load_full_tensor(p, head_state[name])
    engine, scheduler = eng.build_engine(model, ds_config, params=[p for p in model.parameters() if p.requires_grad],
                                         lr=args.learning_rate, weight_decay=args.weight_decay,
                                         total_steps=args.prune_interval, warmup_steps=args.warmup_steps)
    device = engine.device
    engine.train()  # from_pretrained returns the model in eval mode: the weights train with their dropout
    base = (r - 1) * args.prune_interval
    loss_sum, n = torch.zeros((), device=device), 0  # read once per logging step: no host sync per step
    meter.start()  # the training steps are the search cost (not the rewind, evaluation, pruning or saving)
    for step in range(1, args.prune_interval + 1):
        for _ in range(args.gradient_accumulation_steps):
            terms = compute_loss("mlm", engine, masks, to_device(next(batches), device))
            engine.backward(terms["loss"])
            engine.step()
            loss_sum += terms["loss"].detach().float()
            n += 1
        monitor.step()
        if step % args.logging_steps == 0 or step == args.prune_interval:
            loss = sharding.all_reduce_(loss_sum.double().cpu().reshape(1) / n)[0] / sharding.world_size()
            monitor.log(base + step, {"train/mlm_loss": float(loss), "imp/round": r,
                                      "train/learning_rate": scheduler.get_last_lr()[0] if scheduler else float("nan"),
                                      **{f"perf/{k}": v for k, v in memory_mb().items()}})
            monitor.step(0, loss=float(loss))
            loss_sum.zero_()
            n = 0
    cost = meter.totals(loader, r * args.prune_interval)  # collective; cumulative over rounds
    scores = validation_mlm(engine, eval_batches, device) if eval_batches else {}

    # ZeRO-3 may still hold gathered copies of parameters prefetched for a next forward; they
    # would hide the new mask from the gather below (and from any later forward).  Release them.
    engine.empty_partition_cache()
    prune(masks, level)
    stats = masks.stats(update_last=False)
    keep = {export_name(model, name): m for name, m in masks.full_masks().items()}  # collective; mask.pt's keys
    head_state = {name: full_tensor(p) for name, p in head.items()}  # collective
    out = level_dir(args.output_dir, level)
    os.makedirs(out, exist_ok=True)
    positions = sharding.gather_objects(loader.state_dict())  # collective; every rank's, in rank order
    summary = {"level": level, "round": r, "steps": args.prune_interval, "sparsity": stats["sparsity"],
               "per_matrix_sparsity": {k: v["sparsity"] for k, v in stats["per_matrix"].items()},
               **{k.replace("eval/", "round_eval_"): v for k, v in scores.items()},
               "round_time_s": time.perf_counter() - t0}
    if sharding.rank() == 0:
        atomic_torch_save(head_state, os.path.join(out, "mlm_head.pt"))
        atomic_torch_save(positions, os.path.join(out, DATA_POSITIONS))
        checkpoint.atomic_write_text(os.path.join(out, "level.json"), json.dumps(summary, indent=2))
    write_cost(out, cost)
    sharding.barrier()
    if sharding.rank() == 0:  # last: a level with mask.pt is finished (resume and the study rely on it)
        atomic_torch_save(keep, os.path.join(out, "mask.pt"))
    sharding.barrier()
    monitor.log(r * args.prune_interval, {"imp/level": level, "mask/sparsity": stats["sparsity"], **scores})
    monitor.write(f"round {r}: trained {args.prune_interval} steps"
                  + (f", held-out MLM loss {scores['eval/mlm_loss']:.4f}" if scores else "")
                  + f"; pruned to {stats['sparsity']:.4f} -> {out}/mask.pt ({summary['round_time_s']:.0f} s)")
    engine.destroy()  # ZeRO-3's hooks and buffers go before the next round's engine
    del engine, model, masks, head
    gc.collect()
    return keep, head_state, summary


def main(argv=None) -> int:
    from tamt_ds import preflight

    return preflight.run_entry("imp", lambda: imp(*parse_args(argv)), argv)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
