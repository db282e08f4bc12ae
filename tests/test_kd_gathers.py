"""The KD teacher pass gathers the frozen weights only, never a score (2 real ranks, ZeRO-3,
every gather counted in ZeRO-3's parameter coordinator, no reuse or prefetch, so each pass
gathers exactly what its modules use): the scores are half of a masked module's bytes and
the teacher reads none of them.  The student pass still gathers every score."""
import json

from tests.conftest import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "gather_worker.py"


def test_teacher_pass_gathers_weights_and_no_score(tiny_bert, tmp_path):
    out = tmp_path / "gathers.json"
    torchrun(WORKER, tiny_bert, out, 2, "release")
    found = json.loads(out.read_text())
    scores = set(found["score_names"])
    weights = {name[: -len("mask_score")] + "weight" for name in scores}
    teacher, student = set(found["teacher"]["names"]), set(found["student"]["names"])
    assert not teacher & scores, sorted(teacher & scores)
    assert weights <= teacher, sorted(weights - teacher)  # the teacher ran, on the masked weights
    assert scores <= student and weights <= student
    assert found["teacher"]["bytes"] * 1.9 < found["student"]["bytes"]  # weight + score vs weight
