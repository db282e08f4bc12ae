"""Bring a corpus to shared storage once, in as many Parquet shards as there will be readers.

    python -m tamt_ds.data.prepare --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \\
        --num_shards 512 --output_dir /shared/corpora/wt103
    ... --train_files /shared/corpora/wt103      # then: one file per reader (shard mode)

A source with fewer files than readers is read in strided mode: every reader scans all of
it and keeps 1/R of its documents -- from the hub, R downloads of the split per epoch, each
one a chance of a time-out hours into a run. Prepared once, each reader reads only its own
file. Works for a hub dataset (or a local directory in hub layout) and for local files.

The source is streamed once into one temporary Parquet file, then cut into `num_shards`
contiguous ranges of documents (consecutive paragraphs of an article stay together), in
source order: read in shard order the shards are the source's documents, empty ones left
out (the readers drop those anyway). Everything is written into a temporary directory
beside `output_dir`, renamed into place at the end: `output_dir` is complete or absent.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from .errors import CorpusError
from .sources import SAMPLE_BY, column_texts, hub_source, local_source, open_source

READ_BATCH = 4096  # documents per read and per Parquet row group of the temporary file


@dataclass
class PrepareArguments:
    output_dir: str = field(metadata={"help": "new directory for the shards (on storage every rank reads); "
                                              "pass it to --train_files"})
    num_shards: int = field(metadata={"help": "shards to write: at least the number of readers, world_size x "
                                              "max(1, dataloader_num_workers), e.g. a multiple of it"})
    dataset_name: str | None = field(default=None, metadata={"help": "hub dataset (wikitext, wikipedia, ... or a "
                                                                     "repository id / local hub-layout directory)"})
    dataset_config_name: str | None = None
    dataset_split: str = field(default="train", metadata={"help": "hub split to prepare"})
    train_files: list[str] | None = field(default=None, metadata={
        "help": "or local files, a glob or a directory of one format (one source)"})
    text_column: str = "text"
    text_sample_by: str = field(default="line", metadata={"help": f"plain text: one of {SAMPLE_BY}"})


def _source(args: PrepareArguments):
    if bool(args.dataset_name) == bool(args.train_files):
        raise CorpusError("name one source to prepare: --dataset_name (hub) or --train_files (local files)")
    if args.dataset_name:
        if "," in args.dataset_name:
            raise CorpusError(f"--dataset_name {args.dataset_name!r}: prepare one dataset at a time")
        return hub_source(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                          text_column=args.text_column)
    if len(args.train_files) > 1:
        raise CorpusError("--train_files: prepare one source at a time (a file, a glob or a directory)")
    return local_source(args.train_files[0], text_column=args.text_column, sample_by=args.text_sample_by)


def prepare(args: PrepareArguments) -> list[str]:
    """Write the shards; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if args.num_shards < 1:
        raise CorpusError(f"--num_shards must be at least 1, got {args.num_shards}")
    out = os.path.abspath(os.path.expanduser(args.output_dir))
    if os.path.exists(out):
        raise CorpusError(f"--output_dir {args.output_dir!r} already exists; remove it or pass a new directory")
    spec = _source(args)
    ds = open_source(spec)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        schema = pa.schema([("text", pa.string())])
        whole = os.path.join(work, ".whole.parquet")  # hidden: never taken for a shard
        with pq.ParquetWriter(whole, schema) as writer:
            for batch in ds.iter(batch_size=READ_BATCH):
                texts = [t for t in column_texts(batch, spec.text_column) or [] if t and not t.isspace()]
                if texts:
                    writer.write_table(pa.table({"text": pa.array(texts, pa.string())}, schema=schema))
        total = pq.ParquetFile(whole).metadata.num_rows
        if total < args.num_shards:
            raise CorpusError(f"{spec.label!r} holds {total} documents, fewer than --num_shards {args.num_shards}; "
                              "pass a smaller --num_shards")
        width = max(5, len(str(args.num_shards)))
        paths = [os.path.join(work, f"train-{i:0{width}d}-of-{args.num_shards:0{width}d}.parquet")
                 for i in range(args.num_shards)]
        _cut(pq.ParquetFile(whole), total, paths, schema)
        os.remove(whole)
        os.rename(work, out)  # the directory appears complete, or not at all
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return [os.path.join(out, os.path.basename(p)) for p in paths]


def _cut(whole, total: int, paths: list[str], schema) -> None:
    """Documents [i * total // n, (i + 1) * total // n) of `whole` into paths[i], in order."""
    import pyarrow.parquet as pq

    n = len(paths)
    batches = whole.iter_batches(batch_size=READ_BATCH)
    pending, row = None, 0  # rows read but not yet written; index of pending's first row
    for i, path in enumerate(paths):
        stop = (i + 1) * total // n
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            while row < stop:
                if pending is None or len(pending) == 0:
                    pending = next(batches)
                take = min(len(pending), stop - row)
                writer.write_batch(pending.slice(0, take))
                pending, row = pending.slice(take), row + take


def parse_args(argv=None) -> PrepareArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser((PrepareArguments,)).parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli

    def run():
        args = parse_args(argv)
        paths = prepare(args)
        print(f"wrote {len(paths)} shards to {os.path.abspath(args.output_dir)}; train with --train_files "
              f"{os.path.abspath(args.output_dir)}", flush=True)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
