"""python -m tamt_ds.downstream.build_task: a task built from WordNet is the same bytes every time,
its splits share no input, no dev or test input is a line of the upstream text, and the shipped
copy (tamt_ds/data/tasks/supersense_noun) is what the script builds from the Debian package."""
import csv
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tamt_ds.downstream.build_task import bucket
from tests.conftest import ROOT

SHIPPED = ROOT / "tamt_ds" / "data" / "tasks" / "supersense_noun"
SAMPLE = ROOT / "tamt_ds" / "data" / "sample"
WORDNET = Path("/usr/share/wordnet")
SPLITS = ("train", "validation", "test")


def build(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tamt_ds.downstream.build_task", "supersense_noun", *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)


def read(directory: Path) -> dict[str, list[dict]]:
    out = {}
    for split in SPLITS:
        with open(directory / f"{split}.tsv", encoding="utf-8") as f:
            out[split] = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return out


def fake_wordnet(root: Path) -> Path:
    """data.noun in WordNet's format: a license header, 900 synsets over 3 lexicographer files (glosses
    with quoted examples), one definition under two files (no single label: dropped) in a kept bucket."""
    root.mkdir()
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by  \n",
             "  2 Princeton University under the following license.  \n"]
    for i in range(900):
        lex = (5, 6, 18)[i % 3]  # noun.animal, noun.artifact, noun.person
        lines.append(f"{i:08d} {lex:02d} n 01 thing{i} 0 000 | a  kind of thing number {i} seen here; "
                     f'"an example {i}"; "another"  \n')
    twin = next(t for t in (f"a definition under two files {k}" for k in range(100)) if bucket(t) < 159)  # kept
    lines.append(f'00900000 05 n 01 twin 0 000 | {twin}  \n')
    lines.append(f'00900001 18 n 01 twin 0 000 | {twin}; "example"  \n')
    (root / "data.noun").write_text("".join(lines), encoding="utf-8")
    (root / "copyright").write_text("WordNet 3.0 license (test copy)\n", encoding="utf-8")
    return root


def test_build_is_deterministic_and_excludes_upstream_lines(tmp_path):
    wn = fake_wordnet(tmp_path / "wn")
    (tmp_path / "empty.txt").write_text("\n")
    common = ["--wordnet", str(wn), "--license", str(wn / "copyright")]
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        proc = build(*common, "--exclude", str(tmp_path / "empty.txt"), "--output_dir", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (*[f"{s}.tsv" for s in SPLITS], "LICENSE.wordnet"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    rows = read(first)
    assert all(rows[s] for s in SPLITS)
    texts = {s: {r["sentence"] for r in rows[s]} for s in SPLITS}
    assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"]
                or texts["validation"] & texts["test"])
    everything = [r for s in SPLITS for r in rows[s]]
    assert all(r["sentence"].startswith("a kind of thing number") for r in everything)  # examples cut, spaces collapsed
    for r in everything:
        i = int(r["sentence"].split()[5])
        assert r["label"] == ("noun.animal", "noun.artifact", "noun.person")[i % 3]
    assert 0.10 < sum(map(len, texts.values())) / 900 < 0.22  # ~15.9% of the buckets kept
    assert (first / "LICENSE.wordnet").read_text() == (wn / "copyright").read_text()

    # a held-out gloss that is a line of the upstream text is dropped, a train one kept
    held_out, train = sorted(texts["validation"])[0], sorted(texts["train"])[0]
    (tmp_path / "upstream.txt").write_text(f"unrelated line\n{held_out}\n  {train}\n")
    proc = build(*common, "--exclude", str(tmp_path / "up*.txt"), "--output_dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows_c = read(tmp_path / "c")
    assert {r["sentence"] for r in rows_c["validation"]} == texts["validation"] - {held_out}
    assert {r["sentence"] for r in rows_c["train"]} == texts["train"]


def test_build_errors_are_one_line(tmp_path):
    proc = build("--wordnet", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o"))
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "apt-get install wordnet-base" in errors[0], proc.stderr
    assert not (tmp_path / "o").exists()


def test_shipped_task_is_disjoint_from_the_search_text():
    """No dev or test input of supersense_noun is a line of the text the study's masks are searched on."""
    sample = set()
    for f in SAMPLE.glob("*.txt"):
        sample |= {" ".join(line.split()) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    rows = read(SHIPPED)
    texts = {s: {r["sentence"] for r in rows[s]} for s in SPLITS}
    for split in ("validation", "test"):
        assert not texts[split] & sample, sorted(texts[split] & sample)[:3]
        assert not texts[split] & texts["train"]
    assert len(rows["train"]) > 9000 and len(rows["validation"]) > 1200 and len(rows["test"]) > 1200
    assert len({r["label"] for r in rows["train"]}) == 26
    assert (SHIPPED / "LICENSE.wordnet").is_file()


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="the Debian package wordnet-base is not installed "
                    "(apt-get install wordnet-base): the shipped copy cannot be rebuilt here")
def test_shipped_task_is_what_the_script_builds(tmp_path):
    proc = build("--output_dir", str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (*[f"{s}.tsv" for s in SPLITS], "LICENSE.wordnet"):
        assert filecmp.cmp(SHIPPED / name, tmp_path / "t" / name, shallow=False), name


def test_shipped_task_loads_as_a_local_task():
    """The harness reads it as a 26-class single-sentence task, as the study runs it."""
    from tamt_ds.downstream.tasks import load_task

    spec, splits = load_task(f"local:{SHIPPED}")
    assert spec.kind == "classification" and spec.num_labels == 26 and spec.text_columns == ("sentence",)
    assert spec.label_list[0] == "noun.Tops" and list(spec.label_list) == sorted(spec.label_list)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10156, "validation": 1392, "test": 1381}
