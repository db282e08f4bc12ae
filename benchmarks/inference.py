"""Inference speed of what a search exports: dense vs compact (structured) vs zero-filled unstructured.

Each variant is written to disk as a search exports it, loaded back with plain transformers,
and timed on the CPU (fp32, bf16) at batch x length 1 x 128 and 32 x 128; variants alternate
per repeat, so machine noise hits all alike.  Masks are one-shot magnitude masks of the
pattern (speed does not depend on which weights a search keeps):
  dense                   the pre-trained model
  structured S            compact_model/ of a magnitude structured mask at sparsity S
  unstructured S          pruned_model/ (zeros in a dense layout) at sparsity S
  2:4 (zeros)             pruned_model/ of a magnitude 2:4 mask (--two_four)
  2:4 semi-structured     the same, its Linear weights as torch's 2:4 sparse tensors (--two_four on a
                          CUDA GPU of compute capability >= 8.0, fp16/bf16: tamt_ds/semi_structured.py)
Prints a table (median latency, sequences/s, x dense, size on disk) and writes --output JSON.

    python benchmarks/inference.py                                # default model, 30% / 50% structured, 70% unstructured
    python benchmarks/inference.py --model DIR --repeats 20 --output runs/inference.json
    python benchmarks/inference.py --device cuda --dtypes bfloat16 --shapes 32x128 --two_four   # as scripts/gpu_check.sh
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tamt_ds.compact import load_compact_model, save_compact_model  # noqa: E402
from tamt_ds.export import save_pruned_model  # noqa: E402
from tamt_ds.models import DEFAULT_MODEL, load_original_backbone, load_tokenizer  # noqa: E402
from tamt_ds.pattern_baselines import baseline_masks  # noqa: E402
from tamt_ds.semi_structured import to_semi_structured  # noqa: E402

SEMI = "2:4 semi-structured"


def disk_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def build_variants(args, tmp: str) -> dict[str, tuple]:
    """{name: (model, size on disk in MB)}, every model loaded back from its exported directory
    (the semi-structured variant is the 2:4 one, converted where it is timed)."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(args.model)
    dense_dir = os.path.join(tmp, "dense")
    load_original_backbone(args.model).save_pretrained(dense_dir)
    variants = {"dense": (AutoModel.from_pretrained(dense_dir), disk_mb(dense_dir))}
    for s in args.structured:
        out = os.path.join(tmp, f"structured-{s}")
        save_compact_model(baseline_masks(args.model, "structured", s), args.model, tokenizer, out)
        variants[f"structured {s:.0%}"] = (load_compact_model(out), disk_mb(out))
    for s in args.unstructured:
        out = os.path.join(tmp, f"unstructured-{s}")
        save_pruned_model(baseline_masks(args.model, "unstructured", s), args.model, tokenizer, out)
        variants[f"unstructured {s:.0%} (zeros)"] = (AutoModel.from_pretrained(out), disk_mb(out))
    if args.two_four:
        out = os.path.join(tmp, "two-four")
        save_pruned_model(baseline_masks(args.model, "2:4", 0.5), args.model, tokenizer, out)
        variants["2:4 (zeros)"] = (AutoModel.from_pretrained(out), disk_mb(out))
        if args.device == "cuda":
            variants[SEMI] = variants["2:4 (zeros)"]
    return variants


def prepared(name: str, model, dtype: torch.dtype, device: str):
    model = copy.deepcopy(model).to(device, dtype).eval()
    if name == SEMI:
        to_semi_structured(model)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_all(variants: dict, dtype: torch.dtype, batch: int, length: int, repeats: int, vocab: int,
             device: str = "cpu") -> dict[str, float]:
    """Median seconds per forward of each variant; variants alternate within each repeat."""
    ids = torch.randint(1000, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    attention = torch.ones_like(ids)
    models = {name: prepared(name, m, dtype, device) for name, (m, _) in variants.items()
              if not (name == SEMI and dtype == torch.float32)}  # 2:4 sparse tensor cores: fp16 / bf16
    for m in models.values():  # warm-up: allocator, kernels
        m(input_ids=ids, attention_mask=attention)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            sync(device)
            t = time.perf_counter()
            m(input_ids=ids, attention_mask=attention)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--structured", type=float, nargs="*", default=[0.3, 0.5])
    p.add_argument("--unstructured", type=float, nargs="*", default=[0.7])
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--shapes", nargs="*", default=["1x128", "32x128"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--two_four", action="store_true", help="add a 2:4 magnitude ticket (and, on cuda, its semi-structured form)")
    p.add_argument("--output", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(args, tmp)
        vocab = variants["dense"][0].config.vocab_size
        if args.device == "cuda":
            print(f"{args.model} | {torch.cuda.get_device_name()} (compute capability "
                  f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
        else:
            caps = torch.cpu.get_capabilities()
            bf16 = [k for k in ("avx512_bf16", "amx_bf16") if caps.get(k)]
            print(f"{args.model} | {caps.get('cpu_name', 'CPU')}, {torch.get_num_threads()} threads | native bf16: "
                  f"{', '.join(bf16) or 'none'}")
        print(f"{'dtype':9} {'shape':7} {'variant':28} {'ms':>9} {'seq/s':>9} {'x dense':>8} {'MB':>7}")
        for dtype in args.dtypes:
            for shape in args.shapes:
                batch, length = map(int, shape.split("x"))
                medians = time_all(variants, getattr(torch, dtype), batch, length, args.repeats, vocab, args.device)
                for name, seconds in medians.items():
                    row = {"dtype": dtype, "batch": batch, "length": length, "variant": name,
                           "latency_ms": seconds * 1e3, "sequences_per_s": batch / seconds,
                           "speedup": medians["dense"] / seconds, "disk_mb": variants[name][1]}
                    rows.append(row)
                    print(f"{dtype:9} {shape:7} {name:28} {row['latency_ms']:9.2f} {row['sequences_per_s']:9.1f} "
                          f"{row['speedup']:8.2f} {row['disk_mb']:7.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "device": args.device, "threads": torch.get_num_threads(), "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
