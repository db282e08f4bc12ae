"""python -m tamt_ds.data.prepare: a corpus written once as one Parquet shard per reader, and the
start-up refusal of a hub dataset that every reader would stream whole.

The hub is out of reach here (HF_HUB_OFFLINE): a local directory laid out like the wikitext-103
repository (its train split in 2 parquet files) goes through the same hub code path."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tamt_ds.data import CorpusError
from tamt_ds.data.prepare import PrepareArguments, prepare
from tests.conftest import ROOT
from tests.conftest_data import bodies, hub_repo, loader, make_args, pydoc_lines, stream_of, take, tok  # noqa: F401
from tests.conftest_data import write_jsonl, write_text

DOCS = pydoc_lines()[:90]
WITH_BLANKS = [d for i, doc in enumerate(DOCS) for d in ((doc, "", "   ") if i % 10 == 3 else (doc,))]


def rows(path) -> list[str]:
    return pq.read_table(path).column("text").to_pylist()


@pytest.fixture
def wikitext(tmp_path):
    return hub_repo(tmp_path / "wikitext", WITH_BLANKS, pydoc_lines("validation")[:20])


def test_hub_split_into_one_shard_per_reader(wikitext, tmp_path, tok):
    out = tmp_path / "corpora" / "wt103"
    paths = prepare(PrepareArguments(dataset_name=str(wikitext), dataset_config_name="wikitext-103-raw-v1",
                                     num_shards=3, output_dir=str(out)))
    names = sorted(os.listdir(out))
    assert names == [f"train-0000{i}-of-00003.parquet" for i in range(3)] and paths == [str(out / n) for n in names]
    # Contiguous ranges of the source's documents, in order, blank ones left out.
    assert [rows(p) for p in paths] == [DOCS[:30], DOCS[30:60], DOCS[60:]]
    assert not [n for n in os.listdir(out.parent) if n != "wt103"]  # no temporary left behind

    # --train_files DIR: on 3 readers each reads its own file (shard mode), on 1 the source in order.
    for rank in range(3):
        ld = loader(make_args(train_files=[str(out)]), tok, rank=rank, world_size=3)
        got, want = bodies(take(ld, 2)), stream_of(tok, DOCS[rank * 30:(rank + 1) * 30])
        assert np.array_equal(got, want[: len(got)]), rank  # its file's text, not every third document
    got, want = bodies(take(loader(make_args(train_files=[str(out)]), tok), 8)), stream_of(tok, DOCS)
    assert np.array_equal(got, want[: len(got)])


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_local_files(kind, tmp_path):
    if kind == "txt":
        src = write_text(tmp_path / "big.txt", WITH_BLANKS)
        extra = {}
    else:
        src = write_jsonl(tmp_path / "big.jsonl", WITH_BLANKS, field="body")
        extra = {"text_column": "body"}
    paths = prepare(PrepareArguments(train_files=[str(src)], num_shards=4, output_dir=str(tmp_path / "out"), **extra))
    got = [rows(p) for p in paths]
    assert [len(r) for r in got] == [22, 23, 22, 23] and sum(got, []) == DOCS  # 90 documents: i * 90 // 4


def test_a_hub_dataset_with_fewer_files_than_readers_is_refused_at_start(wikitext, tok):
    args = dict(dataset_name=str(wikitext), dataset_config_name="wikitext-103-raw-v1")
    loader(make_args(**args), tok, rank=1, world_size=2)  # 2 files, 2 readers: one file each
    with pytest.raises(CorpusError) as e:
        loader(make_args(**args, dataloader_num_workers=2), tok, rank=0, world_size=2)
    msg = str(e.value)
    assert "\n" not in msg and "2 data file(s) for 4 readers (world_size 2 x 2 workers)" in msg
    assert (f"python -m tamt_ds.data.prepare --dataset_name {wikitext} --dataset_config_name wikitext-103-raw-v1 "
            f"--num_shards 4 --output_dir DIR") in msg and "--train_files DIR" in msg and "--allow_hub_strided" in msg
    with pytest.raises(CorpusError, match="2 data file\\(s\\) for 3 readers"):
        loader(make_args(**args), tok, rank=2, world_size=3)
    # The explicit opt-in streams it in strided mode, as before: reader 2 keeps raw rows 2, 5, 8, ...
    got = bodies(take(loader(make_args(**args, allow_hub_strided=True), tok, rank=2, world_size=3), 2))
    want = stream_of(tok, [d for d in WITH_BLANKS[2::3] if d.strip()])
    assert np.array_equal(got, want[: len(got)])


def test_bad_input_writes_nothing(wikitext, tmp_path):
    hub = dict(dataset_name=str(wikitext), dataset_config_name="wikitext-103-raw-v1")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.parquet").write_bytes(b"mine")
    cases = [
        (dict(hub, output_dir=str(tmp_path / "taken"), num_shards=2), "already exists"),
        (dict(hub, output_dir=str(tmp_path / "many"), num_shards=91), "holds 90 documents, fewer than --num_shards 91"),
        (dict(hub, output_dir=str(tmp_path / "zero"), num_shards=0), "at least 1"),
        (dict(output_dir=str(tmp_path / "none"), num_shards=2), "name one source"),
        (dict(hub, train_files=[str(tmp_path)], output_dir=str(tmp_path / "both"), num_shards=2), "name one source"),
    ]
    for kw, message in cases:
        with pytest.raises(CorpusError, match=message):
            prepare(PrepareArguments(**kw))
    assert sorted(os.listdir(tmp_path)) == ["taken", "wikitext"]  # no output, no temporary directory
    assert (tmp_path / "taken" / "keep.parquet").read_bytes() == b"mine"


def test_command_line(wikitext, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "tamt_ds.data.prepare", "--dataset_name", str(wikitext),
                               "--dataset_config_name", "wikitext-103-raw-v1", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "wt103"
    ok = run("--num_shards", "2", "--output_dir", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"wrote 2 shards to {out}; train with --train_files {out}" in ok.stdout
    again = run("--num_shards", "2", "--output_dir", str(out))
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1 and "already exists" in errors[0], again.stderr[-2000:]
    assert sum((rows(out / n) for n in sorted(os.listdir(out))), []) == DOCS
