"""SQuAD: official JSON reading, doc-stride windows, n-best extraction, official EM/F1."""

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from tamt_ds.downstream.squad import normalize_answer, postprocess_predictions, squad_metrics
from tamt_ds.downstream.tasks import SQUAD_FEATURES, TaskError, load_task, read_squad_json, tokenize_split

from tests.test_downstream_tasks import one_line_error

FIXTURES = Path(__file__).parent / "fixtures" / "downstream"


# ------------------------------------------------------------------ reading JSON


def test_local_squad_v1_and_v2():
    spec, splits = load_task("squad", data_dir=FIXTURES / "squad")
    assert (spec.kind, spec.main_metric, spec.eval_splits, spec.version_2) == ("squad", "f1", ("validation",), False)
    assert len(splits["train"]) == 3
    dev = splits["validation"][0]
    assert dev["id"] == "d1" and dev["title"] == "Maple_syrup"
    assert dev["answers"]["text"] == ["the sap", "sap", "the sap until most of the water evaporates"]
    start = dev["answers"]["answer_start"][0]
    assert dev["context"][start:start + len("the sap")] == "the sap"
    spec, splits = load_task("squad_v2", data_dir=FIXTURES / "squad_v2")
    assert spec.version_2
    by_id = {r["id"]: r for r in splits["train"]}
    assert by_id["u2"]["answers"] == {"text": [], "answer_start": []}  # plausible_answers are not answers
    assert by_id["u1"]["answers"]["text"] == ["1932"]


@pytest.mark.parametrize("doc, what", [
    ({"version": "1.1", "paragraphs": []}, "'data'"),
    ({"data": [{"title": "x", "context": "c"}]}, "paragraphs"),
    ({"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q",
                                                                         "answers": [{"text": "c"}]}]}]}]},
     "answer_start"),
    ({"data": [{"title": "x", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q",
                                                                         "answers": []}]}]}]}, "SQuAD 2.0"),
])
def test_squad_file_not_in_official_layout(tmp_path, doc, what):
    p = tmp_path / "dev-v1.1.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(TaskError) as e:
        read_squad_json(p, version_2=False)
    msg = one_line_error(e)
    assert "official SQuAD layout" in msg and what in msg


def test_squad_not_json_and_missing_files(tmp_path):
    (tmp_path / "train-v1.1.json").write_text("question,context\n")
    (tmp_path / "dev-v1.1.json").write_text("{}")
    with pytest.raises(TaskError) as e:
        load_task("squad", data_dir=tmp_path)
    assert "invalid JSON" in one_line_error(e)
    with pytest.raises(TaskError) as e:
        load_task("squad_v2", data_dir=tmp_path)
    msg = one_line_error(e)
    assert "train-v2.0.json" in msg and "dev-v1.1.json" in msg  # what is missing, what was found


# --------------------------------------------------------------- doc-stride windows

LONG_CONTEXT = " ".join(f"Sentence {i} says that box {i} holds {i * 7} marbles." for i in range(40))
ANSWER = "box 23 holds 161 marbles"


def long_example(answerable: bool = True) -> Dataset:
    start = LONG_CONTEXT.index(ANSWER)
    answers = {"text": [ANSWER], "answer_start": [start]} if answerable else {"text": [], "answer_start": []}
    return Dataset.from_list([{"id": "q1", "title": "t", "context": LONG_CONTEXT,
                               "question": "   What does box 23 hold?", "answers": answers}],
                             features=SQUAD_FEATURES)


def test_windows_step_by_doc_stride_and_cover_the_context(tokenizer):
    spec, _ = load_task("squad", data_dir=FIXTURES / "squad")
    max_len, stride = 64, 20
    feats = tokenize_split(spec, long_example(), tokenizer, max_seq_length=max_len, doc_stride=stride, train=False)
    ctx_offsets = [tuple(o) for o in tokenizer(LONG_CONTEXT, add_special_tokens=False,
                                               return_offsets_mapping=True)["offset_mapping"]]
    q_len = len(tokenizer("What does box 23 hold?", add_special_tokens=False)["input_ids"])
    window = max_len - q_len - 3  # [CLS] q [SEP] ctx [SEP]
    assert len(feats) > 3 and set(feats["example_id"]) == {"q1"}
    covered = set()
    for k, f in enumerate(feats):
        assert len(f["input_ids"]) <= max_len
        offs = f["offset_mapping"]
        assert all(o is None for o in offs[: q_len + 2]) and offs[-1] is None  # question + specials
        ctx = [tuple(o) for o in offs if o is not None]
        # window k holds context tokens [k*stride, k*stride + window): BERT's doc_stride is the step
        assert ctx == ctx_offsets[k * stride: k * stride + window]
        covered.update(ctx)
    assert covered == set(ctx_offsets)  # no context token falls between windows


def test_train_windows_label_the_answer(tokenizer):
    spec, _ = load_task("squad", data_dir=FIXTURES / "squad")
    feats = tokenize_split(spec, long_example(), tokenizer, max_seq_length=64, doc_stride=20, train=True)
    eval_feats = tokenize_split(spec, long_example(), tokenizer, max_seq_length=64, doc_stride=20, train=False)
    assert "offset_mapping" not in feats.column_names
    hits = 0
    for f, e in zip(feats, eval_feats):
        s, t = f["start_positions"], f["end_positions"]
        assert f["input_ids"] == e["input_ids"]
        ctx = [o for o in e["offset_mapping"] if o is not None]
        if ctx[0][0] <= LONG_CONTEXT.index(ANSWER) and LONG_CONTEXT.index(ANSWER) + len(ANSWER) <= ctx[-1][1]:
            hits += 1
            offs = e["offset_mapping"]
            assert LONG_CONTEXT[offs[s][0]:offs[t][1]] == ANSWER
        else:  # answer cut off or absent: point at [CLS]
            assert (s, t) == (0, 0) and f["input_ids"][0] == tokenizer.cls_token_id
    assert hits >= 2  # the windows overlap, so more than one sees the whole answer
    unanswerable = tokenize_split(spec, long_example(False), tokenizer, max_seq_length=64, doc_stride=20, train=True)
    assert set(unanswerable["start_positions"]) == set(unanswerable["end_positions"]) == {0}


def test_answer_starting_inside_a_token_is_covered(tokenizer):
    # SQuAD has answers that start or end inside a word piece ("ouse" or "hous" of "house"):
    # the label must be the tokens that contain the answer, not the ones after it.
    spec, _ = load_task("squad", data_dir=FIXTURES / "squad")
    context = "They painted the house and the lighthouses blue."
    rows = [{"id": f"q{i}", "title": "", "context": context, "question": "What?",
             "answers": {"text": [a], "answer_start": [context.index(a)]}}
            for i, a in enumerate(["ouse", "hous", "ighthous"])]
    ds = Dataset.from_list(rows, features=SQUAD_FEATURES)
    labels = tokenize_split(spec, ds, tokenizer, max_seq_length=64, train=True)
    offsets = tokenize_split(spec, ds, tokenizer, max_seq_length=64, train=False)["offset_mapping"]
    for row, f, offs in zip(rows, labels, offsets):
        a = row["answers"]["answer_start"][0]
        b = a + len(row["answers"]["text"][0])
        s, e = f["start_positions"], f["end_positions"]
        assert offs[s][0] <= a < offs[s][1] and offs[e][0] < b <= offs[e][1]


def test_long_question_is_cut_to_max_query_length(tokenizer):
    spec, _ = load_task("squad", data_dir=FIXTURES / "squad")
    ex = Dataset.from_list([{"id": "q", "title": "", "context": LONG_CONTEXT, "question": "why " * 100,
                             "answers": {"text": [], "answer_start": []}}], features=SQUAD_FEATURES)
    f = tokenize_split(spec, ex, tokenizer, max_seq_length=96, train=False, max_query_length=16)[0]
    assert sum(o is None for o in f["offset_mapping"]) == 16 + 3
    with pytest.raises(TaskError) as e:
        tokenize_split(spec, ex, tokenizer, max_seq_length=16, train=False, max_query_length=16)
    assert "max_seq_length" in one_line_error(e)


# --------------------------------------------------------------- n-best extraction


def synthetic_logits(feats, spans):
    """Zero logits, plus (feature, start token, end token, start logit, end logit) spikes."""
    start = [np.zeros(len(f) + 5) for f in feats["input_ids"]]  # +5: padded rows are fine
    end = [np.zeros(len(f) + 5) for f in feats["input_ids"]]
    for f, s, e, ls, le in spans:
        start[f][s] += ls
        end[f][e] += le
    return start, end


def answer_tokens(feats, text):
    """(feature, start token, end token) of every window that holds `text` whole."""
    a = LONG_CONTEXT.index(text)
    out = []
    for k, offs in enumerate(feats["offset_mapping"]):
        idx = {o[0]: i for i, o in enumerate(offs) if o is not None}
        ends = {o[1]: i for i, o in enumerate(offs) if o is not None}
        if a in idx and a + len(text) in ends:
            out.append((k, idx[a], ends[a + len(text)]))
    return out


def test_nbest_recovers_the_known_span(tokenizer):
    spec, _ = load_task("squad", data_dir=FIXTURES / "squad")
    ex = long_example()
    feats = tokenize_split(spec, ex, tokenizer, max_seq_length=64, doc_stride=20, train=False)
    (k, s, e), *_ = answer_tokens(feats, ANSWER)
    decoy_k, decoy_s, decoy_e = answer_tokens(feats, "box 30 holds 210 marbles")[0]
    assert decoy_k != k
    sep = feats[k]["offset_mapping"].index(None, 1)  # the [SEP] after the question: no offsets
    start, end = synthetic_logits(feats, [
        (k, s, e, 5.0, 5.0),                     # the answer: score 10
        (decoy_k, decoy_s, decoy_e, 4.0, 4.0),   # a weaker span in another window
        (k, sep, e, 50.0, 0.0),                  # starts outside the context: 55 if allowed
        (k, e + 1, e, 9.0, 0.0),                 # start e+1, end e: 14 if end < start were allowed
    ])
    preds = postprocess_predictions(ex, feats, start, end, max_answer_length=64)
    assert preds == {"q1": ANSWER}
    # a span longer than max_answer_length is dropped even when it scores best
    n_tokens = e - s + 1
    preds = postprocess_predictions(ex, feats, start, end, max_answer_length=n_tokens - 1)
    assert preds["q1"] != ANSWER
    # 2-D arrays work too
    width = max(len(x) for x in start)
    pad = lambda rows: np.stack([np.pad(r, (0, width - len(r))) for r in rows])  # noqa: E731
    assert postprocess_predictions(ex, feats, pad(start), pad(end)) == {"q1": ANSWER}


def test_v2_null_threshold(tokenizer):
    spec, _ = load_task("squad_v2", data_dir=FIXTURES / "squad_v2")
    ex = long_example()
    feats = tokenize_split(spec, ex, tokenizer, max_seq_length=64, doc_stride=20, train=False)
    (k, s, e), *_ = answer_tokens(feats, ANSWER)
    spans = [(k, s, e, 3.0, 3.0)] + [(f, 0, 0, 4.0, 4.0) for f in range(len(feats))]  # null 8 > span 6
    start, end = synthetic_logits(feats, spans)
    assert postprocess_predictions(ex, feats, start, end, version_2=True) == {"q1": ""}
    assert postprocess_predictions(ex, feats, start, end, version_2=True, null_threshold=2.5) == {"q1": ANSWER}
    assert postprocess_predictions(ex, feats, start, end, version_2=False) == {"q1": ANSWER}
    # the null score is the smallest over windows: one window's weak [CLS] is enough
    start[len(feats) - 1][0] -= 10.0
    assert postprocess_predictions(ex, feats, start, end, version_2=True) == {"q1": ANSWER}


# --------------------------------------------------------------- official scores


def test_normalize_answer():
    assert normalize_answer("  The Quick,  brown-fox!") == "quick brownfox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def ex(qid, *golds):
    return {"id": qid, "answers": {"text": list(golds), "answer_start": [0] * len(golds)}}


def test_v1_exact_match_and_f1_by_hand():
    examples = [ex("a", "Eiffel Tower"), ex("b", "the red car"),
                ex("c", "sap", "the sap until most of the water evaporates"), ex("d", "1932")]
    preds = {"a": "the Eiffel Tower.",   # EM 1, F1 1: article + punctuation
             "b": "an old red car",      # "old red car" vs "red car": P 2/3, R 1 -> F1 0.8
             "c": "boiling sap",         # best gold "sap": P 1/2, R 1 -> 2/3 (the long gold gives 0.25)
             "d": "1933"}                # 0
    m = squad_metrics(preds, examples, version_2=False)
    assert m["exact_match"] == pytest.approx(100 * 1 / 4)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 2 / 3 + 0) / 4)
    assert set(m) == {"exact_match", "f1"}


def test_v2_no_answer_handling_by_hand():
    examples = [ex("a", "the sap", "sap"), ex("b"), ex("c"), ex("d", "1932")]
    preds = {"a": "sap", "b": "", "c": "the sap", "d": ""}
    m = squad_metrics(preds, examples, version_2=True)
    # a: EM 1 / F1 1; b: empty vs unanswerable, 1 / 1; c: answer to unanswerable, 0 / 0; d: empty vs answer, 0 / 0
    assert m["exact_match"] == pytest.approx(50.0) and m["f1"] == pytest.approx(50.0)
    assert m["HasAns_exact_match"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(50.0)
    assert m["NoAns_exact_match"] == pytest.approx(50.0) and m["NoAns_f1"] == pytest.approx(50.0)
    assert m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    # v2 script: gold answers that normalise to nothing make the question unanswerable
    m = squad_metrics({"x": "a"}, [ex("x", "The")], version_2=True)
    assert m["f1"] == 100.0 and m["NoAns_total"] == 1
    # v1 script on the same pair: EM matches ("" == ""), but F1 has no common token
    m = squad_metrics({"x": "a"}, [ex("x", "The")], version_2=False)
    assert (m["exact_match"], m["f1"]) == (100.0, 0.0)


def test_scoring_errors():
    with pytest.raises(TaskError) as e:
        squad_metrics({"a": "x"}, [ex("a", "x"), ex("b", "y")], version_2=False)
    assert "'b'" in one_line_error(e)
    with pytest.raises(TaskError) as e:
        squad_metrics({"a": ""}, [ex("a")], version_2=False)
    assert "version_2" in one_line_error(e)


def test_end_to_end_on_fixture_dev(tokenizer):
    """Fixture dev -> windows -> logits that point at the first gold answer -> EM 100."""
    spec, splits = load_task("squad", data_dir=FIXTURES / "squad")
    dev = splits["validation"]
    feats = tokenize_split(spec, dev, tokenizer, max_seq_length=384, train=False)
    train_like = tokenize_split(spec, dev, tokenizer, max_seq_length=384, train=True)
    start, end = synthetic_logits(feats, [(i, f["start_positions"], f["end_positions"], 1.0, 1.0)
                                          for i, f in enumerate(train_like)])
    preds = postprocess_predictions(dev, feats, start, end)
    assert preds == {"d1": "the sap"}
    assert squad_metrics(preds, dev, version_2=False) == {"exact_match": 100.0, "f1": 100.0}
