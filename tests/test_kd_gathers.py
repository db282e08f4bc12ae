"""What a KD step gathers, and ZeRO-3's prefetch trace across the project's orders of passes
(2 real ranks, gloo, ZeRO-3 with persistence threshold 0; every gather counted in ZeRO-3's
parameter coordinator by tests/workers/gather_worker.py)."""
import json

from tests.conftest import ROOT, torchrun

WORKER = ROOT / "tests" / "workers" / "gather_worker.py"


def gathers(model, tmp_path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    torchrun(WORKER, model, out, 3, mode)
    return json.loads(out.read_text())


def test_teacher_pass_gathers_weights_and_no_score(tiny_bert, tmp_path):
    """No reuse, no prefetch: each pass gathers exactly what its modules use.  The scores are
    half of a masked module's bytes and the teacher (masks off) reads none of them."""
    found = gathers(tiny_bert, tmp_path, "release")
    scores, weights = set(found["score_names"]), set(found["weight_names"])
    teacher, student = set(found["teacher"]["names"]), set(found["student"]["names"])
    assert not teacher & scores, sorted(teacher & scores)
    assert weights <= teacher, sorted(weights - teacher)  # the teacher ran, on the masked weights
    assert scores <= student and weights <= student
    read_by_kd = {n for n in scores if not n.startswith("pooler.")}  # no KD loss term reads the pooler
    assert read_by_kd <= set(found["backward"]["names"])
    assert found["teacher"]["bytes"] * 1.9 < found["student"]["bytes"]  # weight vs weight + score


def test_prefetch_trace_survives_every_order_of_passes(tiny_bert, tmp_path):
    """ds_configs/zero3_cpu.json as shipped (prefetch, reuse).  The worker first runs
    evaluate_mask's order on the fresh engine (every teacher pass, then every student pass),
    then KD steps, the search's held-out evaluation (teacher, student per batch), KD steps.
    A module whose parameters change between passes stops the run there ('tracing error ...
    mask_score', as the reverted teacher pass without scores did); a teacher forward that
    began a ZeRO-3 step of its own would drop the recorded trace at every KD step.  Here the
    first KD step drops evaluate_mask's trace and records its own, and every later one, the
    evaluation between them included, replays it from teacher to backward."""
    found = gathers(tiny_bert, tmp_path, "default")
    assert found["replayed"] == [False, False, True, True, True, True], found
    assert found["invalidations"][1:] == [0] * 5, found
