"""Step time of masked training against dense training: same model, batch and engine.

Both engines live in one process and their steps alternate, so machine noise hits
both alike.  Prints per-step medians and `ratio=<masked/dense>` last.

--mode search:    dense = MLM training of every weight; masked = the search's step
                  (frozen weights, scores and the MLM head train) with `--objective`.
--mode finetune:  dense = classifier fine-tuning of every weight; masked = the same with
                  a fixed 70% OMP mask (pruned weights zero, gradients masked each step).

    python benchmarks/step_overhead.py --mode search --objective mlm   # target ratio <= 1.10
    python benchmarks/step_overhead.py --mode search --objective kd    # one extra teacher forward
    python benchmarks/step_overhead.py --mode finetune                 # target ratio <= 1.05
    python benchmarks/step_overhead.py --model DIR ...                 # any local model directory
    python benchmarks/step_overhead.py --blocks 3 ...                  # one engine in memory at a time
    deepspeed --num_accelerators 2 benchmarks/step_overhead.py ...     # 2 ranks

By default both engines stay in memory and single steps alternate.  With `--blocks N`
(for models whose two engines do not fit in memory together) the kinds alternate by
block instead: N blocks each, every block fresh processes (`--nproc` ranks, torchrun)
that build one engine and run --warmup untimed and --steps timed steps.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.downstream.arguments import MaskSpec  # noqa: E402
from tamt_ds.downstream.finetune import param_groups  # noqa: E402
from tamt_ds.downstream.fixed_mask import FixedMask  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import DEFAULT_MODEL, load_model, load_task_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402

TARGETS = {"search": 1.10, "finetune": 1.05}
ORDER = ("masked", "dense")


def engine_for(model, cfg, params):
    return eng.build_engine(model, cfg, params=params, lr=1e-5, weight_decay=0.0, total_steps=10**6)[0]


def build_search(args, cfg, batch, masked: bool):
    model = load_model(args.model, with_mlm_head=True, ds_config=cfg)
    if not masked:
        engine = engine_for(model, cfg, model.parameters())
        return engine, lambda: engine.backward(engine(**batch).loss)
    masks, params = prepare_search(model, sparsity=args.sparsity)
    engine = engine_for(model, cfg, params)
    return engine, lambda: engine.backward(compute_loss(args.objective, engine, masks, batch)["loss"])


def build_finetune(args, cfg, batch, masked: bool):
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "labels": batch["input_ids"][:, 0] % 2}
    torch.manual_seed(0)
    model = load_task_model(args.model, head="classification", ds_config=cfg, num_labels=2)
    fixed = FixedMask.build(model, MaskSpec("omp", args.sparsity) if masked else MaskSpec("dense", 0.0), None)
    engine = engine_for(model, cfg, param_groups(model, 0.0))

    def forward_backward():
        engine.backward(engine(**batch).loss)
        if fixed is not None:
            fixed.mask_gradients()  # every micro-step is a boundary here (no accumulation)

    return engine, forward_backward


def random_mlm_batch(batch: int, seq: int, device) -> dict:
    """Token ids of a BERT vocabulary, 15% of them MLM labels; each rank its own."""
    g = torch.Generator().manual_seed(sharding.rank())
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def timed(engine, forward_backward) -> float:
    sharding.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    forward_backward()
    engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    sharding.barrier()
    return time.perf_counter() - t


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="search", choices=["search", "finetune"])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub name or local model directory")
    ap.add_argument("--objective", default="mlm", choices=["mlm", "kd", "mlm_kd"], help="search only")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=0, help="one engine in memory at a time: N blocks per kind")
    ap.add_argument("--nproc", type=int, default=1, help="--blocks: ranks per block (torchrun)")
    ap.add_argument("--only", choices=["dense", "masked"], help=argparse.SUPPRESS)  # one block of --blocks
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()
    if args.blocks:
        return run_blocks(args)

    eng.init_distributed()
    cfg = eng.load_ds_config(args.deepspeed, micro_batch=args.batch, grad_accum=1, grad_clip=1.0)
    device = eng.device()
    batch = random_mlm_batch(args.batch, args.seq, device)
    build = build_search if args.mode == "search" else build_finetune
    if args.only:
        engine, forward_backward = build(args, cfg, batch, args.only == "masked")
        times = [timed(engine, forward_backward) for _ in range(args.warmup + args.steps)][args.warmup:]
        peak = torch.tensor([peak_rss_mb()])
        sharding.all_reduce_(peak, op="max")
        if sharding.rank() == 0:
            print(json.dumps({"times": times, "peak_rss_mb": float(peak)}))
        return 0
    engines = {kind: build(args, cfg, batch, kind == "masked") for kind in ("dense", "masked")}
    times = {"dense": [], "masked": []}
    for i in range(args.warmup + args.steps):
        for kind in ORDER if i % 2 == 0 else ORDER[::-1]:
            t = timed(*engines[kind])
            if i >= args.warmup:
                times[kind].append(t)
    if sharding.rank() == 0:
        report(args, cfg, times, peak_rss_mb(), f"{args.steps}, alternating")
    return 0


def run_blocks(args) -> int:
    """--blocks: each block a fresh one-engine process (`--only KIND`), kinds alternating."""
    times, peak = {"dense": [], "masked": []}, 0.0
    for i in range(args.blocks):
        for kind in ORDER if i % 2 == 0 else ORDER[::-1]:
            argv = [sys.executable, os.path.abspath(__file__), "--only", kind]
            if args.nproc > 1:
                torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
                argv[:1] = [torchrun, "--nproc_per_node", str(args.nproc), "--master_port", str(eng.free_port())]
            for name in ("mode", "model", "objective", "sparsity", "batch", "seq", "steps", "warmup", "deepspeed"):
                if getattr(args, name) is not None:
                    argv += [f"--{name}", str(getattr(args, name))]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
            block = json.loads(proc.stdout.strip().splitlines()[-1])
            times[kind] += block["times"]
            peak = max(peak, block["peak_rss_mb"])
    cfg = eng.load_ds_config(args.deepspeed, micro_batch=args.batch, grad_accum=1, grad_clip=1.0)
    report(args, cfg, times, peak, f"{args.blocks} alternating blocks of {args.steps}, fresh processes",
           world=args.nproc)
    return 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(args, cfg, times: dict, peak: float, how: str, world: int | None = None) -> None:
    d, m = statistics.median(times["dense"]), statistics.median(times["masked"])
    what = f"objective={args.objective}" if args.mode == "search" else "mask=omp"
    print(f"mode={args.mode} model={args.model} {what} sparsity={args.sparsity} batch={args.batch}x{args.seq} "
          f"world={world or sharding.world_size()} precision={eng.precision(cfg)} peak_rss_mb_per_rank={peak:.0f}")
    print(f"dense_step_s={d:.4f} masked_step_s={m:.4f} (medians of {how})")
    print(f"ratio={m / d:.3f} target<={TARGETS[args.mode]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
