"""Sources: every local format, hub-layout datasets, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tamt_ds.data import CorpusError, build_validation_batches
from tamt_ds.data.sources import hub_source
from tests.conftest_data import (
    bodies,
    deadline,
    hub_repo,
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

DOCS = pydoc_lines()[:240]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    paths = {
        "txt": write_text(d / "docs.txt", DOCS),
        "txt.gz": write_text(d / "docs.txt.gz", DOCS),
        "txt.zst": write_text(d / "docs.txt.zst", DOCS),
        "jsonl": write_jsonl(d / "docs.jsonl", DOCS),
        "jsonl.gz": write_jsonl(d / "docs.jsonl.gz", DOCS),
        "jsonl.zst": write_jsonl(d / "docs.jsonl.zst", DOCS),
        "parquet": write_parquet(d / "docs.parquet", DOCS),
    }
    # Blank-line separated paragraphs, each broken over two lines (a line break is
    # whitespace to the tokenizer, so the tokens are those of the one-line documents).
    para = [doc.replace(" ", "\n", 1) for doc in DOCS]
    paths["paragraphs"] = write_text(d / "paragraphs.txt", para, sep="\n\n")
    parts = d / "parts"
    parts.mkdir()
    for i in range(3):
        write_text(parts / f"part-{i}.txt", DOCS[i * 80 : (i + 1) * 80])
    paths["directory"] = parts
    paths["glob"] = str(parts / "part-*.txt")
    return paths


@pytest.mark.parametrize("fmt", ["txt", "txt.gz", "txt.zst", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "paragraphs", "directory", "glob"])
def test_every_format_gives_the_same_blocks(fmt, corpora, tok):
    sample_by = "paragraph" if fmt == "paragraphs" else "line"
    ld = loader(make_args(train_files=[str(corpora[fmt])], text_sample_by=sample_by), tok)
    want = stream_of(tok, DOCS)
    n_batches = len(want) // (62 * 4) + 2  # a bit more than one epoch of 4 x 64-token blocks
    got = bodies(take(ld, n_batches))
    assert np.array_equal(got[: len(want)], want)
    assert np.array_equal(got[len(want) :], want[: len(got) - len(want)])  # next epoch starts over


def test_document_per_file(tmp_path, tok):
    files = [write_text(tmp_path / f"book{i}.txt", DOCS[i * 5 : i * 5 + 5]) for i in range(4)]
    ld = loader(make_args(train_files=[str(tmp_path)], text_sample_by="document", max_seq_length=32), tok)
    want = stream_of(tok, [f.read_text() for f in files])
    got = bodies(take(ld, len(want) // (30 * 4) + 1))
    assert np.array_equal(got[: len(want)], want[: len(got)])
    # one separator per file, not per line
    assert int((want == tok.sep_token_id).sum()) == 4


def test_text_column_of_jsonl_and_parquet(tmp_path, tok):
    j = write_jsonl(tmp_path / "a.jsonl", DOCS[:60], field="body")
    p = write_parquet(tmp_path / "a.parquet", DOCS[:60], field="content")
    want = stream_of(tok, DOCS[:60])
    for path, col in [(j, "body"), (p, "content")]:
        got = bodies(take(loader(make_args(train_files=[str(path)], text_column=col), tok), 8))
        assert np.array_equal(got, want[: len(got)])


def _hub_repo(root, with_validation=True):
    return hub_repo(root, DOCS, pydoc_lines("validation")[:80] if with_validation else None)


def test_hub_dataset_path_with_hub_layout(tmp_path, tok):
    repo = _hub_repo(tmp_path / "wikitext")
    args = make_args(dataset_name=str(repo), dataset_config_name="wikitext-103-raw-v1", validation_blocks=8)
    ld = loader(args, tok)
    want = stream_of(tok, DOCS)
    got = bodies(take(ld, 10))
    assert np.array_equal(got, want[: len(got)])
    # The validation set comes from the repository's validation split, not the train stream.
    val = build_validation_batches(args, tok, batch_size=4, rank=0, world_size=1, seed=0, mlm=False)
    vwant = stream_of(tok, pydoc_lines("validation")[:80])
    assert len(val) == 2
    assert np.array_equal(bodies(val), vwant[: 8 * 62])


def test_hub_dataset_without_validation_split_is_carved(tmp_path, tok):
    repo = _hub_repo(tmp_path / "wikitext", with_validation=False)
    args = make_args(dataset_name=str(repo), dataset_config_name="wikitext-103-raw-v1", validation_blocks=4)
    val = build_validation_batches(args, tok, batch_size=4, rank=0, world_size=1, seed=0, mlm=False)
    want = stream_of(tok, DOCS)
    assert np.array_equal(bodies(val), want[: 4 * 62])


def test_hub_aliases():
    w = hub_source("wikitext")
    assert (w.hub_name, w.hub_config) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    assert hub_source("wikitext", "wikitext-2-raw-v1").hub_config == "wikitext-2-raw-v1"
    assert hub_source("wikipedia").hub_name == "wikimedia/wikipedia"
    assert hub_source("allenai/c4").hub_config == "en"
    assert hub_source("HuggingFaceFW/fineweb").hub_name == "HuggingFaceFW/fineweb"


def test_unreachable_hub_says_so_and_how_to_pass_files(monkeypatch, tok):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError) as e:
        loader(make_args(dataset_name="wikitext", dataset_config_name="wikitext-103-raw-v1"), tok)
    msg = str(e.value)
    assert "unreachable" in msg and "--train_files" in msg and "\n" not in msg


# ---------------------------------------------------------------------------
# Bad input: one line naming the fix.


def _error(tok, **kw) -> str:
    with pytest.raises(CorpusError) as e:
        loader(make_args(**kw), tok)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_file_and_empty_glob(tmp_path, tok):
    assert "not found" in _error(tok, train_files=[str(tmp_path / "nope.txt")])
    assert "matched no files" in _error(tok, train_files=[str(tmp_path / "*.txt")])
    (tmp_path / "empty").mkdir()
    assert "holds no corpus files" in _error(tok, train_files=[str(tmp_path / "empty")])


def test_unknown_and_mixed_formats(tmp_path, tok):
    write_text(tmp_path / "a.csv", DOCS[:3])
    assert "unknown corpus file type" in _error(tok, train_files=[str(tmp_path / "a.csv")])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_text(mixed / "a.txt", DOCS[:50])
    write_jsonl(mixed / "b.jsonl", DOCS[50:100])
    assert "mixes file formats" in _error(tok, train_files=[str(mixed)])


def test_missing_text_field_names_the_fields(tmp_path, tok):
    j = write_jsonl(tmp_path / "a.jsonl", DOCS[:50], field="body")
    msg = _error(tok, train_files=[str(j)])
    assert "'text'" in msg and "body" in msg and "id" in msg and "--text_column" in msg
    p = write_parquet(tmp_path / "a.parquet", DOCS[:50], field="content")
    msg = _error(tok, train_files=[str(p)])
    assert "content" in msg and "--text_column" in msg


def test_mix_weights_must_match_sources(corpora, tok):
    msg = _error(tok, train_files=[str(corpora["txt"]), str(corpora["jsonl"])], mix_weights=[1.0])
    assert "--mix_weights" in msg and "2 sources" in msg


def test_too_short_corpus_fails_at_build_time(tmp_path, tok):
    f = write_text(tmp_path / "short.txt", DOCS[:2])  # ~2 blocks of 64 tokens
    with pytest.raises(CorpusError, match="corpus too short"):
        loader(make_args(train_files=[str(f)]), tok, world_size=8)
    loader(make_args(train_files=[str(f)]), tok, world_size=1)  # enough for one rank


def test_one_rank_without_a_block_fails_on_first_batch_not_hang(tmp_path, tok):
    # Two files = shard mode over two ranks: rank 1 owns a file far shorter than a block,
    # while the corpus as a whole has plenty.
    write_text(tmp_path / "a.txt", DOCS[:200])
    write_text(tmp_path / "b.txt", ["Tiny."])
    args = make_args(train_files=[str(tmp_path)])
    ok = loader(args, tok, rank=0, world_size=2)
    short = loader(args, tok, rank=1, world_size=2)
    with deadline(60):
        take(ok, 3)
        with pytest.raises(CorpusError, match="corpus too short"):
            take(short, 1)
    # The same from a DataLoader worker process: still one line, still no hang.
    write_text(tmp_path / "c.txt", DOCS[100:200])
    write_text(tmp_path / "d.txt", DOCS[:100])
    args = make_args(train_files=[str(tmp_path)], dataloader_num_workers=2)  # 4 files, 4 readers: b.txt is rank 0 worker 1's
    with deadline(60), pytest.raises(CorpusError, match="corpus too short: a full pass gives rank 0 worker 1") as e:
        take(loader(args, tok, rank=0, world_size=2), 3)
    assert "\n" not in str(e.value)


def test_undecodable_bytes_are_skipped_and_counted(tmp_path, tok):
    # More documents than one tokenisation chunk (256), so the few batches taken read
    # each file once: the count is per read.
    good = pydoc_lines()[:400]
    lines = [d.encode() for d in good[:30]] + [b"broken \xff\xfe line"] + [d.encode() for d in good[30:]]
    (tmp_path / "bad.txt").write_bytes(b"\n".join(lines) + b"\n")
    ld = loader(make_args(train_files=[str(tmp_path / "bad.txt")]), tok)
    got = bodies(take(ld, 6))
    want = stream_of(tok, good[:30] + ["broken  line"] + good[30:])
    assert np.array_equal(got, want[: len(got)])
    assert ld.undecodable_bytes == 2

    rows = [json.dumps({"text": "first \u00e9t\u00e9 row"}, ensure_ascii=False).encode(), b'{"text": "broken \xff\xfe\xfd row"}']
    rows += [json.dumps({"text": d}).encode() for d in good]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    ld = loader(make_args(train_files=[str(tmp_path / "bad.jsonl")]), tok)
    got = bodies(take(ld, 6))
    want = stream_of(tok, ["first \u00e9t\u00e9 row", "broken  row"] + good)
    assert np.array_equal(got, want[: len(got)])
    assert ld.undecodable_bytes == 3
