"""Downstream tasks: what each task is, how its data loads, how it is tokenised.

API
---
TaskError(ValueError)
    Every bad-input error of the downstream harness; a one-line message that names
    the fix.
TaskSpec
    Frozen description of a task: name, kind ("classification" | "regression" |
    "squad"), num_labels, label_list, text_columns, main_metric, eval_splits,
    version_2 (SQuAD 2.0 only).
KNOWN_TASKS
    cola sst2 mrpc stsb qqp mnli qnli rte wnli squad squad_v2; any "local:DIR" too.
load_task(name, *, data_dir=None, text_columns=None, train_subset=None, seed=0)
    -> (TaskSpec, {"train": Dataset, <eval split>: Dataset, ...})
    GLUE and SQuAD come from the hub ("nyu-mll/glue", "rajpurkar/squad[_v2]")
    unless data_dir points at the original files (GLUE TSVs; SQuAD JSON).
    "local:DIR" reads DIR/{train,validation}.tsv (+ optional test.tsv).
    Classification / regression splits have the columns `text_columns` + "label"
    (ClassLabel ints / float32); SQuAD splits have id, title, context, question,
    answers{text, answer_start} (the hub's schema).
tokenize_split(spec, ds, tokenizer, *, max_seq_length, doc_stride=128, train,
               max_query_length=64) -> Dataset
    Model-ready features, unpadded (pad per batch with DataCollatorWithPadding).
    Classification / regression: input_ids, attention_mask, [token_type_ids],
    labels. SQuAD: one row per doc-stride window; train adds start_positions /
    end_positions, eval adds example_id and offset_mapping (None outside the
    context) -- drop those two before collating.
metric_key(split, metric) -> str
    Flat name of a metric of one eval split: "validation" keeps the bare name,
    "validation_matched" -> "matched_<metric>", "test" -> "test_<metric>".
MAIN_METRICS
    Task name -> main metric key (the "best dev score" and the paper average).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import datasets
from datasets import ClassLabel, Dataset, Features, Value

from tamt_ds.errors import InputError

HUB_GLUE = "nyu-mll/glue"
HUB_SQUAD = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
LOCAL_PREFIX = "local:"
# Integer labels with at most this many distinct values are classes (e.g. 0/1,
# 1..5 stars); more distinct integers, or any non-integer number, mean regression.
MAX_INTEGER_CLASSES = 20


class TaskError(InputError):
    """Bad task input; the message is one line and says how to fix it."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["classification", "regression", "squad"]
    num_labels: int  # classes; 1 for regression; 2 (start/end logits) for SQuAD
    label_list: tuple[str, ...] | None  # class names, index = label id; None otherwise
    text_columns: tuple[str, ...]  # one or two text inputs, in model order
    main_metric: str  # key in the flat eval metrics (see metric_key)
    eval_splits: tuple[str, ...]  # first one is "the dev set" for best-dev selection
    version_2: bool = False  # SQuAD 2.0: unanswerable questions exist

    @property
    def head(self) -> str:
        """The model head (models.task_model_class): SQuAD's start/end logits, else a classifier."""
        return "question_answering" if self.kind == "squad" else "classification"


def metric_key(split: str, metric: str) -> str:
    """Flat metric name for `metric` computed on eval split `split`."""
    if split == "validation":
        return metric
    return f"{split.removeprefix('validation_')}_{metric}"


# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class _Glue:
    folder: str  # directory name in the GLUE distribution
    text_columns: tuple[str, ...]  # canonical (hub) column names
    tsv_text_columns: tuple[str, ...]  # the columns of the original TSV holding them
    tsv_label_column: str
    label_list: tuple[str, ...] | None  # hub ClassLabel names; None = regression
    main_metric: str
    dev_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)
    # Only CoLA's train/dev files have no header row: these are its columns.
    headerless_columns: tuple[str, ...] | None = None


_GLUE: dict[str, _Glue] = {
    "cola": _Glue("CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"), "mcc",
                  headerless_columns=("source", "label", "original_label", "sentence")),
    "sst2": _Glue("SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"), "accuracy"),
    # The papers this project follows (Chen et al. 2020; TAMT) report accuracy for
    # MRPC and QQP; F1 is computed and reported beside it.
    "mrpc": _Glue("MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                  ("not_equivalent", "equivalent"), "accuracy"),
    "stsb": _Glue("STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None, "pearson"),
    "qqp": _Glue("QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 ("not_duplicate", "duplicate"), "accuracy"),
    "mnli": _Glue("MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                  ("entailment", "neutral", "contradiction"), metric_key("validation_matched", "accuracy"),
                  dev_files=(("validation_matched", "dev_matched.tsv"),
                             ("validation_mismatched", "dev_mismatched.tsv"))),
    "qnli": _Glue("QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                  ("entailment", "not_entailment"), "accuracy"),
    "rte": _Glue("RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("entailment", "not_entailment"), "accuracy"),
    "wnli": _Glue("WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                  ("not_entailment", "entailment"), "accuracy"),
}
KNOWN_TASKS: tuple[str, ...] = (*_GLUE, "squad", "squad_v2")
MAIN_METRICS: dict[str, str] = {**{n: g.main_metric for n, g in _GLUE.items()}, "squad": "f1", "squad_v2": "f1"}


def _features(text_columns: Sequence[str], label_list: Sequence[str] | None) -> Features:
    label = ClassLabel(names=list(label_list)) if label_list is not None else Value("float32")
    return Features({**{c: Value("string") for c in text_columns}, "label": label})


def _tsv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:  # -sig: MRPC's header starts with a BOM
        return [c.strip() for c in f.readline().rstrip("\r\n").split("\t")]


def _read_tsv(path: Path, columns: Sequence[str] | None = None) -> Dataset:
    """Every cell of a TSV as a string. `columns` names a header-less file's columns.

    quoting off: GLUE text holds unbalanced quotes that are part of the sentence;
    keep_default_na off: "null" / "NA" / "nan" are real sentences (QQP has them);
    all-string features: chunked pandas reads must not guess a type per chunk.
    """
    names = list(columns) if columns is not None else _tsv_header(path)
    return datasets.load_dataset(
        "csv", data_files={"rows": str(path)}, split="rows", delimiter="\t", quoting=csv.QUOTE_NONE,
        keep_default_na=False, header=None if columns is not None else 0, column_names=names,
        features=Features({n: Value("string") for n in names}), on_bad_lines="warn",
    )


def _glue_label(raw: str, label_list: tuple[str, ...] | None, where: str) -> int | float:
    if label_list is None:
        try:
            return float(raw)
        except ValueError:
            raise TaskError(f"{where}: label {raw!r} is not a number; a regression task needs numeric labels") from None
    if raw in label_list:
        return label_list.index(raw)
    if raw.isdigit() and int(raw) < len(label_list):  # CoLA/SST-2/MRPC/QQP/WNLI store 0/1
        return int(raw)
    raise TaskError(f"{where}: label {raw!r} is not one of {list(label_list)} (or their ids); fix or drop that row")


def _glue_from_tsv(path: Path, g: _Glue) -> Dataset:
    ds = _read_tsv(path, g.headerless_columns)
    need = [*g.tsv_text_columns, g.tsv_label_column]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise TaskError(f"{path}: missing column(s) {missing}; found {ds.column_names}; "
                        f"pass the original GLUE {g.folder} files")

    def convert(batch: dict[str, list]) -> dict[str, list]:
        # Rows with an empty label are the corrupt short lines of QQP; the hub
        # loader drops them too.
        keep = [i for i, y in enumerate(batch[g.tsv_label_column]) if y != ""]
        out = {c: [batch[s][i] for i in keep] for c, s in zip(g.text_columns, g.tsv_text_columns)}
        out["label"] = [_glue_label(batch[g.tsv_label_column][i], g.label_list, str(path)) for i in keep]
        return out

    return ds.map(convert, batched=True, remove_columns=ds.column_names,
                  features=_features(g.text_columns, g.label_list))


def _glue_local(name: str, g: _Glue, data_dir: str) -> dict[str, Dataset]:
    root = Path(data_dir)
    # Accept the GLUE root (with CoLA/, SST-2/, ...) or the task folder itself.
    task_dir = root / g.folder if (root / g.folder).is_dir() else root
    files = [("train", "train.tsv"), *g.dev_files]
    absent = [f for _, f in files if not (task_dir / f).is_file()]
    if absent:
        found = sorted(p.name for p in task_dir.iterdir()) if task_dir.is_dir() else "no such directory"
        raise TaskError(f"{name}: {task_dir} lacks {absent} (found: {found}); point data_dir at the GLUE root "
                        f"or its {g.folder}/ folder in the original layout")
    return {split: _glue_from_tsv(task_dir / f, g) for split, f in files}


def _hub_load(repo: str, config: str | None = None) -> datasets.DatasetDict:
    """The hub download; a failure becomes a TaskError that says how to go local."""
    try:
        return datasets.load_dataset(repo, config) if config else datasets.load_dataset(repo)
    except OSError as e:  # ConnectionError, offline mode, dataset not found, HTTP errors
        what = f"{repo}" + (f" ({config})" if config else "")
        first = str(e).splitlines()[0] if str(e) else ""
        raise TaskError(f"cannot load {what} from the hub ({type(e).__name__}: {first}); "
                        f"pass data_dir=DIR with the original files instead (see docs/downstream.md)") from e


def _glue_hub(name: str, g: _Glue) -> dict[str, Dataset]:
    dd = _hub_load(HUB_GLUE, name)
    out = {}
    for split in ("train", *(s for s, _ in g.dev_files)):
        ds = dd[split]
        hub_label = ds.features["label"]
        if g.label_list is not None and list(getattr(hub_label, "names", [])) != list(g.label_list):
            raise TaskError(f"{HUB_GLUE}/{name}: hub labels {getattr(hub_label, 'names', hub_label)} "
                            f"differ from {list(g.label_list)}; pass data_dir with the GLUE TSVs")
        out[split] = ds.select_columns([*g.text_columns, "label"]).cast(_features(g.text_columns, g.label_list))
    return out


def _glue_spec(name: str, g: _Glue) -> TaskSpec:
    return TaskSpec(
        name=name, kind="classification" if g.label_list else "regression",
        num_labels=len(g.label_list) if g.label_list else 1, label_list=g.label_list,
        text_columns=g.text_columns, main_metric=g.main_metric, eval_splits=tuple(s for s, _ in g.dev_files),
    )


# -------------------------------------------------------------------------- local


def _finite_float(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _infer_labels(labels: Sequence[str]) -> tuple[str, ...] | None:
    """Class names (sorted) for a classification task; None for regression."""
    distinct = set(labels)
    values = [_finite_float(x) for x in distinct]
    if all(v is not None for v in values):
        if not all(v == int(v) for v in values) or len(distinct) > MAX_INTEGER_CLASSES:
            return None
        return tuple(sorted(distinct, key=float))  # numeric order: "2" before "10"
    return tuple(sorted(distinct))


def _pick_text_columns(columns: list[str], chosen: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if chosen is not None:
        chosen = tuple(chosen)
        missing = [c for c in chosen if c not in columns]
        if not 1 <= len(chosen) <= 2 or missing:
            raise TaskError(f"{where}: text_columns must be 1 or 2 of the file's columns {columns}; "
                            f"got {list(chosen)}")
        return chosen
    if "sentence1" in columns and "sentence2" in columns:
        if "sentence" in columns:
            raise TaskError(f"{where}: has both sentence and sentence1/sentence2 ({columns}); "
                            f"choose with text_columns")
        return ("sentence1", "sentence2")
    if "sentence" in columns:
        return ("sentence",)
    raise TaskError(f"{where}: no text column: found {columns}; name them 'sentence' or "
                    f"'sentence1'+'sentence2', or pass text_columns")


def _load_local(name: str, directory: str, text_columns: Sequence[str] | None) -> tuple[TaskSpec, dict[str, Dataset]]:
    root = Path(directory)
    if not root.is_dir():
        raise TaskError(f"{name}: {root} is not a directory; local:DIR needs DIR/train.tsv and DIR/validation.tsv")
    absent = [f for f in ("train.tsv", "validation.tsv") if not (root / f).is_file()]
    if absent:
        raise TaskError(f"{name}: {root} lacks {absent} (found: {sorted(p.name for p in root.iterdir())}); "
                        f"local:DIR needs train.tsv and validation.tsv with a header row")
    raw = {"train": _read_tsv(root / "train.tsv"), "validation": _read_tsv(root / "validation.tsv")}
    if (root / "test.tsv").is_file():
        test = _read_tsv(root / "test.tsv")
        if "label" in test.column_names:  # an unlabelled test set cannot be scored: skip it
            raw["test"] = test

    cols = _pick_text_columns(raw["train"].column_names, text_columns, str(root / "train.tsv"))
    for split, ds in raw.items():
        where = str(root / f"{split}.tsv")
        missing = [c for c in (*cols, "label") if c not in ds.column_names]
        if missing:
            raise TaskError(f"{where}: missing column(s) {missing}; found {ds.column_names}")
        empty = list(ds["label"]).count("")
        if empty:
            raise TaskError(f"{where}: {empty} row(s) with an empty label; every row needs a label")

    label_list = _infer_labels(list(raw["train"]["label"]))
    for split, ds in raw.items():
        where = str(root / f"{split}.tsv")
        if label_list is not None:
            unknown = sorted(set(list(ds["label"])) - set(label_list))
            if unknown:
                raise TaskError(f"{where}: label(s) {unknown[:5]} not in train's label set {list(label_list)[:20]}; "
                                f"add them to train.tsv or drop those rows")
        elif any(_finite_float(y) is None for y in list(ds["label"])):
            bad = next(y for y in list(ds["label"]) if _finite_float(y) is None)
            raise TaskError(f"{where}: label {bad!r} is not a number, but train's labels make this a regression task")

    index = {y: i for i, y in enumerate(label_list or ())}
    features = _features(cols, label_list)

    def convert(batch: dict[str, list]) -> dict[str, list]:
        out = {c: batch[c] for c in cols}
        out["label"] = [index[y] for y in batch["label"]] if label_list else [float(y) for y in batch["label"]]
        return out

    splits = {s: ds.map(convert, batched=True, remove_columns=ds.column_names, features=features)
              for s, ds in raw.items()}
    kind = "classification" if label_list else "regression"
    spec = TaskSpec(
        name=name, kind=kind, num_labels=len(label_list) if label_list else 1, label_list=label_list,
        text_columns=cols, main_metric="accuracy" if label_list else "pearson",
        eval_splits=tuple(s for s in ("validation", "test") if s in splits),
    )
    return spec, splits


# -------------------------------------------------------------------------- SQuAD

SQUAD_FEATURES = Features({
    "id": Value("string"), "title": Value("string"), "context": Value("string"), "question": Value("string"),
    "answers": {"text": datasets.List(Value("string")), "answer_start": datasets.List(Value("int32"))},
})
_SQUAD_FILES = {"squad": ("train-v1.1.json", "dev-v1.1.json"), "squad_v2": ("train-v2.0.json", "dev-v2.0.json")}
_SQUAD_LAYOUT = ('{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
                 '"answers": [{"text", "answer_start"}], "is_impossible"?}]}]}]}')


def read_squad_json(path: str | os.PathLike, *, version_2: bool) -> Dataset:
    """Flatten an official SQuAD JSON file into the hub's row schema."""
    path = Path(path)

    def bad(what: str) -> TaskError:
        return TaskError(f"{path}: not in the official SQuAD layout ({what}); expected {_SQUAD_LAYOUT}")

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise bad(f"invalid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise bad("no top-level 'data' list")
    rows: list[dict[str, Any]] = []
    for a, article in enumerate(doc["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise bad(f"data[{a}] has no 'paragraphs' list")
        for p, para in enumerate(article["paragraphs"]):
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) \
                    or not isinstance(para.get("qas"), list):
                raise bad(f"data[{a}].paragraphs[{p}] needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(para["qas"]):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), str) \
                        or not isinstance(qa.get("question"), str):
                    raise bad(f"{where} needs 'id' and 'question' strings")
                impossible = bool(qa.get("is_impossible", False))
                if impossible and not version_2:
                    raise bad(f"{where} is_impossible in a v1.1 file; load it as squad_v2")
                answers = [] if impossible else qa.get("answers")
                if not isinstance(answers, list) or not all(
                        isinstance(x, dict) and isinstance(x.get("text"), str) and isinstance(x.get("answer_start"), int)
                        for x in answers):
                    raise bad(f"{where} needs an 'answers' list of {{'text', 'answer_start'}}")
                if not answers and not version_2:
                    raise bad(f"{where} has no answer, which only SQuAD 2.0 allows")
                rows.append({"id": qa["id"], "title": article.get("title", ""), "context": para["context"],
                             "question": qa["question"],
                             "answers": {"text": [x["text"] for x in answers],
                                         "answer_start": [x["answer_start"] for x in answers]}})
    if not rows:
        raise bad("no questions")
    return Dataset.from_list(rows, features=SQUAD_FEATURES)


def _squad_local(name: str, data_dir: str) -> dict[str, Dataset]:
    root = Path(data_dir)
    train, dev = _SQUAD_FILES[name]
    absent = [f for f in (train, dev) if not (root / f).is_file()]
    if absent:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "no such directory"
        raise TaskError(f"{name}: {root} lacks {absent} (found: {found}); "
                        f"data_dir must hold the official {train} and {dev}")
    v2 = name == "squad_v2"
    return {"train": read_squad_json(root / train, version_2=v2),
            "validation": read_squad_json(root / dev, version_2=v2)}


def _squad_hub(name: str) -> dict[str, Dataset]:
    dd = _hub_load(HUB_SQUAD[name])
    return {s: dd[s].select_columns(list(SQUAD_FEATURES)).cast(SQUAD_FEATURES) for s in ("train", "validation")}


# ------------------------------------------------------------------------ loading


def _subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """A seeded random n-example subset; for one seed, smaller n nest inside larger n."""
    if not 1 <= n <= len(ds):
        raise TaskError(f"train_subset={n} but train has {len(ds)} examples; choose 1..{len(ds)}")
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


def load_task(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    text_columns: Sequence[str] | None = None,
    train_subset: int | None = None,
    seed: int = 0,
) -> tuple[TaskSpec, dict[str, Dataset]]:
    """Load a task's train and eval splits (see the module doc for sources and schemas)."""
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    if name.startswith(LOCAL_PREFIX):
        if data_dir is not None:
            raise TaskError(f"{name}: the directory is part of the name; drop data_dir")
        spec, splits = _load_local(name, name[len(LOCAL_PREFIX):], text_columns)
    elif name in _GLUE:
        if text_columns is not None:
            raise TaskError(f"{name}: text_columns applies to local:DIR tasks only")
        g = _GLUE[name]
        splits = _glue_local(name, g, data_dir) if data_dir else _glue_hub(name, g)
        spec = _glue_spec(name, g)
    elif name in _SQUAD_FILES:
        if text_columns is not None:
            raise TaskError(f"{name}: text_columns applies to local:DIR tasks only")
        splits = _squad_local(name, data_dir) if data_dir else _squad_hub(name)
        spec = TaskSpec(name=name, kind="squad", num_labels=2, label_list=None,
                        text_columns=("question", "context"), main_metric="f1",
                        eval_splits=("validation",), version_2=name == "squad_v2")
    else:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(KNOWN_TASKS)}, or local:DIR")
    if train_subset is not None:
        splits["train"] = _subset(splits["train"], train_subset, seed)
    return spec, splits


# --------------------------------------------------------------------- tokenising


def tokenize_split(
    spec: TaskSpec,
    ds: Dataset,
    tokenizer,
    *,
    max_seq_length: int,
    doc_stride: int = 128,
    train: bool,
    max_query_length: int = 64,
) -> Dataset:
    """Model-ready features for one split (see the module doc)."""
    if spec.kind == "squad":
        return _squad_windows(ds, tokenizer, max_seq_length=max_seq_length, doc_stride=doc_stride,
                              max_query_length=max_query_length, train=train)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(*(batch[c] for c in spec.text_columns), truncation=True, max_length=max_seq_length)
        return {**enc, "labels": batch["label"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def _squad_windows(ds: Dataset, tokenizer, *, max_seq_length: int, doc_stride: int, max_query_length: int,
                   train: bool) -> Dataset:
    """Doc-stride windows: [CLS] question [SEP] context-window [SEP].

    `doc_stride` is the step between window starts in context tokens, as in BERT's
    and the TAMT authors' SQuAD code (not the overlap that modern HF scripts pass as
    `stride`). A fast tokenizer takes the overlap, which depends on the question's
    length, so examples are grouped by overlap and each group is encoded at once.
    """
    if tokenizer.padding_side != "right":
        raise TaskError("SQuAD windows need padding_side='right' (question first, context second)")
    if doc_stride < 1:
        raise TaskError(f"doc_stride must be >= 1, got {doc_stride}")
    n_special = tokenizer.num_special_tokens_to_add(pair=True)

    def prepare(batch: dict[str, list]) -> dict[str, list]:
        # Leading whitespace in some SQuAD v2 questions would waste window tokens.
        questions = [q.lstrip() for q in batch["question"]]
        q_offsets = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        q_lens = [len(o) for o in q_offsets]
        too_long = [i for i, n in enumerate(q_lens) if n > max_query_length]
        for i in too_long:  # BERT's max_query_length: cut the question text after that token
            questions[i] = questions[i][: q_offsets[i][max_query_length - 1][1]]
        if too_long:  # re-count: a cut inside a word can change the piece count
            recount = tokenizer([questions[i] for i in too_long], add_special_tokens=False)["input_ids"]
            for i, ids in zip(too_long, recount):
                q_lens[i] = len(ids)
        groups: dict[int, list[int]] = {}
        for i, q_len in enumerate(q_lens):
            window = max_seq_length - q_len - n_special
            if window < 1:
                raise TaskError(f"max_seq_length={max_seq_length} leaves no room for context after a "
                                f"{q_len}-token question; raise it or lower max_query_length")
            groups.setdefault(max(0, window - doc_stride), []).append(i)

        per_example: list[list[dict[str, Any]]] = [[] for _ in questions]
        for overlap, idx in groups.items():
            enc = tokenizer([questions[i] for i in idx], [batch["context"][i] for i in idx],
                            truncation="only_second", max_length=max_seq_length, stride=overlap,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
            for j, local in enumerate(enc["overflow_to_sample_mapping"]):
                i = idx[local]
                seq_ids = enc.sequence_ids(j)
                offsets = enc["offset_mapping"][j]
                feat = {k: enc[k][j] for k in enc if k not in ("offset_mapping", "overflow_to_sample_mapping")}
                if train:
                    feat["start_positions"], feat["end_positions"] = _answer_tokens(
                        batch["answers"][i], seq_ids, offsets, feat["input_ids"].index(tokenizer.cls_token_id))
                else:
                    feat["example_id"] = batch["id"][i]
                    feat["offset_mapping"] = [o if s == 1 else None for o, s in zip(offsets, seq_ids)]
                per_example[i].append(feat)
        feats = [f for fs in per_example for f in fs]  # features follow example order
        return {k: [f[k] for f in feats] for k in feats[0]} if feats else {}

    return ds.map(prepare, batched=True, remove_columns=ds.column_names)


def _answer_tokens(answers: dict[str, list], seq_ids: list, offsets: list, cls_index: int) -> tuple[int, int]:
    """Token span of the first gold answer in this window; CLS when absent or cut off."""
    if not answers["answer_start"]:
        return cls_index, cls_index
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    ctx = [k for k, s in enumerate(seq_ids) if s == 1]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return cls_index, cls_index
    start = max(k for k in ctx if offsets[k][0] <= start_char)
    end = min(k for k in ctx if offsets[k][1] >= end_char)
    return start, end
