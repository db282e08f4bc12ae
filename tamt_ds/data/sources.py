"""Opening, sharding and reading text sources, all through `datasets` streaming.

A *source* is one `--train_files` entry (a file, a glob or a directory of one format)
or one hub dataset. Each is opened once with `load_dataset(..., streaming=True)`, which
gives plain text (line / paragraph / whole-file documents), JSON Lines, Parquet and
gzip / zstd / bz2 / xz decompression for free, locally or from the hub.

A *reader* is one DataLoader worker of one rank: reader = rank * num_workers + worker,
num_readers = world_size * num_workers. `ReaderShare` says which raw examples of a
source a reader owns, so that the readers' shares are disjoint and together cover the
source exactly once per epoch:

- shard mode (the source has at least as many shards -- files -- as there are readers):
  reader r reads shards r, r + R, r + 2R, ... whole. Nobody reads what it does not keep.
- strided mode (fewer shards than readers, e.g. one big file): every reader scans the
  whole source and keeps raw examples r, r + R, r + 2R, ... Scanning is cheap next to
  tokenising, which is what gets split.

`DocCursor` walks one reader's share forever (epoch after epoch) and can report and
restore its exact position; `DocMixer` draws documents from several cursors with
weights, also resumably.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import glob
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CorpusError

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".text", ".raw", ".tokens", ".md", ".rst")
JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
COMPRESSION_EXTENSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
SAMPLE_BY = ("line", "paragraph", "document")
MAX_RAW_PER_READ = 8192

# Short hub names of the classic pre-training corpora -> (repository, default config,
# revision). The canonical repositories moved under organisations; "bookcorpus" is a
# script dataset upstream, which `datasets` >= 4 no longer runs, so its hub parquet
# export is used. A full repository id (or a local directory in hub layout) is used as
# given.
HUB_ALIASES: dict[str, tuple[str, str | None, str | None]] = {
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1", None),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", None),
    "bookcorpus": ("bookcorpus/bookcorpus", None, "refs/convert/parquet"),
    "c4": ("allenai/c4", "en", None),
    "allenai/c4": ("allenai/c4", "en", None),
    "fineweb": ("HuggingFaceFW/fineweb", None, None),
}

# ---------------------------------------------------------------------------
# Undecodable bytes: skipped and counted, never a crash.
# The text and JSON builders pass `encoding_errors` to the decoder; this handler drops
# the bad bytes and counts them in a per-process counter that the readers report.
_UNDECODABLE = 0
DECODE_ERRORS = "tamt_skip_and_count"


def _skip_and_count(err: UnicodeDecodeError):
    global _UNDECODABLE
    _UNDECODABLE += err.end - err.start
    return "", err.end


codecs.register_error(DECODE_ERRORS, _skip_and_count)


def undecodable_bytes() -> int:
    """Bytes skipped as undecodable by this process so far."""
    return _UNDECODABLE


# ---------------------------------------------------------------------------
# Resolving what the user named into sources.


@dataclass(frozen=True)
class SourceSpec:
    label: str  # what the user wrote: for messages and progress
    builder: str  # "text" | "json" | "parquet" | "hub"
    files: tuple[str, ...] = ()
    hub_name: str | None = None
    hub_config: str | None = None
    hub_revision: str | None = None
    split: str = "train"
    text_column: str = "text"
    sample_by: str = "line"


def _format_of(path: str) -> str | None:
    name = path.lower()
    for ext in COMPRESSION_EXTENSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith(TEXT_EXTENSIONS):
        return "text"
    if name.endswith(JSON_EXTENSIONS):
        return "json"
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    return None


_KNOWN = "plain text (.txt .text .raw .tokens .md .rst), JSON Lines (.jsonl .json .ndjson) or Parquet (.parquet), optionally .gz/.zst/.bz2/.xz"


def resolve_files(entry: str) -> list[str]:
    """A file, a glob or a directory -> the sorted list of data files it names."""
    path = os.path.expanduser(entry)
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in names if not n.startswith(".") and _format_of(n)]
        if not files:
            raise CorpusError(f"directory {entry!r} holds no corpus files; expected {_KNOWN}")
        return sorted(files)
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise CorpusError(f"glob {entry!r} matched no files; check the pattern (quote it so the shell does not expand it)")
        return files
    if not os.path.isfile(path):
        raise CorpusError(f"corpus file not found: {entry!r}; pass existing files, globs (data/*.txt) or directories to --train_files")
    return [path]


def local_source(entry: str, *, text_column: str = "text", sample_by: str = "line", split: str = "train") -> SourceSpec:
    files = resolve_files(entry)
    formats = {_format_of(f) for f in files}
    if None in formats:
        bad = next(f for f in files if _format_of(f) is None)
        raise CorpusError(f"unknown corpus file type {bad!r}; expected {_KNOWN}")
    if len(formats) > 1:
        raise CorpusError(f"{entry!r} mixes file formats {sorted(formats)}; pass one --train_files entry per format")
    if sample_by not in SAMPLE_BY:
        raise CorpusError(f"text_sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
    builder = formats.pop()
    # Plain text has exactly one column, named "text" by the `datasets` text builder.
    column = "text" if builder == "text" else text_column
    return SourceSpec(label=entry, builder=builder, files=tuple(files), split=split, text_column=column, sample_by=sample_by)


def hub_source(name: str, config: str | None = None, *, split: str = "train", text_column: str = "text") -> SourceSpec:
    repo, default_config, revision = HUB_ALIASES.get(name, (name, None, None))
    return SourceSpec(
        label=name,
        builder="hub",
        hub_name=repo,
        hub_config=config if config else default_config,
        hub_revision=revision,
        split=split,
        text_column=text_column,
    )


# ---------------------------------------------------------------------------
# Opening.


def _hub_unreachable(exc: BaseException) -> bool:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - huggingface_hub always ships with datasets
        LocalEntryNotFoundError = OfflineModeIsEnabled = ConnectionError
    return isinstance(exc, (ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled))


def open_source(spec: SourceSpec):
    """Open a source as a streaming `datasets.IterableDataset` with the text column only."""
    import datasets

    try:
        if spec.builder == "hub":
            ds = datasets.load_dataset(
                spec.hub_name, spec.hub_config, split=spec.split, streaming=True, revision=spec.hub_revision
            )
        else:
            kwargs: dict[str, Any] = {}
            if spec.builder in ("text", "json"):
                # "utf8" (not "utf-8") makes the JSON builder decode through Python with
                # our error handler instead of handing raw bytes to pyarrow, which would
                # fail on the first invalid byte. Same codec, same text.
                kwargs.update(encoding="utf8", encoding_errors=DECODE_ERRORS)
            if spec.builder == "text":
                kwargs["sample_by"] = spec.sample_by
            ds = datasets.load_dataset(spec.builder, data_files=list(spec.files), split="train", streaming=True, **kwargs)
    except CorpusError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if spec.builder == "hub" and _hub_unreachable(exc):
            raise CorpusError(
                f"the Hugging Face Hub is unreachable, so dataset {spec.label!r} cannot be streamed ({first}); "
                "pass local files instead, e.g. --train_files path/*.txt (or a directory / .jsonl / .parquet files)"
            ) from exc
        if spec.builder == "hub":
            raise CorpusError(
                f"cannot open hub dataset {spec.label!r} (config {spec.hub_config!r}, split {spec.split!r}): {first}; "
                "check --dataset_name / --dataset_config_name / --dataset_split, or pass local files with --train_files"
            ) from exc
        raise CorpusError(f"cannot read corpus {spec.label!r}: {first}") from exc

    columns = list(ds.features) if ds.features is not None else _peek_columns(ds)
    if columns is not None and spec.text_column not in columns:
        raise CorpusError(
            f"source {spec.label!r} has no text field {spec.text_column!r}; its fields are {columns}: "
            f"pass --text_column with one of them"
        )
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([spec.text_column])  # do not decode columns we never use
    # Batches as Arrow tables: ~1.7x faster to stream than Python dicts, and a strided
    # reader converts only the rows it keeps.
    return ds.with_format("arrow")


def _peek_columns(ds) -> list[str] | None:
    for batch in ds.iter(batch_size=1):
        return list(batch)
    return None  # an empty source: the reader reports it


def column_texts(batch, column: str) -> list[str | None] | None:
    """The text column of a streamed batch (an Arrow table) as Python strings."""
    if column not in batch.column_names:
        return None
    return batch.column(column).to_pylist()


def num_shards(ds) -> int:
    return ds.num_shards


def shard_dataset(ds, shard: int | None):
    """A fresh dataset object over one shard (or the whole source when shard is None).

    Fresh because `IterableDataset.load_state_dict` sticks to the object: re-iterating
    an object that was resumed would resume again instead of starting the shard over.
    """
    if shard is None:
        return ds.shard(num_shards=1, index=0, contiguous=True)
    return ds.shard(num_shards=ds.num_shards, index=shard, contiguous=True)


def examples_per_shard(spec: SourceSpec, ds) -> list[int] | None:
    """Raw examples in each shard where the source knows its size without reading it."""
    if spec.builder == "parquet":
        import pyarrow.parquet as pq

        return [pq.ParquetFile(f).metadata.num_rows for f in spec.files]
    if spec.builder == "hub":
        try:
            total = ds.info.splits[spec.split].num_examples
        except (KeyError, TypeError, AttributeError):
            total = None
        if total:
            # Only the total is known: spread it evenly (an estimate, for progress only).
            n = ds.num_shards
            return [total // n + (1 if i < total % n else 0) for i in range(n)]
    return None


# ---------------------------------------------------------------------------
# Which raw examples a reader owns.


@dataclass(frozen=True)
class Part:
    """The raw examples j of one stream that a reader keeps.

    The stream is one shard, or the whole source when `shard` is None. A reader keeps j
    when j >= skip (the head reserved for a carved validation set), j % stride is one of
    the offsets in `starts` and j is at least that offset's start, and
    (j // stride) % split == split_index. A reader's normal share uses only the stride;
    starts after 0, the split and `resume` describe the rest of an epoch handed over from
    another layout of readers (see redeal.py).
    """

    shard: int | None
    stride: int = 1
    starts: tuple[tuple[int, int], ...] = ((0, 0),)  # (offset, first raw example kept)
    skip: int = 0
    split: int = 1
    split_index: int = 0
    resume_state: dict | None = None  # `datasets` state to start reading at (None: the stream's start)
    resume_at: int = 0  # raw index of the example that state starts at
    read_size: int = 0  # raw examples per read (0: the cursor's choice); a `datasets` state holds only with its own

    def keeps(self, raw: np.ndarray) -> np.ndarray:
        first = np.full(self.stride, np.iinfo(np.int64).max, dtype=np.int64)
        for offset, start in self.starts:
            first[offset] = start
        keep = (raw >= self.skip) & (raw >= first[raw % self.stride])
        if self.split > 1:
            keep &= (raw // self.stride) % self.split == self.split_index
        return keep

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "starts": [list(x) for x in self.starts]}

    @classmethod
    def from_dict(cls, d: dict) -> "Part":
        return cls(**{**d, "starts": tuple(tuple(x) for x in d["starts"])})


@dataclass(frozen=True)
class ReaderShare:
    """One reader's share of one source: its parts, read in order, make up one epoch."""

    parts: tuple[Part, ...]
    raw_per_epoch: int | None  # raw examples the reader scans per epoch, when known

    @property
    def mode(self) -> str:
        return "strided" if self.parts[0].shard is None else "shards"


def reader_share(
    n_shards: int, reader: int, num_readers: int, held_out: list[int] | None = None, sizes: list[int] | None = None
) -> ReaderShare:
    """Disjoint, complete assignment of a source's raw examples to `num_readers` readers.

    held_out[s]: raw examples at the head of shard s reserved for validation (they are
    the head of the whole stream: shards are carved in order).
    """
    held_out = held_out or [0] * n_shards
    if n_shards >= num_readers:
        shards = range(reader, n_shards, num_readers)
        raw = sum(sizes[s] for s in shards) if sizes else None
        return ReaderShare(tuple(Part(s, skip=held_out[s]) for s in shards), raw)
    raw = sum(sizes) if sizes else None
    return ReaderShare((Part(None, stride=num_readers, starts=((reader, 0),), skip=sum(held_out)),), raw)


# ---------------------------------------------------------------------------
# Reading one share, resumably.


class DocCursor:
    """Yields one reader's documents of one source, forever, epoch after epoch.

    Position = (epoch, part, the `datasets` state before the current chunk, raw index
    of the chunk's first example, documents of the chunk already handed out). Restoring
    it re-reads that one chunk and drops what was handed out, so the documents that
    follow are exactly those the uninterrupted cursor would have produced.

    After a change of layout (world size or workers) a cursor first reads the parts it
    was dealt of the epoch in progress (`transition`), then its own share, epoch after
    epoch.
    """

    def __init__(self, ds, share: ReaderShare, *, label: str, chunk_docs: int = 64, text_column: str = "text"):
        self._ds = ds
        self._share = share
        self._label = label
        self._column = text_column
        self._chunk_docs = chunk_docs
        self._transition: tuple[Part, ...] | None = None  # parts dealt from another layout, read first
        self.epoch = 0
        self._stream = 0  # index of the part being read
        self._chunk_state: dict | None = None  # datasets state before the current chunk (None: stream start)
        self._chunk_start = 0  # raw index (within the stream) of the current chunk's first example
        self._chunk_len = 0
        self._taken = 0
        self._docs: list[str] = []
        self._doc_raw: list[int] = []
        self._live = None  # the dataset object being iterated
        self._it = None
        self._raw_done = 0  # raw examples of finished streams in this epoch
        self._kept_in_epoch = 0
        self._done_raw = 0  # raw examples of the current stream behind the last document handed out
        self.raw_per_epoch = share.raw_per_epoch
        self.undecodable_bytes = 0

    @property
    def share(self) -> ReaderShare:
        return self._share

    @property
    def parts(self) -> tuple[Part, ...]:
        """The parts of the pass in progress."""
        return self._transition if self._transition is not None else self._share.parts

    # -- reading ------------------------------------------------------------
    def next_doc(self) -> str:
        while self._taken >= len(self._docs):
            self._next_chunk()
        doc = self._docs[self._taken]
        self._done_raw = self._doc_raw[self._taken] + 1
        self._taken += 1
        self._kept_in_epoch += 1
        return doc

    def _next_chunk(self) -> None:
        part = self.parts[self._stream]
        if self._it is None:
            # (Re)open the current stream at the current chunk.
            self._live = shard_dataset(self._ds, part.shard)
            if self._chunk_state is not None:
                self._live.load_state_dict(self._chunk_state)
            self._it = iter(self._live.iter(batch_size=self._read_size(part)))
        else:
            # Step past the chunk just used up.
            self._chunk_start += self._chunk_len
            self._chunk_state = self._live.state_dict()
            self._taken = 0
        before = _UNDECODABLE
        batch = next(self._it, None)
        self.undecodable_bytes += _UNDECODABLE - before
        if batch is None:
            self._end_of_stream()
            return
        if self._column not in batch.column_names:
            raise CorpusError(
                f"source {self._label!r} has no text field {self._column!r}; its fields are {batch.column_names}: "
                "pass --text_column with one of them"
            )
        column = batch.column(self._column)
        self._chunk_len = len(column)
        raw = np.arange(self._chunk_start, self._chunk_start + len(column))
        mine = np.flatnonzero(part.keeps(raw))
        texts = column.take(mine).to_pylist() if len(mine) < len(column) else column.to_pylist()
        keep = [(int(raw[i]), t) for i, t in zip(mine, texts) if t and not t.isspace()]
        self._docs = [t for _, t in keep]
        self._doc_raw = [i for i, _ in keep]  # raw index of each kept document, for progress

    def _read_size(self, part: Part) -> int:
        # Raw examples per read: ~chunk_docs kept, capped for readers that keep few of them.
        return part.read_size or min(self._chunk_docs * part.stride * part.split, MAX_RAW_PER_READ)

    def _enter(self, stream: int) -> None:
        part = self.parts[stream]
        self._stream, self._done_raw, self._taken, self._chunk_len = stream, 0, 0, 0
        self._chunk_state, self._chunk_start = copy.deepcopy(part.resume_state), part.resume_at
        self._docs, self._doc_raw, self._it, self._live = [], [], None, None

    def _end_of_stream(self) -> None:
        self._raw_done += self._chunk_start
        if self._stream + 1 < len(self.parts):
            self._enter(self._stream + 1)
            return
        if self._transition is not None:
            self._transition = None  # the dealt rest of the epoch is read: own share from here
        else:
            if self._kept_in_epoch == 0:
                raise CorpusError(
                    f"source {self._label!r} gives this reader no text at all ({self._share.mode} mode); "
                    "the corpus is too short for this many ranks x dataloader workers: use fewer, or more data"
                )
            self.raw_per_epoch = self._raw_done  # learned exactly after one pass
        self.epoch += 1
        self._raw_done, self._kept_in_epoch = 0, 0
        self._enter(0)

    def start_transition(self, parts: list[Part], epoch: int) -> None:
        """Read `parts` (the rest of epoch `epoch`, dealt from another layout), then the own share."""
        self._transition = tuple(parts) if parts else None
        self.epoch = epoch if parts else epoch + 1
        self._raw_done, self._kept_in_epoch = 0, 0
        self._enter(0)

    def remaining(self) -> list[Part]:
        """The parts of the pass in progress not yet handed out: the current one from just
        after the last document handed out, then the later ones."""
        parts = self.parts
        now = parts[self._stream]
        now = dataclasses.replace(
            now,
            starts=tuple((o, max(s, self._done_raw)) for o, s in now.starts),
            resume_state=copy.deepcopy(self._chunk_state),
            resume_at=self._chunk_start,
            read_size=self._read_size(now),  # the state was made reading this many at a time
        )
        return [now, *parts[self._stream + 1 :]]

    # -- progress -----------------------------------------------------------
    @property
    def epoch_fraction(self) -> float | None:
        if not self.raw_per_epoch or self._transition is not None:
            return None
        return min(1.0, (self._raw_done + self._done_raw) / self.raw_per_epoch)

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "stream": self._stream,
            "chunk_state": copy.deepcopy(self._chunk_state),
            "chunk_start": self._chunk_start,
            "taken": self._taken,
            "raw_done": self._raw_done,
            "kept_in_epoch": self._kept_in_epoch,
            "done_raw": self._done_raw,
            "raw_per_epoch": self.raw_per_epoch,
            "transition": None if self._transition is None else [p.to_dict() for p in self._transition],
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self._stream = state["stream"]
        self._chunk_state = copy.deepcopy(state["chunk_state"])
        self._chunk_start = state["chunk_start"]
        self._taken = state["taken"]
        self._raw_done = state["raw_done"]
        self._kept_in_epoch = state["kept_in_epoch"]
        self._done_raw = state["done_raw"]
        self.raw_per_epoch = state["raw_per_epoch"]
        transition = state["transition"]
        self._transition = None if transition is None else tuple(Part.from_dict(p) for p in transition)
        self._docs, self._doc_raw, self._it, self._live, self._chunk_len = [], [], None, None, 0


class DocMixer:
    """Draws each document from one of several cursors with fixed probabilities.

    Each source cycles on its own (a small source with a large weight is re-read, as
    weighting asks); the mixture's epoch is the number of full passes every source has
    completed. The draw uses its own seeded generator whose state is part of the
    position, so a resumed run draws the same sources in the same order.
    """

    def __init__(self, cursors: list[DocCursor], weights: list[float] | None, seed):
        self.cursors = cursors
        w = np.asarray(weights if weights is not None else [1.0] * len(cursors), dtype=np.float64)
        self._cum = np.cumsum(w / w.sum())
        self._rng = np.random.default_rng(seed)
        self._drawn = [c for c, x in zip(cursors, w) if x > 0]  # a zero-weight source never ends an epoch

    def next_doc(self) -> str:
        if len(self.cursors) == 1:
            return self.cursors[0].next_doc()
        i = min(int(np.searchsorted(self._cum, self._rng.random(), side="right")), len(self.cursors) - 1)
        return self.cursors[i].next_doc()

    @property
    def epoch(self) -> int:
        return min(c.epoch for c in self._drawn)

    @property
    def epoch_fraction(self) -> float | None:
        # The mixture's epoch ends when its slowest sources finish their pass.
        epoch = self.epoch
        behind = [c.epoch_fraction for c in self._drawn if c.epoch == epoch]
        return None if any(f is None for f in behind) else min(behind)

    @property
    def undecodable_bytes(self) -> int:
        return sum(c.undecodable_bytes for c in self.cursors)

    def reseed(self, seed) -> None:
        self._rng = np.random.default_rng(seed)

    def state_dict(self) -> dict:
        return {"rng": copy.deepcopy(self._rng.bit_generator.state), "cursors": [c.state_dict() for c in self.cursors]}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        for c, s in zip(self.cursors, state["cursors"], strict=True):
            c.load_state_dict(s)
