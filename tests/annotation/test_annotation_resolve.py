"""How reviewed records become training examples, including multi-reviewer disagreements.

Records are given in the exact shape Argilla's REST listing returns (see annotation.pull); the
end-to-end tests in test_annotation_review.py check the same rules through a real server.
"""

from __future__ import annotations

from annotation.pull import resolve

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]


def _record(*responses, answer="Paris.", rid="turn-1"):
    return {"id": "uuid-1", "external_id": rid, "fields": {"conversation": CONV, "answer": answer},
            "responses": list(responses)}


def _resp(user, status="submitted", quality=None, correction=None, at="2025-01-01T00:00:00"):
    values = {}
    if quality is not None:
        values["quality"] = {"value": quality}
    if correction is not None:
        values["corrected_response"] = {"value": correction}
    return {"user_id": user, "status": status, "values": values, "inserted_at": at, "updated_at": at}


def test_good_answer_trains_on_the_models_answer():
    res = resolve(_record(_resp("u1", quality=4, correction="Paris.")))  # pre-filled text left unchanged
    assert res.state == "accepted" and res.source == "answer"
    example = {k: v for k, v in res.example.items() if k != "provenance"}
    assert example == {"id": "turn-1", "messages": CONV + [{"role": "assistant", "content": "Paris."}]}
    assert res.example["provenance"]["record_id"] == "uuid-1" and res.example["provenance"]["quality"] == 4


def test_poor_answer_without_correction_does_not_train():
    res = resolve(_record(_resp("u1", quality=3, correction="Paris.")))
    assert res.state == "rejected" and res.example is None and res.quality == 3


def test_correction_trains_whatever_the_rating():
    res = resolve(_record(_resp("u1", quality=1, correction="The capital of France is Paris.")))
    assert res.source == "correction"
    assert res.example["messages"][-1] == {"role": "assistant", "content": "The capital of France is Paris."}


def test_discarded_and_unreviewed_never_train():
    assert resolve(_record(_resp("u1", status="discarded"))).state == "discarded"
    assert resolve(_record()).state == "pending"
    assert resolve(_record(_resp("u1", status="draft", quality=5))).state == "pending"


def test_min_submitted_waits_for_enough_reviewers():
    one = _record(_resp("u1", quality=5))
    assert resolve(one, min_submitted=2).state == "pending"
    assert resolve(_record(_resp("u1", quality=5), _resp("u2", quality=4)), min_submitted=2).state == "accepted"


def test_median_rating_decides_and_disagreement_counts_as_conflict():
    # ratings 5, 4, 2 -> median 4 -> trains on the answer; reviewers straddle the threshold -> conflict
    res = resolve(_record(_resp("u1", quality=5), _resp("u2", quality=4), _resp("u3", quality=2)))
    assert (res.state, res.quality, res.conflict) == ("accepted", 4, True)
    # an even count takes the lower middle: 5 and 3 -> 3 -> does not train
    res = resolve(_record(_resp("u1", quality=5), _resp("u2", quality=3)))
    assert (res.state, res.quality, res.conflict) == ("rejected", 3, True)
    # agreement is no conflict
    assert not resolve(_record(_resp("u1", quality=5), _resp("u2", quality=4))).conflict


def test_latest_submitted_correction_wins():
    early = _resp("u1", quality=2, correction="Paris, France.", at="2025-01-01T10:00:00")
    late = _resp("u2", quality=2, correction="It is Paris.", at="2025-01-01T11:00:00")
    for order in ((early, late), (late, early)):
        res = resolve(_record(*order))
        assert res.example["messages"][-1]["content"] == "It is Paris."
        assert res.conflict  # two different corrections
    draft = _resp("u3", status="draft", quality=1, correction="ignored draft", at="2025-01-02T00:00:00")
    assert resolve(_record(early, late, draft)).example["messages"][-1]["content"] == "It is Paris."


def test_any_discard_keeps_a_record_out_of_training():
    res = resolve(_record(_resp("u1", quality=5), _resp("u2", status="discarded")))
    assert res.state == "discarded" and res.conflict and res.example is None
