"""Build a local downstream task from WordNet, deterministically: the same bytes on every machine.

    python -m tamt_ds.downstream.build_task supersense_noun [--wordnet /usr/share/wordnet]
        [--exclude tamt_ds/data/sample/*.txt] [--output_dir tamt_ds/data/tasks/supersense_noun]

`supersense_noun`: WordNet 3.0 noun glosses (the definition, without the quoted examples)
labelled with their synset's lexicographer file (`noun.artifact`, `noun.person`, ... 26
classes, unbalanced) -- `supersense_verb` of ../shared/data for nouns, a single-sentence
classification task in the shape of SST-2.  The source is the Debian package `wordnet-base`
(`apt-get install wordnet-base`: /usr/share/wordnet/data.noun); the WordNet license travels
with the output (LICENSE.wordnet, from the package's copyright file).

Rows are chosen and split by a hash of the gloss, so a gloss never moves between splits and
a gloss shared by synsets of different lexicographer files (no single label) is dropped; a
fixed share of the buckets is kept so the task has supersense_verb's size.  A dev or test
gloss equal to a line of any `--exclude` file (the study's upstream text) is dropped, so no
held-out input is in the text a mask was searched on.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os

from tamt_ds.errors import InputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_WORDNET = "/usr/share/wordnet"
DEFAULT_EXCLUDE = os.path.join(REPO_ROOT, "tamt_ds", "data", "sample", "*.txt")
BUILT_TASKS = os.path.join(REPO_ROOT, "tamt_ds", "data", "tasks")  # the built tasks, shipped (a study finds them)
COPYRIGHT = "/usr/share/doc/wordnet-base/copyright"

# WordNet's lexicographer files 03-28 (lexnames(5WN)): the noun supersenses
NOUN_LEXNAMES = {i: "noun." + n for i, n in enumerate(
    "Tops act animal artifact attribute body cognition communication event feeling food group location "
    "motive object person phenomenon plant possession process quantity relation shape state substance time"
    .split(), start=3)}

# hash buckets (of 1000) per split: ~9.9k / ~1.3k / ~1.3k glosses of WordNet's 79k distinct noun glosses
SPLIT_BUCKETS = {"train": range(0, 125), "validation": range(125, 142), "test": range(142, 159)}


class BuildError(InputError):
    pass


def bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1000


def definition(gloss: str) -> str:
    """The gloss's definition: the text before its first quoted example, whitespace collapsed."""
    head = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return " ".join(head.split())


def read_noun_glosses(wordnet_dir: str) -> list[tuple[str, str]]:
    """(definition, lexicographer file) of every noun synset of data.noun, in file order."""
    path = os.path.join(wordnet_dir, "data.noun")
    if not os.path.isfile(path):
        raise BuildError(f"{path} not found: install the Debian package wordnet-base "
                         f"(apt-get install wordnet-base) or pass --wordnet DIR (a WordNet 3.0 dict folder)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # the license header
                continue
            fields, _, gloss = line.partition(" | ")
            lex_filenum = int(fields.split()[1])
            text = definition(gloss)
            if text and "\t" not in text:
                rows.append((text, NOUN_LEXNAMES[lex_filenum]))
    return rows


def read_excluded(patterns: list[str]) -> set[str]:
    lines = set()
    for pattern in patterns:
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise BuildError(f"--exclude {pattern!r} matches no file: name the upstream text files, "
                             f"e.g. tamt_ds/data/sample/*.txt")
        for p in paths:
            with open(p, encoding="utf-8") as f:
                lines |= {" ".join(line.split()) for line in f if line.strip()}
    return lines


def build_supersense_noun(wordnet_dir: str, exclude: set[str]) -> dict[str, list[tuple[str, str]]]:
    """split -> sorted (sentence, label) rows."""
    labels: dict[str, set[str]] = {}
    for text, label in read_noun_glosses(wordnet_dir):
        labels.setdefault(text, set()).add(label)
    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in SPLIT_BUCKETS}
    for text, found in labels.items():
        if len(found) != 1:  # the same definition under two supersenses: no single true label
            continue
        b = bucket(text)
        for name, buckets in SPLIT_BUCKETS.items():
            if b in buckets and (name == "train" or text not in exclude):
                splits[name].append((text, next(iter(found))))
    # a stable order that is not WordNet's (grouped by lexicographer file): by hash, then text
    return {name: sorted(rows, key=lambda r: (hashlib.sha256(r[0].encode()).hexdigest(), r)) for name, rows in
            splits.items()}


def write_task(splits: dict[str, list[tuple[str, str]]], output_dir: str, license_file: str) -> None:
    from tamt_ds.checkpoint import atomic_write_text

    if not os.path.isfile(license_file):
        raise BuildError(f"{license_file} not found: the WordNet license must travel with the task; "
                         f"install wordnet-base or pass --license FILE")
    os.makedirs(output_dir, exist_ok=True)
    for name, rows in splits.items():
        atomic_write_text(os.path.join(output_dir, f"{name}.tsv"),
                          "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    with open(license_file, encoding="utf-8") as f:
        atomic_write_text(os.path.join(output_dir, "LICENSE.wordnet"), f.read())


def main(argv=None) -> int:
    from tamt_ds.errors import run_cli

    ap = argparse.ArgumentParser(description="Build a local downstream task from WordNet (deterministic).")
    ap.add_argument("task", choices=["supersense_noun"])
    ap.add_argument("--wordnet", default=DEFAULT_WORDNET, help="WordNet 3.0 dict folder (Debian: wordnet-base)")
    ap.add_argument("--license", default=COPYRIGHT, help="the WordNet license to ship beside the task")
    ap.add_argument("--exclude", nargs="+", default=[DEFAULT_EXCLUDE],
                    help="upstream text files (globs): no dev or test input may equal one of their lines")
    ap.add_argument("--output_dir", default=None, help="default: tamt_ds/data/tasks/TASK")
    a = ap.parse_args(argv)

    def run():
        splits = build_supersense_noun(a.wordnet, read_excluded(a.exclude))
        out = a.output_dir or os.path.join(BUILT_TASKS, a.task)
        write_task(splits, out, a.license)
        print(f"{a.task}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f" rows -> {out}")

    return run_cli(run)


if __name__ == "__main__":
    from tamt_ds.errors import exit_process

    exit_process(main())
