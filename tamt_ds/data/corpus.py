"""The public corpus API: arguments, the resumable block loader, the validation batches.

Data flow on one rank, per DataLoader worker ("reader"):

    sources (datasets streaming) -> DocCursor per source (this reader's share)
      -> DocMixer (weights) -> Packer (tokenise, pack blocks) -> batch -> MLM corruption

Workers are torch DataLoader processes. Each yields (batch, its position after that
batch); the loader in the main process keeps the position of the last batch it handed
out from every worker, so `state_dict()` is exactly what the training loop consumed,
not what the workers prefetched. The DataLoader takes batches from workers strictly
round-robin, so the order is a pure function of the positions; on resume, physical
worker 0 takes the role of the logical worker whose batch is due next.

Stopping: the loader yields forever. A rank whose share of an epoch runs out starts its
next epoch, so ranks with uneven shards never wait on each other at a collective -- the
training loop stops every rank at the same step (max_steps). Epochs are per rank.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from . import redeal
from .errors import CorpusError
from .mlm import TRAIN_STREAM, MaskingSpec, corrupt, masking_spec
from .packing import BlockFormat, Packer, TextEncoder, block_format, join_documents
from .sources import (
    DocCursor,
    DocMixer,
    SourceSpec,
    examples_per_shard,
    hub_source,
    local_source,
    open_source,
    reader_share,
    column_texts,
    shard_dataset,
)
from .validation import carve_head, rank_batches, read_blocks

logger = logging.getLogger(__name__)

_SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")
_STATE_VERSION = 2
CHUNK_DOCS = 256  # documents tokenised per call: the fast tokenizer's batch path


def default_train_files() -> list[str]:
    """The real-text sample shipped with the package: ~1 MB of Python docs prose and
    ~0.6 MB of WordNet glosses and example sentences (two domains, long and short
    documents: a mask searched on one narrow domain specialises to it)."""
    return [os.path.join(_SAMPLE_DIR, "train.txt"), os.path.join(_SAMPLE_DIR, "wordnet_train.txt")]


# Per-document draw probabilities of the two default sources; WordNet lines are ~7x
# shorter, so this gives roughly 2:1 Python docs to WordNet by tokens.
DEFAULT_MIX_WEIGHTS = [0.2, 0.8]


def default_validation_files() -> list[str]:
    return [os.path.join(_SAMPLE_DIR, "validation.txt")]


@dataclass
class CorpusArguments:
    train_files: list[str] | None = field(
        default=None,
        metadata={"help": "Training text: files, globs or directories (.txt/.jsonl/.json/.parquet, optionally .gz/.zst). "
                  "Each entry is one source. Default: the shipped sample."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset(s), comma-separated (wikitext, wikipedia, bookcorpus, allenai/c4, "
                  "HuggingFaceFW/fineweb, or a local directory in hub layout). Streamed, never downloaded whole."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config(s), comma-separated, one per dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Hub split to train on."})
    text_column: str = field(default="text", metadata={"help": "Field holding the text in JSON Lines / Parquet / hub data."})
    mix_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per source (train_files entries, then hub datasets): probability of "
                                "drawing each document from that source. Default: equal."}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out text. Default: the hub validation split, else carved from the head of the first source."}
    )
    validation_blocks: int = field(default=32, metadata={"help": "Size of the fixed validation set in blocks (0: none)."})
    # 64 for the short embedded run: more block starts per token (measured better on short held-out text).
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per block, special tokens included (TAMT: 512)."})
    dataloader_num_workers: int = field(default=1, metadata={"help": "Reader processes per rank (0: read in the training process)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens selected for MLM (80/10/10)."})
    text_sample_by: str = field(
        default="line", metadata={"help": "Plain-text documents: 'line' (one per line), 'paragraph' (blank-line separated) or 'document' (one per file)."}
    )
    validation_split: str | None = field(default="validation", metadata={"help": "Hub split used as validation set when it exists."})
    allow_hub_strided: bool = field(
        default=False, metadata={"help": "Stream a hub dataset with fewer data files than readers anyway: every reader "
                                 "downloads the whole split each epoch. Default: refuse, naming python -m tamt_ds.data.prepare."}
    )


# ---------------------------------------------------------------------------
# Resolving arguments into sources.


def _split_names(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",")] if value else []


def _train_sources(args: CorpusArguments) -> tuple[list[SourceSpec], list[float] | None]:
    specs = [local_source(e, text_column=args.text_column, sample_by=args.text_sample_by) for e in args.train_files or []]
    names = _split_names(args.dataset_name)
    configs = _split_names(args.dataset_config_name) or [None] * len(names)
    if len(configs) != len(names):
        raise CorpusError(f"--dataset_config_name gives {len(configs)} configs for {len(names)} datasets; give one per dataset (comma-separated)")
    specs += [hub_source(n, c or None, split=args.dataset_split, text_column=args.text_column) for n, c in zip(names, configs)]
    weights = args.mix_weights
    if not specs:
        specs = [local_source(f) for f in default_train_files()]
        weights = weights or DEFAULT_MIX_WEIGHTS
    if weights is not None:
        if len(weights) != len(specs):
            raise CorpusError(
                f"--mix_weights has {len(weights)} values for {len(specs)} sources ({[s.label for s in specs]}); give one per source"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise CorpusError(f"--mix_weights must be non-negative with a positive sum, got {weights}")
    return specs, weights


def _uses_default_sample(args: CorpusArguments) -> bool:
    return not args.train_files and not args.dataset_name


def _validation_plan(args: CorpusArguments, train: list[SourceSpec]) -> tuple[str, list[SourceSpec]]:
    """('none' | 'files' | 'carve', validation sources). Same answer for loader and validation set."""
    if args.validation_blocks <= 0:
        return "none", []
    if args.validation_files:
        return "files", [local_source(e, text_column=args.text_column, sample_by=args.text_sample_by) for e in args.validation_files]
    if _uses_default_sample(args):
        return "files", [local_source(f) for f in default_validation_files()]
    first = train[0]
    if first.builder == "hub" and args.validation_split and args.validation_split != first.split:
        if _hub_has_split(first, args.validation_split):
            return "files", [hub_source(first.label, first.hub_config, split=args.validation_split, text_column=first.text_column)]
    return "carve", [first]


def _hub_has_split(spec: SourceSpec, split: str) -> bool:
    import datasets

    try:
        return split in datasets.get_dataset_split_names(spec.hub_name, spec.hub_config, revision=spec.hub_revision)
    except Exception:  # noqa: BLE001 - no split list: carve instead
        return False


# ---------------------------------------------------------------------------
# Everything a reader needs; pickled into DataLoader workers.


@dataclass
class _Plan:
    specs: list[SourceSpec]
    datasets: list[Any]
    sizes: list[list[int] | None]
    held_out: list[int] | None  # per shard of source 0, when validation is carved from it
    weights: list[float] | None
    encoder: TextEncoder
    fmt: BlockFormat
    masking: MaskingSpec | None
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # DataLoader processes (0: in-process)
    seed: int

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_readers(self) -> int:
        return self.world_size * self.readers_per_rank

    def reader_id(self, worker: int) -> int:
        return self.rank * self.readers_per_rank + worker

    def make_packer(self, worker: int) -> Packer:
        reader = self.reader_id(worker)
        cursors = []
        for i, (spec, ds) in enumerate(zip(self.specs, self.datasets)):
            held = self.held_out if i == 0 else None
            share = reader_share(ds.num_shards, reader, self.num_readers, held, self.sizes[i])
            cursors.append(DocCursor(ds, share, label=spec.label, text_column=spec.text_column))
        mixer = DocMixer(cursors, self.weights, seed=[self.seed % (1 << 63), reader])
        where = f"rank {self.rank} worker {worker} (reader {reader} of {self.num_readers})"
        return Packer(mixer, self.encoder, self.fmt, chunk_docs=CHUNK_DOCS, where=where)

    def batches(self, worker: int, state: dict | None) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
        """One logical worker's batches, forever, each with the worker's position after it."""
        packer = self.make_packer(worker)
        done = key_base = 0
        if state is not None:
            packer.load_state_dict(state["packer"])
            done, key_base = state["batches"], state["key_base"]
        b, w_count = self.batch_size, self.readers_per_rank
        while True:
            ids = np.stack([packer.next_block() for _ in range(b)])
            mask = np.ones_like(ids)
            # Position of each block in the rank's stream, then in the global stream: the
            # DataLoader hands out worker batches round-robin, so this is consumption order.
            # key_base: blocks consumed before a change of layout, so keys never repeat.
            first = (done * w_count + worker) * b
            keys = [key_base + (first + j) * self.world_size + self.rank for j in range(b)]
            batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
            if self.masking is not None:
                corrupted, labels = corrupt(ids, mask, keys, seed=self.seed, stream=TRAIN_STREAM, spec=self.masking)
                batch = {"input_ids": torch.from_numpy(corrupted), "attention_mask": batch["attention_mask"], "labels": torch.from_numpy(labels)}
            done += 1
            yield batch, {
                "worker": worker,
                "batches": done,
                "packer": packer.state_dict(),
                "epoch": packer.epoch,  # of the text handed out, not of the read-ahead
                "epoch_fraction": packer.epoch_fraction,
                "undecodable_bytes": packer.docs.undecodable_bytes,
                "key_base": key_base,
            }


class _RankStream(torch.utils.data.IterableDataset):
    """What each DataLoader worker process iterates: one logical worker's batches."""

    def __init__(self, plan: _Plan, states: list[dict | None], first_worker: int):
        self.plan, self.states, self.first_worker = plan, states, first_worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + self.first_worker) % self.plan.readers_per_rank
        return self.plan.batches(worker, self.states[worker])


def _last_line(message: str) -> str:
    line = message.strip().splitlines()[-1] if message.strip() else message
    prefix = f"{CorpusError.__module__}.{CorpusError.__name__}: "
    return line[len(prefix) :] if line.startswith(prefix) else line


def _identity(x):
    return x


def _worker_init(_):
    # As `datasets` does for its own workers: fsspec's async loop must not be shared
    # with the parent after fork, or remote (hub) reads can hang.
    try:
        import fsspec.asyn

        fsspec.asyn.reset_lock()
    except Exception:  # noqa: BLE001 - only matters for remote files
        pass


class BlockLoader:
    """This rank's training batches, forever, with an exact, checkpointable position."""

    def __init__(self, plan: _Plan):
        self._plan = plan
        self._states: list[dict | None] = [None] * plan.readers_per_rank
        self._next_worker = 0
        self.tokens_seen = 0
        self.blocks_seen = 0
        self._rate = collections.deque(maxlen=32)  # (time, blocks_seen) of recent batches

    # -- iteration ------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self._plan
        stream = _RankStream(plan, copy.deepcopy(self._states), self._next_worker)
        if plan.num_workers == 0:
            source = iter(stream)
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=plan.num_workers,
                    collate_fn=_identity,
                    worker_init_fn=_worker_init,
                    prefetch_factor=2,
                    persistent_workers=False,
                    # Its own generator: creating the iterator draws the workers' base seed,
                    # and a draw from the global torch RNG would shift the model's dropout
                    # stream (differently in a resumed run, which creates it at another step).
                    generator=torch.Generator().manual_seed(plan.seed % (1 << 63)),
                )
            )
        self._rate.clear()
        try:
            for batch, state in source:
                w = state["worker"]
                self._states[w] = state
                self._next_worker = (w + 1) % plan.readers_per_rank
                self.blocks_seen += batch["input_ids"].shape[0]
                self.tokens_seen += int(batch["attention_mask"].sum())
                self._rate.append((time.monotonic(), self.blocks_seen))
                yield batch
        except CorpusError as exc:
            # A worker's error arrives wrapped in torch's multi-line traceback text; keep
            # the one line that names the fix.
            raise CorpusError(_last_line(str(exc))) from None

    # -- progress -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return min((s["epoch"] if s else 0) for s in self._states)

    @property
    def epoch_fraction(self) -> float | None:
        """Fraction of this rank's current epoch read, where the sources know their size."""
        if any(s is None or s["epoch_fraction"] is None for s in self._states):
            return None
        mean = sum(s["epoch"] + s["epoch_fraction"] for s in self._states) / len(self._states)
        return float(min(1.0, max(0.0, mean - self.epoch)))

    @property
    def blocks_per_second(self) -> float | None:
        if len(self._rate) < 2:
            return None
        (t0, b0), (t1, b1) = self._rate[0], self._rate[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    @property
    def undecodable_bytes(self) -> int:
        return sum(s["undecodable_bytes"] for s in self._states if s)

    def progress(self) -> dict[str, float | int | None]:
        """For logs / TensorBoard: this rank's counters."""
        return {
            "tokens_seen": self.tokens_seen,
            "blocks_seen": self.blocks_seen,
            "blocks_per_second": self.blocks_per_second,
            "epoch": self.epoch,
            "epoch_fraction": self.epoch_fraction,
            "undecodable_bytes": self.undecodable_bytes,
        }

    # -- checkpointing --------------------------------------------------------
    def _layout(self, rank: int | None = None) -> dict:
        p = self._plan
        return {
            "world_size": p.world_size,
            "rank": p.rank if rank is None else rank,
            "readers_per_rank": p.readers_per_rank,
            "batch_size": p.batch_size,
            "max_seq_length": p.fmt.length,
            "sources": [s.label for s in p.specs],
        }

    def state_dict(self) -> dict:
        """This rank's exact data position (each rank saves its own). Plain Python, picklable."""
        return {
            "version": _STATE_VERSION,
            "layout": self._layout(),
            "workers": copy.deepcopy(self._states),
            "next_worker": self._next_worker,
            "tokens_seen": self.tokens_seen,
            "blocks_seen": self.blocks_seen,
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Continue from a saved position: this rank's own (`state_dict()` of the same rank
        in the same layout), or every rank's (a list in rank order), saved by any number
        of ranks and workers -- on another layout the rest of the epoch is re-dealt."""
        states = state if isinstance(state, list) else [state]
        for s in states:
            if s.get("version") != _STATE_VERSION:
                raise CorpusError(f"data position has version {s.get('version')}, this code reads {_STATE_VERSION}")
        if isinstance(state, list):
            if [s["layout"] for s in states] == [self._layout(rank=r) for r in range(len(states))] \
                    and len(states) == self._plan.world_size:
                state = states[self._plan.rank]
            else:
                self._redeal(states)
                return
        saved, now = state["layout"], self._layout()
        changed = {k: (saved[k], now[k]) for k in now if saved.get(k) != now[k]}
        if changed:
            detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise CorpusError(
                f"cannot resume the data position: {detail}; resume with the same world size, rank, workers, "
                "batch size, max_seq_length and sources, or pass every rank's position to re-deal it"
            )
        self._states = copy.deepcopy(state["workers"])
        self._next_worker = state["next_worker"]
        self.tokens_seen = state["tokens_seen"]
        self.blocks_seen = state["blocks_seen"]

    def _redeal(self, states: list[dict]) -> None:
        """Another world size or worker count: deal what the saved readers had not read of
        their epoch to this layout's readers (redeal.py), and take this rank's part."""
        plan, now = self._plan, self._layout()
        for s in states:
            for key in ("batch_size", "max_seq_length", "sources"):
                if s["layout"][key] != now[key]:
                    raise CorpusError(f"cannot resume the data position: {key} {s['layout'][key]} -> {now[key]}; "
                                      f"only the world size and the number of workers may change on resume")
        old = []
        for r, s in enumerate(states):
            old_plan = dataclasses.replace(plan, rank=r, world_size=len(states),
                                           num_workers=s["layout"]["readers_per_rank"])
            for w, worker in enumerate(s["workers"]):
                packer = old_plan.make_packer(w)
                if worker is not None:
                    packer.load_state_dict(worker["packer"])
                old.append(redeal.old_reader(packer))
        dealt = redeal.deal(old, plan.num_readers)
        key_base = sum(s["blocks_seen"] for s in states)  # every block consumed so far, all ranks
        self._states = []
        for w in range(plan.readers_per_rank):
            mine = dealt[plan.reader_id(w)]
            packer = plan.make_packer(w)
            packer.docs.reseed([plan.seed % (1 << 63), plan.reader_id(w), key_base])
            for cursor, parts, epoch in zip(packer.docs.cursors, mine.parts, mine.epochs):
                cursor.start_transition(parts, epoch)
            packer.start_with(np.concatenate(mine.carry) if mine.carry else np.empty(0, dtype=np.int32))
            self._states.append({"worker": w, "batches": 0, "packer": packer.state_dict(), "epoch": packer.epoch,
                                 "epoch_fraction": None, "undecodable_bytes": 0, "key_base": key_base})
        self._next_worker = 0
        # The counters are summed over ranks in the logs: rank 0 carries the totals.
        first = plan.rank == 0
        self.tokens_seen = sum(s["tokens_seen"] for s in states) if first else 0
        self.blocks_seen = key_base if first else 0


# ---------------------------------------------------------------------------
# Builders.


def _check_common(args: CorpusArguments, batch_size: int, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise CorpusError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise CorpusError(f"batch_size must be >= 1, got {batch_size}")
    if args.dataloader_num_workers < 0:
        raise CorpusError(f"dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")


def _check_hub_files(specs: list[SourceSpec], opened: list, num_readers: int, world_size: int, allowed: bool) -> None:
    """Refuse, at start, a hub source that every reader would stream whole (strided mode).

    A warning is not enough: at 64 readers it is 64 downloads of the split per epoch, and a
    hub time-out in any of them ends its rank hours into the run. `prepare` fixes it once."""
    for spec, ds in zip(specs, opened):
        if spec.builder != "hub" or ds.num_shards >= num_readers or allowed:
            continue
        config = f" --dataset_config_name {spec.hub_config}" if spec.hub_config else ""
        split = f" --dataset_split {spec.split}" if spec.split != "train" else ""
        raise CorpusError(
            f"hub dataset {spec.label!r} has {ds.num_shards} data file(s) for {num_readers} readers (world_size "
            f"{world_size} x {num_readers // world_size} workers), so every reader would stream the whole split each "
            f"epoch; write it to shared storage once in {num_readers} shards with `python -m tamt_ds.data.prepare "
            f"--dataset_name {spec.label}{config}{split} --num_shards {num_readers} --output_dir DIR` and train "
            "with --train_files DIR (or pass --allow_hub_strided to stream it anyway)"
        )


def _check_enough_text(plan: _Plan) -> None:
    """Fail at build time, not in a hang, when the corpus cannot give every reader a block.

    Reads the head of the sources only until enough text is seen (cheap for real corpora).
    """
    need = plan.num_readers * plan.fmt.body
    have = 0
    for i, ds in enumerate(plan.datasets):
        held = plan.held_out if i == 0 else None
        column = plan.specs[i].text_column
        for s in range(ds.num_shards):
            skip = held[s] if held else 0
            seen = 0
            for batch in shard_dataset(ds, s).iter(batch_size=CHUNK_DOCS):
                column_batch = column_texts(batch, column) or []
                texts = [t for j, t in enumerate(column_batch) if seen + j >= skip and t and not t.isspace()]
                seen += len(column_batch)
                have += len(join_documents(plan.encoder(texts), plan.fmt.doc_sep))
                if have >= need:
                    return
    raise CorpusError(
        f"corpus too short: it holds {have} text tokens (after any carved validation set), fewer than one block of "
        f"{plan.fmt.body} for each of the {plan.num_readers} readers (world_size={plan.world_size} x "
        f"{plan.readers_per_rank} workers); use more data, a smaller --max_seq_length or fewer ranks / workers"
    )


def with_default_corpus(data: CorpusArguments) -> CorpusArguments:
    """The shipped text where a job names none (search, IMP, head importance): the sample,
    mixed, with its held-out part."""
    if not data.train_files and not data.dataset_name:
        data.train_files = default_train_files()
        data.mix_weights = data.mix_weights or DEFAULT_MIX_WEIGHTS
        if not data.validation_files:
            data.validation_files = default_validation_files()
    return data


def build_block_loader(
    args: CorpusArguments, tokenizer, *, batch_size: int, rank: int, world_size: int, seed: int, mlm: bool
) -> BlockLoader:
    """This rank's training batch stream (see the module docstring)."""
    _check_common(args, batch_size, rank, world_size)
    fmt = block_format(tokenizer, args.max_seq_length)
    masking = masking_spec(tokenizer, args.mlm_probability) if mlm else None
    encoder = TextEncoder(tokenizer)
    specs, weights = _train_sources(args)
    opened = [open_source(s) for s in specs]
    _check_hub_files(specs, opened, world_size * max(1, args.dataloader_num_workers), world_size, args.allow_hub_strided)
    mode, _ = _validation_plan(args, specs)
    held_out = None
    if mode == "carve":
        held_out = carve_head(opened[0], encoder, fmt, args.validation_blocks, label=specs[0].label, column=specs[0].text_column).held_out
    plan = _Plan(
        specs=specs,
        datasets=opened,
        sizes=[examples_per_shard(s, d) for s, d in zip(specs, opened)],
        held_out=held_out,
        weights=weights,
        encoder=encoder,
        fmt=fmt,
        masking=masking,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=args.dataloader_num_workers,
        seed=seed,
    )
    _check_enough_text(plan)
    return BlockLoader(plan)


def build_validation_batches(
    args: CorpusArguments, tokenizer, *, batch_size: int, rank: int, world_size: int, seed: int, mlm: bool
) -> list[dict[str, torch.Tensor]]:
    """This rank's part of the fixed validation set; every rank gets the same number of batches."""
    _check_common(args, batch_size, rank, world_size)
    fmt = block_format(tokenizer, args.max_seq_length)
    masking = masking_spec(tokenizer, args.mlm_probability) if mlm else None
    encoder = TextEncoder(tokenizer)
    specs, _ = _train_sources(args)
    mode, vspecs = _validation_plan(args, specs)
    if mode == "none":
        return []
    if mode == "carve":
        carve = carve_head(open_source(vspecs[0]), encoder, fmt, args.validation_blocks, label=vspecs[0].label, column=vspecs[0].text_column)
        ids, masks = carve.input_ids, carve.attention_mask
    else:
        columns = {s.text_column for s in vspecs}
        opened = [open_source(s) for s in vspecs]
        if len(columns) > 1:  # pragma: no cover - one --text_column for all sources
            raise CorpusError(f"validation sources disagree on the text field: {sorted(columns)}")
        label = ", ".join(s.label for s in vspecs)
        ids, masks = read_blocks(opened, encoder, fmt, args.validation_blocks, label=label, column=columns.pop())
    return rank_batches(ids, masks, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, masking=masking)
