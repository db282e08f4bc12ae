"""Task loading: GLUE TSVs in the original layout, the hub path, local:DIR tasks,
seeded train subsets, classification tokenisation, and the one-line errors."""

from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from tamt_ds.downstream import tasks
from tamt_ds.downstream.tasks import KNOWN_TASKS, TaskError, load_task, metric_key, tokenize_split

FIXTURES = Path(__file__).parent / "fixtures" / "downstream"
GLUE_DIR = FIXTURES / "glue"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not SHARED.is_dir():  # CI lays shared/ beside the clone; sessions have /work/shared
    SHARED = Path("/work/shared/data")


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- GLUE TSV files

# task -> (text columns, {split: labels}, (split, row, column, exact text))
GLUE_EXPECTED = {
    "cola": (("sentence",), {"train": [1, 0, 1, 0], "validation": [0, 1]},
             ("train", 2, "sentence", 'She called the plan "bold" at the meeting.')),
    "sst2": (("sentence",), {"train": [0, 0, 1, 1], "validation": [1, 0]},
             ("train", 3, "sentence", 'the " surprise " ending earns its keep ')),
    "mrpc": (("sentence1", "sentence2"), {"train": [1, 0, 1], "validation": [1, 0]},
             ("train", 0, "sentence2", 'On Tuesday , the council gave its approval to the " new " budget .')),
    "stsb": (("sentence1", "sentence2"), {"train": [5.0, 3.8, 0.25], "validation": [4.6, 0.0]},
             ("validation", 0, "sentence2", "A storm hit the coast.")),
    # the 4th train line is a corrupt short row: dropped; "null" is a real question
    "qqp": (("question1", "question2"), {"train": [0, 1, 0], "validation": [0, 1]},
            ("train", 2, "question2", "null")),
    "mnli": (("premise", "hypothesis"),
             {"train": [0, 2, 1, 0], "validation_matched": [1, 2], "validation_mismatched": [2, 0, 1]},
             ("validation_mismatched", 1, "hypothesis", "It combines both.")),
    "qnli": (("question", "sentence"), {"train": [1, 0, 1], "validation": [0]},
             ("train", 1, "sentence", "The letter was written by the mayor in 1901.")),
    "rte": (("sentence1", "sentence2"), {"train": [1, 0], "validation": [1]},
            ("validation", 0, "sentence1", "The singer, who was 52, died in Paris.")),
    "wnli": (("sentence1", "sentence2"), {"train": [1, 1, 0], "validation": [0]},
             ("train", 1, "sentence2", "Ann is too short.")),
}


def test_every_glue_task_has_a_fixture():
    assert set(GLUE_EXPECTED) == set(KNOWN_TASKS) - {"squad", "squad_v2"}


@pytest.mark.parametrize("name", sorted(GLUE_EXPECTED))
def test_glue_tsv_layouts(name):
    text_columns, labels, (split, row, column, text) = GLUE_EXPECTED[name]
    spec, splits = load_task(name, data_dir=GLUE_DIR)
    assert spec.text_columns == text_columns
    assert set(splits) == {"train", *spec.eval_splits} == set(labels)
    for s, want in labels.items():
        assert splits[s].column_names == [*text_columns, "label"]
        assert splits[s]["label"] == pytest.approx(want)
    assert splits[split][row][column] == text
    if name == "stsb":
        assert spec.kind == "regression" and spec.num_labels == 1 and spec.label_list is None
    else:
        assert spec.kind == "classification"
        assert splits["train"].features["label"].names == list(spec.label_list)


def test_glue_label_names_follow_the_hub():
    spec, splits = load_task("mnli", data_dir=GLUE_DIR)
    assert spec.label_list == ("entailment", "neutral", "contradiction")
    # row 1 of train is gold_label "contradiction"
    assert splits["train"].features["label"].int2str(splits["train"][1]["label"]) == "contradiction"
    assert load_task("wnli", data_dir=GLUE_DIR)[0].label_list == ("not_entailment", "entailment")


def test_mnli_matched_and_mismatched_stay_apart():
    spec, splits = load_task("mnli", data_dir=GLUE_DIR)
    assert spec.eval_splits == ("validation_matched", "validation_mismatched")
    assert spec.main_metric == "matched_accuracy"
    assert len(splits["validation_matched"]) == 2 and len(splits["validation_mismatched"]) == 3
    assert splits["validation_matched"][0]["premise"] == "The new rules apply from May."
    assert splits["validation_mismatched"][0]["premise"] == "Your gift paid for new books."
    assert metric_key("validation_mismatched", "accuracy") == "mismatched_accuracy"
    assert metric_key("validation", "mcc") == "mcc"


def test_glue_data_dir_may_be_the_task_folder():
    _, from_root = load_task("rte", data_dir=GLUE_DIR)
    _, from_folder = load_task("rte", data_dir=GLUE_DIR / "RTE")
    assert from_root["train"].to_list() == from_folder["train"].to_list()


def test_main_metrics():
    want = {"cola": "mcc", "stsb": "pearson", "mnli": "matched_accuracy", "mrpc": "accuracy",
            "qqp": "accuracy", "sst2": "accuracy", "squad": "f1", "squad_v2": "f1"}
    assert {k: tasks.MAIN_METRICS[k] for k in want} == want


# ---------------------------------------------------------------------- hub path


def _fake_hub(monkeypatch, answer):
    """Replace only the hub calls of datasets.load_dataset; file loaders stay real."""
    real = datasets.load_dataset
    calls = []

    def fake(path, *args, **kwargs):
        if path.startswith(("nyu-mll/", "rajpurkar/")):
            calls.append((path, *args))
            return answer
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_glue_hub_path_keeps_mnli_splits_and_drops_extras(monkeypatch):
    names = ["entailment", "neutral", "contradiction"]
    feats = Features({"premise": Value("string"), "hypothesis": Value("string"),
                      "label": ClassLabel(names=names), "idx": Value("int32")})

    def split(rows):
        return Dataset.from_list([{"premise": p, "hypothesis": h, "label": y, "idx": i}
                                  for i, (p, h, y) in enumerate(rows)], features=feats)

    hub = DatasetDict({
        "train": split([("a", "b", 0), ("c", "d", 2)]),
        "validation_matched": split([("m", "n", 1)]),
        "validation_mismatched": split([("x", "y", 2), ("u", "v", 0)]),
        "test_matched": split([("t", "t", -1)]),
        "test_mismatched": split([("t", "t", -1)]),
    })
    calls = _fake_hub(monkeypatch, hub)
    spec, splits = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert set(splits) == {"train", "validation_matched", "validation_mismatched"}
    assert splits["validation_mismatched"].to_list() == [
        {"premise": "x", "hypothesis": "y", "label": 2}, {"premise": "u", "hypothesis": "v", "label": 0}]
    # the same spec and schema as from the TSV files
    local_spec, local = load_task("mnli", data_dir=GLUE_DIR)
    assert spec == local_spec
    assert splits["train"].features == local["train"].features


def test_glue_hub_label_names_are_checked(monkeypatch):
    feats = Features({"sentence1": Value("string"), "sentence2": Value("string"),
                      "label": ClassLabel(names=["yes", "no"])})
    ds = Dataset.from_list([{"sentence1": "a", "sentence2": "b", "label": 0}], features=feats)
    _fake_hub(monkeypatch, DatasetDict({"train": ds, "validation": ds}))
    with pytest.raises(TaskError) as e:
        load_task("rte")
    assert "data_dir" in one_line_error(e)


def test_squad_hub_path_matches_local_json(monkeypatch):
    _, local = load_task("squad", data_dir=FIXTURES / "squad")
    calls = _fake_hub(monkeypatch, DatasetDict(local))
    spec, splits = load_task("squad")
    assert calls == [("rajpurkar/squad",)]
    assert spec.kind == "squad" and not spec.version_2
    assert splits["validation"].to_list() == local["validation"].to_list()


@pytest.mark.parametrize("name", ["rte", "squad_v2"])
def test_unreachable_hub_says_how_to_go_local(monkeypatch, name):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the real loader, failing fast
    with pytest.raises(TaskError) as e:
        load_task(name)
    msg = one_line_error(e)
    assert "hub" in msg and "data_dir" in msg


# ------------------------------------------------------------------- local tasks


def write_task(root: Path, header: str, splits: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (root / f"{split}.tsv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_local_single_text_column_with_extra_columns(tmp_path):
    d = write_task(tmp_path / "t", "id\tsentence\tsource\tlabel", {
        "train": ["1\tgreat film\tweb\tpos", "2\tdull plot\tweb\tneg", "3\tit was fine\tweb\tneu"],
        "validation": ["4\tawful\tweb\tneg", "5\tsuperb\tweb\tpos"]})
    spec, splits = load_task(f"local:{d}")
    assert spec.kind == "classification" and spec.text_columns == ("sentence",)
    assert spec.label_list == ("neg", "neu", "pos") and spec.num_labels == 3
    assert spec.eval_splits == ("validation",) and set(splits) == {"train", "validation"}
    assert splits["validation"].to_list() == [{"sentence": "awful", "label": 0}, {"sentence": "superb", "label": 2}]


def test_local_two_text_columns_and_explicit_choice(tmp_path):
    rows = {"train": ["bank\tnoun\tthe river bank\tthe bank lent money\t0", "run\tverb\trun fast\trun home\t1"],
            "validation": ["key\tnoun\ta door key\tthe key to success\t0"]}
    d = write_task(tmp_path / "t", "word\tpos\tsentence1\tsentence2\tlabel", rows)
    spec, splits = load_task(f"local:{d}")
    assert spec.text_columns == ("sentence1", "sentence2")
    assert splits["train"][0] == {"sentence1": "the river bank", "sentence2": "the bank lent money", "label": 0}
    spec, splits = load_task(f"local:{d}", text_columns=["word", "sentence1"])
    assert spec.text_columns == ("word", "sentence1")
    assert splits["validation"][0] == {"word": "key", "sentence1": "a door key", "label": 0}


def test_local_regression_and_integer_labels(tmp_path):
    d = write_task(tmp_path / "r", "sentence\tlabel", {
        "train": ["a\t0.5", "b\t3.25", "c\t1"], "validation": ["d\t2.0", "e\t-1e-1"]})
    spec, splits = load_task(f"local:{d}")
    assert spec.kind == "regression" and spec.num_labels == 1 and spec.main_metric == "pearson"
    assert splits["validation"]["label"] == pytest.approx([2.0, -0.1])
    # a few integers are classes, sorted numerically ...
    d = write_task(tmp_path / "c", "sentence\tlabel", {
        "train": ["a\t10", "b\t2", "c\t1"], "validation": ["d\t2"]})
    spec, splits = load_task(f"local:{d}")
    assert spec.kind == "classification" and spec.label_list == ("1", "2", "10")
    assert splits["validation"]["label"] == [1]
    # ... many distinct integers are a score
    d = write_task(tmp_path / "s", "sentence\tlabel", {
        "train": [f"x{i}\t{i}" for i in range(tasks.MAX_INTEGER_CLASSES + 1)], "validation": ["d\t7"]})
    assert load_task(f"local:{d}")[0].kind == "regression"


def test_local_test_split_only_when_labelled(tmp_path):
    base = {"train": ["a\tx", "b\ty"], "validation": ["c\tx"]}
    d = write_task(tmp_path / "l", "sentence\tlabel", {**base, "test": ["d\ty"]})
    spec, splits = load_task(f"local:{d}")
    assert spec.eval_splits == ("validation", "test") and splits["test"]["label"] == [1]
    d = write_task(tmp_path / "u", "sentence\tlabel", base)
    (d / "test.tsv").write_text("sentence\nunlabelled\n")
    spec, splits = load_task(f"local:{d}")
    assert spec.eval_splits == ("validation",) and "test" not in splits


def test_shared_supersense_verb_loads():
    spec, splits = load_task(f"local:{SHARED / 'supersense_verb'}")
    assert spec.kind == "classification" and spec.num_labels == 15 and spec.text_columns == ("sentence",)
    assert spec.label_list[0] == "verb.body" and list(spec.label_list) == sorted(spec.label_list)
    assert {k: len(v) for k, v in splits.items()} == {"train": 9921, "validation": 1320, "test": 1278}


def test_shared_wic_wn_loads():
    spec, splits = load_task(f"local:{SHARED / 'wic_wn'}")
    assert spec.text_columns == ("sentence1", "sentence2") and spec.label_list == ("0", "1")
    assert {k: len(v) for k, v in splits.items()} == {"train": 5962, "validation": 738, "test": 684}
    assert splits["train"][0] == {"sentence1": "pulled by a yoke of oxen",
                                  "sentence2": "under the yoke of a tyrant", "label": 0}


# ------------------------------------------------------------------ train subset


def test_train_subset_is_seeded_and_nested():
    name = f"local:{SHARED / 'supersense_verb'}"
    full = load_task(name)[1]["train"]["sentence"]
    a = load_task(name, train_subset=200, seed=1)[1]["train"]["sentence"]
    b = load_task(name, train_subset=200, seed=1)[1]["train"]["sentence"]
    c = load_task(name, train_subset=200, seed=2)[1]["train"]["sentence"]
    small = load_task(name, train_subset=50, seed=1)[1]["train"]["sentence"]
    assert list(a) == list(b) and list(a) != list(c)
    assert len(set(a)) == 200 and set(a) <= set(full)
    assert list(a) != list(full[:200])  # random, not the head of the file
    assert list(small) == list(a)[:50]  # data-scarcity sizes nest for one seed
    with pytest.raises(TaskError) as e:
        load_task(name, train_subset=len(full) + 1)
    assert "train_subset" in one_line_error(e)


# ----------------------------------------------------------------- tokenisation


def test_tokenize_pairs(tokenizer):
    spec, splits = load_task(f"local:{SHARED / 'wic_wn'}")
    feats = tokenize_split(spec, splits["validation"].select(range(20)), tokenizer, max_seq_length=16, train=True)
    assert set(feats.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert feats["labels"] == splits["validation"]["label"][:20]
    assert max(len(x) for x in feats["input_ids"]) == 16
    first = tokenizer(splits["validation"][0]["sentence1"], splits["validation"][0]["sentence2"])
    if len(first["input_ids"]) <= 16:
        assert feats[0]["input_ids"] == first["input_ids"]
    assert all(1 in t for t in feats["token_type_ids"])  # both sentences are in every row


# ------------------------------------------------------------------------ errors


def test_unknown_task_lists_known_ones():
    with pytest.raises(TaskError) as e:
        load_task("sst-3")
    msg = one_line_error(e)
    assert all(n in msg for n in KNOWN_TASKS) and "local:DIR" in msg


def test_local_dir_without_files_names_what_it_found(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\tx\n")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(TaskError) as e:
        load_task(f"local:{tmp_path}")
    msg = one_line_error(e)
    assert "validation.tsv" in msg and "notes.txt" in msg


def test_local_without_text_column_names_the_columns(tmp_path):
    d = write_task(tmp_path / "t", "text\tlabel", {"train": ["a\tx"], "validation": ["b\tx"]})
    with pytest.raises(TaskError) as e:
        load_task(f"local:{d}")
    msg = one_line_error(e)
    assert "['text', 'label']" in msg and "text_columns" in msg
    with pytest.raises(TaskError) as e:
        load_task(f"local:{d}", text_columns=["body"])
    assert "body" in one_line_error(e)


def test_local_missing_label_column(tmp_path):
    d = write_task(tmp_path / "t", "sentence\tlabel", {"train": ["a\tx"]})
    (d / "validation.tsv").write_text("sentence\tgold\nb\tx\n")
    with pytest.raises(TaskError) as e:
        load_task(f"local:{d}")
    msg = one_line_error(e)
    assert "validation.tsv" in msg and "'label'" in msg and "gold" in msg


def test_validation_label_outside_train_set(tmp_path):
    d = write_task(tmp_path / "t", "sentence\tlabel", {
        "train": ["a\tcat", "b\tdog"], "validation": ["c\tcat", "d\tbird"]})
    with pytest.raises(TaskError) as e:
        load_task(f"local:{d}")
    msg = one_line_error(e)
    assert "'bird'" in msg and "train" in msg


def test_glue_dir_without_files(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(TaskError) as e:
        load_task("rte", data_dir=tmp_path)
    msg = one_line_error(e)
    assert "dev.tsv" in msg and "train.tsv" in msg


def test_glue_tsv_with_wrong_columns(tmp_path):
    d = tmp_path / "RTE"
    d.mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (d / f).write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(TaskError) as e:
        load_task("rte", data_dir=tmp_path)
    msg = one_line_error(e)
    assert "sentence1" in msg and "premise" in msg


def test_glue_unknown_label(tmp_path):
    d = tmp_path / "RTE"
    d.mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (d / f).write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(TaskError) as e:
        load_task("rte", data_dir=tmp_path)
    assert "'maybe'" in one_line_error(e)
