"""Threshold reset time against search step time: the search resets every matrix's tau every
`--reset_every` steps (the search's default 10), so a reset costs reset_s / reset_every of
each step.  Target: <= 5% of a step (issue 16).

One search engine (the search's step: frozen weights, scores and MLM head train, `--objective`),
steps and resets alternating; prints medians and `reset_share=<reset_s / (reset_every * step_s)>`.

    python benchmarks/threshold_reset.py --model config:bert-base-uncased
    deepspeed --num_accelerators 2 benchmarks/threshold_reset.py ...   # 2 ranks

The repository root goes at the end of sys.path, so PYTHONPATH=<another checkout> measures
that checkout's tamt_ds with the same command (how the figure before a change is taken).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from types import SimpleNamespace

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tamt_ds import engine as eng, sharding  # noqa: E402
from tamt_ds.masking import prepare_search  # noqa: E402
from tamt_ds.models import DEFAULT_MODEL, load_model  # noqa: E402
from tamt_ds.objectives import compute_loss  # noqa: E402
from benchmarks.step_overhead import engine_for, random_mlm_batch, timed  # noqa: E402

TARGET = 0.05


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub name, config:NAME or local model directory")
    ap.add_argument("--objective", default="kd", choices=["mlm", "kd", "mlm_kd"])
    ap.add_argument("--scope", default="per_matrix", choices=["per_matrix", "global"])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (and as many resets)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reset_every", type=int, default=10, help="the search's --threshold_reset_steps")
    ap.add_argument("--deepspeed", default=None)
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args()

    eng.init_distributed()
    cfg = eng.load_ds_config(args.deepspeed, micro_batch=args.batch, grad_accum=1, grad_clip=1.0)
    device = eng.device()
    batch = random_mlm_batch(args.batch, args.seq, device)
    model = load_model(args.model, with_mlm_head=True, ds_config=cfg)
    masks, params = prepare_search(model, sparsity=args.sparsity, scope=args.scope)
    engine = engine_for(model, cfg, params)

    def forward_backward():
        engine.backward(compute_loss(args.objective, engine, masks, batch)["loss"])

    no_step = SimpleNamespace(step=lambda: None)  # timed() steps its engine after the timed call

    steps, resets = [], []
    for i in range(args.warmup + args.steps):
        s = timed(engine, forward_backward)  # the scores move, so each reset cuts new values
        r = timed(no_step, masks.reset_thresholds)
        if i >= args.warmup:
            steps.append(s)
            resets.append(r)
    if sharding.rank() == 0:
        step_s, reset_s = statistics.median(steps), statistics.median(resets)
        import tamt_ds
        print(f"model={args.model} objective={args.objective} scope={args.scope} matrices={len(masks)} "
              f"masked_entries={sum(sharding.full_numel(s) for s in masks.scores)} batch={args.batch}x{args.seq} "
              f"world={sharding.world_size()} precision={eng.precision(cfg)} tamt_ds={os.path.dirname(tamt_ds.__file__)}")
        print(f"step_s={step_s:.4f} reset_s={reset_s:.4f} (medians of {args.steps}, alternating)")
        print(f"reset_share={reset_s / (args.reset_every * step_s):.4f} target<={TARGET:.2f} "
              f"(reset every {args.reset_every} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
