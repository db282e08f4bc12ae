"""Fine-tuning data: a task's raw splits and tokenised features, and the training batches."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tamt_ds import sharding
from tamt_ds.downstream.arguments import FinetuneArguments, data_dir_for
from tamt_ds.downstream.tasks import LOCAL_PREFIX, TaskSpec, _subset, load_task, tokenize_split

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class TaskData:
    spec: TaskSpec
    train: object  # datasets.Dataset of raw examples (the full train split)
    evals: dict  # split -> (raw examples, tokenised features)
    _cache: tuple = (None, None)  # (subset seed or None, train features): tokenised once per subset

    def train_examples(self, args: FinetuneArguments, seed: int):
        """The raw examples a seed trains on: the whole split, or its --train_subset drawn from the seed
        alone (so every mask and method fine-tuned with this seed sees the same examples)."""
        return _subset(self.train, args.train_subset, seed) if args.train_subset is not None else self.train

    def train_features(self, args: FinetuneArguments, tokenizer, seed: int):
        key = seed if args.train_subset is not None else None  # the subset depends on the seed
        if self._cache[1] is None or self._cache[0] != key:
            raw = self.train_examples(args, seed)
            self._cache = (key, tokenize_split(self.spec, raw, tokenizer, max_seq_length=args.max_seq_length,
                                               doc_stride=args.doc_stride, train=True))
        return self._cache[1]


def examples_sha256(examples) -> str:
    """A fingerprint of raw examples (their order included): results.json records the one each seed trained on."""
    digest = hashlib.sha256()
    for row in examples:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
    return digest.hexdigest()


def load_data(args: FinetuneArguments, name: str, tokenizer) -> TaskData:
    text_columns = tuple(c.strip() for c in args.text_columns.split(",")) if args.text_columns else None
    if args.tasks is not None and not name.startswith(LOCAL_PREFIX):
        text_columns = None  # a study may mix local and hub tasks: --text_columns is for the local ones
    spec, splits = load_task(name, data_dir=data_dir_for(args, name), text_columns=text_columns)
    if args.train_subset is not None:
        _subset(splits["train"], args.train_subset, 0)  # a bad N fails now, with the task's size in the message
    evals = {split: (splits[split], tokenize_split(spec, splits[split], tokenizer, max_seq_length=args.max_seq_length,
                                                   doc_stride=args.doc_stride, train=False))
             for split in spec.eval_splits}
    return TaskData(spec, splits["train"], evals)


def train_batches(features, collate, batch_size: int, seed: int):
    """Endless micro-batches of this rank's share, reshuffled every epoch (same order for a seed)."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(features, num_replicas=sharding.world_size(), rank=sharding.rank(),
                                 shuffle=True, seed=seed)
    loader = DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=collate)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1

