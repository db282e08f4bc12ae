"""The project's 1-rank search step against a plain single-process PyTorch TAMT-KD step.

The plain step is the authors' way, written here without DeepSpeed: the same model with
masked layers (a straight-through binariser, W * 1[S >= tau]), the same model with its
masks off as the teacher, AdamW on the scores, gradient clipping, and a per-matrix
threshold reset (kthvalue) at the search's interval.  Both sides get the same model,
batch, tokens, dtype and threads, in one process; they alternate in blocks of
`--block` steps (one threshold reset per block at the default), so machine noise hits
both alike.  Per dtype it prints each block pair's tokens/s and the median of the
ratios project / plain, the figure (target >= 0.90), and each side's MFU (tamt_ds/mfu.py).

    python benchmarks/vs_plain_loop.py                                              # MiniLM, 64 x 32, fp32 and bf16
    python benchmarks/vs_plain_loop.py --model config:bert-base-uncased --batch 16 --seq 128
    python benchmarks/vs_plain_loop.py --dtypes bf16 --profile 3                    # + torch.profiler tables
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tamt_ds import engine as eng, mfu  # noqa: E402
from tamt_ds.masking import INIT_SCORE, TAMT_PATTERNS, prepare_search  # noqa: E402
from tamt_ds.models import DEFAULT_MODEL, load_model  # noqa: E402
from tamt_ds.objectives import compute_loss, kd_loss  # noqa: E402

CONFIGS = {"fp32": "zero3_cpu.json", "bf16": "zero3_bf16.json"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = 0.90
LR, RESET_STEPS, CLIP = 5e-4, 10, 1.0  # the search's defaults


# ---- the plain loop -------------------------------------------------------------------

class Binarize(torch.autograd.Function):
    """1[S >= tau] forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, score, tau):
        return (score >= tau).to(score.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# torch's F.linear: the project's zero.Init, in this same process, replaced F.linear process-wide.
linear = torch._C._nn.linear


class PlainMaskedLinear(nn.Linear):
    def forward(self, x):
        if not self.masked:
            return linear(x, self.weight, self.bias)
        return linear(x, self.weight * Binarize.apply(self.score, self.tau).to(self.weight.dtype), self.bias)


class PlainMaskedEmbedding(nn.Embedding):
    def forward(self, ids):  # the looked-up rows only, as the project does
        rows = F.embedding(ids, self.weight, self.padding_idx)
        if not self.masked:
            return rows
        return rows * Binarize.apply(F.embedding(ids, self.score), self.tau).to(rows.dtype)


class PlainSearch:
    """TAMT-KD in plain PyTorch: frozen weights in the run's dtype, fp32 scores (AdamW's
    master copy is the score itself), magnitude init, per-matrix kthvalue resets."""

    def __init__(self, name: str, dtype: torch.dtype, sparsity: float):
        import re

        self.model = load_model(name, with_mlm_head=False).to(dtype)
        self.model.requires_grad_(False)
        regexes = [re.compile(p) for p in TAMT_PATTERNS]
        self.sites = []
        for mod_name, module in self.model.named_modules():
            cls = {nn.Linear: PlainMaskedLinear, nn.Embedding: PlainMaskedEmbedding}.get(type(module))
            if cls is None or not any(r.search(mod_name) for r in regexes):
                continue
            module.__class__ = cls
            w = module.weight.detach().abs().float().reshape(-1)
            k = int(w.numel() * sparsity)
            keep = w > torch.kthvalue(w, k).values if k else torch.ones_like(w, dtype=torch.bool)
            module.score = nn.Parameter((keep.float() * INIT_SCORE).view(module.weight.shape))
            module.tau, module.masked, module.k = INIT_SCORE / 2, True, k
            self.sites.append(module)
        self.scores = [m.score for m in self.sites]
        self.adamw = torch.optim.AdamW(self.scores, lr=LR, weight_decay=0.0)
        self.steps = 0

    def step(self, batch) -> None:
        with torch.no_grad():
            self.model.eval()
            for m in self.sites:
                m.masked = False
            teacher = self.model(**batch, output_hidden_states=True).hidden_states
            for m in self.sites:
                m.masked = True
            self.model.train()
        student = self.model(**batch, output_hidden_states=True).hidden_states
        kd_loss(student, teacher, batch["attention_mask"]).backward()
        torch.nn.utils.clip_grad_norm_(self.scores, CLIP)
        self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % RESET_STEPS == 0:
            with torch.no_grad():
                for m in self.sites:
                    if m.k:
                        m.tau = torch.kthvalue(m.score.reshape(-1), m.k).values.item()


# ---- the project's search step ------------------------------------------------------------

class ProjectSearch:
    """What tamt_ds/search.py runs per step at 1 rank: compute_loss, engine.backward,
    engine.step, and masks.reset_thresholds every RESET_STEPS steps."""

    def __init__(self, name: str, dtype_name: str, sparsity: float, batch_size: int):
        config = os.path.join(eng.CONFIG_DIR, CONFIGS[dtype_name])
        self.cfg = eng.load_ds_config(config, micro_batch=batch_size, grad_accum=1, grad_clip=CLIP)
        self.model = load_model(name, with_mlm_head=False, ds_config=self.cfg)
        self.masks, params = prepare_search(self.model, sparsity=sparsity)
        self.engine, _ = eng.build_engine(self.model, self.cfg, params=params, lr=LR, weight_decay=0.0,
                                          total_steps=10**6)
        self.engine.train()
        self.steps = 0

    def step(self, batch) -> None:
        loss = compute_loss("kd", self.engine, self.masks, batch)["loss"]
        self.engine.backward(loss)
        self.engine.step()
        self.steps += 1
        if self.steps % RESET_STEPS == 0:
            self.masks.reset_thresholds()


# ---- measuring ---------------------------------------------------------------------------

def run_block(side, batch, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads) per step over `steps` steps.
    On a quiet machine the two ratios agree; on one shared with other jobs the wall clock
    measures the scheduler too, and the CPU time is the figure."""
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        side.step(batch)
    return (time.perf_counter() - t) / steps, (time.process_time() - cpu) / steps


def profile(side, batch, steps: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            side.step(batch)
    print(f"\n--- torch.profiler, {label}, {steps} steps, by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub name, local directory or config:NAME")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--block", type=int, default=RESET_STEPS, help="steps per timed block (one reset each at 10)")
    ap.add_argument("--pairs", type=int, default=3, help="timed block pairs per dtype, sides alternating")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--profile", type=int, default=0, help="after timing, profile N steps of each side")
    args = ap.parse_args()

    eng.init_distributed()  # one rank, gloo: as `python launchers/search.py` runs
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokens = ids.numel()
    print(f"model={args.model} batch={args.batch}x{args.seq} threads={torch.get_num_threads()} world=1 "
          f"blocks of {args.block} steps, threshold reset every {RESET_STEPS}")
    summary = []
    for dtype_name in args.dtypes.split(","):
        sides = {"project": ProjectSearch(args.model, dtype_name, args.sparsity, args.batch),
                 "plain": PlainSearch(args.model, DTYPES[dtype_name], args.sparsity)}
        flops = mfu.search_flops_per_token(sides["project"].model, "kd", seq_len=args.seq)
        peak = mfu.peak_flops(torch.device("cpu"), DTYPES[dtype_name])
        for side in sides.values():
            run_block(side, batch, args.warmup) if args.warmup else None
        ratios, cpu_ratios, rates = [], [], {"project": [], "plain": []}
        for i in range(args.pairs):
            order = ("project", "plain") if i % 2 == 0 else ("plain", "project")
            pair = {k: run_block(sides[k], batch, args.block) for k in order}
            for k, (wall, _) in pair.items():
                rates[k].append(tokens / wall)
            ratios.append(pair["plain"][0] / pair["project"][0])
            cpu_ratios.append(pair["plain"][1] / pair["project"][1])
            print(f"{dtype_name} pair {i}: project {tokens / pair['project'][0]:,.0f} tok/s "
                  f"({tokens / pair['project'][1]:,.0f} per CPU-s), plain {tokens / pair['plain'][0]:,.0f} tok/s "
                  f"({tokens / pair['plain'][1]:,.0f} per CPU-s), ratio {ratios[-1]:.3f} (CPU time {cpu_ratios[-1]:.3f})",
                  flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        line = (f"{dtype_name}: project {med['project']:,.0f} tok/s (MFU {mfu.percent(med['project'] * flops, peak)}), "
                f"plain {med['plain']:,.0f} tok/s (MFU {mfu.percent(med['plain'] * flops, peak)}), "
                f"ratio={statistics.median(ratios):.3f}, in CPU time {statistics.median(cpu_ratios):.3f} "
                f"(medians of {len(ratios)}) target>={TARGET:.2f}")
        summary.append(line)
        print(line, flush=True)
        if args.profile:
            for name, side in sides.items():
                profile(side, batch, args.profile, f"{name} {dtype_name}")
        del sides
    print(f"\nmodel FLOPs per token {flops / 1e9:.4g} GFLOP (tamt_ds/mfu.py); peak: "
          f"{mfu.describe_peak(torch.device('cpu'))}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
