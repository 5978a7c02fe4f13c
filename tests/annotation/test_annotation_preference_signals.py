"""Preference signals from reviewed records: DPO pairs from corrections, KTO labels from thumbs and ratings.

Records are given in the exact shape Argilla's REST listing returns (as in test_annotation_resolve.py);
the snapshot tests write real snapshot directories under the test's LOOP_HOME.
"""

from __future__ import annotations

import hashlib
import json

from annotation.pull import preference_signals, resolve
from annotation.snapshot import PREFERENCE_FILES, write_snapshot

CONV = [{"role": "user", "content": "Capital of France?"}]


def _record(*responses, answer="Lyon.", thumbs="none", rid="turn-1"):
    return {"id": "uuid-1", "external_id": rid, "fields": {"conversation": CONV, "answer": answer},
            "metadata": {"thumbs": thumbs}, "responses": list(responses)}


def _resp(user="u1", status="submitted", quality=None, correction=None, at="2025-01-01T00:00:00"):
    values = {}
    if quality is not None:
        values["quality"] = {"value": quality}
    if correction is not None:
        values["corrected_response"] = {"value": correction}
    return {"user_id": user, "status": status, "values": values, "inserted_at": at, "updated_at": at}


def signals(record, **kw):
    return preference_signals(record, resolve(record, **kw))


def test_a_correction_is_a_pair_chosen_correction_rejected_logged_answer():
    pair, label = signals(_record(_resp(quality=1, correction="Paris is the capital of France.")))
    assert pair == {"id": "turn-1", "prompt": CONV, "chosen": "Paris is the capital of France.", "rejected": "Lyon."}
    assert label["label"] == "undesirable" and label["answer"] == "Lyon." and label["by"] == "reviewer"


def test_a_correction_that_only_changes_case_or_punctuation_is_no_pair():
    pair, _ = signals(_record(_resp(quality=4, correction="lyon"), answer="Lyon."))
    assert pair is None


def test_the_reviewer_rating_overrules_the_users_thumb():
    _, up_but_bad = signals(_record(_resp(quality=2), thumbs="up"))
    _, down_but_good = signals(_record(_resp(quality=5), thumbs="down"))
    _, middling = signals(_record(_resp(quality=3), thumbs="down"))
    assert (up_but_bad["label"], up_but_bad["by"]) == ("undesirable", "reviewer")
    assert (down_but_good["label"], down_but_good["by"]) == ("desirable", "reviewer")
    assert middling is None  # a 3 labels nothing, whatever the thumb said


def test_an_unreviewed_thumb_labels_the_logged_answer():
    _, up = signals(_record(thumbs="up"))
    _, down = signals(_record(thumbs="down"))
    _, none = signals(_record(thumbs="none"))
    assert (up["label"], up["by"]) == ("desirable", "user") and down["label"] == "undesirable" and none is None
    # too few reviews to resolve (min_submitted=2): still the user's thumb
    _, waiting = signals(_record(_resp(quality=5), thumbs="down"), min_submitted=2)
    assert (waiting["label"], waiting["by"]) == ("undesirable", "user")


def test_a_discarded_record_never_labels_nor_pairs():
    record = _record(_resp("u1", quality=1, correction="Paris."), _resp("u2", status="discarded"), thumbs="down")
    assert signals(record) == (None, None)


def test_an_empty_logged_answer_gives_no_signal():
    assert signals(_record(_resp(quality=1, correction="Paris."), answer="(empty answer)", thumbs="down")) == (None, None)


def _ex(i, question=None):
    return {"id": f"turn-{i:04d}", "messages": [{"role": "user", "content": question or f"q{i}"},
                                                {"role": "assistant", "content": f"a{i}"}]}


def _pair(i, question=None):
    return {"id": f"turn-{i:04d}", "prompt": [{"role": "user", "content": question or f"q{i}"}],
            "chosen": f"a{i}", "rejected": f"wrong {i}"}


def _label(i, label, question=None):
    return {"id": f"turn-{i:04d}", "prompt": [{"role": "user", "content": question or f"q{i}"}],
            "answer": f"answer {i}", "label": label, "by": "user"}


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pairs_and_labels_split_with_the_judges_held_out_ids_and_wordings(loop_home):
    examples = [_ex(i) for i in range(40)]
    pairs = [_pair(i) for i in range(40)]
    # labels of records that are no example: one shares a held-out example's wording (in other case)
    snap0 = write_snapshot(examples, {}, eval_percent=10)
    held = sorted(snap0.held_out_ids)
    held_question = next(e for e in examples if e["id"] == held[0])["messages"][0]["content"]
    labels = [_label(100, "desirable", held_question.upper()), _label(101, "undesirable")]
    snap = write_snapshot(examples, {}, eval_percent=10, pairs=pairs, labels=labels)

    for name in PREFERENCE_FILES:
        assert (snap.path / name).is_file()
    train_pairs, eval_pairs = _read(snap.path / "pairs.jsonl"), _read(snap.path / "eval_pairs.jsonl")
    assert {p["id"] for p in eval_pairs} == snap.held_out_ids
    assert not {p["id"] for p in train_pairs} & snap.held_out_ids
    assert len(train_pairs) + len(eval_pairs) == 40
    assert [r["id"] for r in _read(snap.path / "eval_labels.jsonl")] == ["turn-0100"]  # its wording is judged
    assert [r["id"] for r in _read(snap.path / "labels.jsonl")] == ["turn-0101"]
    counts = snap.manifest["preference"]["counts"]
    assert counts["pairs"] == len(train_pairs) and counts["labels_undesirable"] == 1
    assert set(snap.manifest["preference"]["files"]) == set(PREFERENCE_FILES)


def test_snapshot_hash_covers_pairs_and_labels_and_ignores_their_order(loop_home):
    examples = [_ex(i) for i in range(20)]
    plain = write_snapshot(examples, {}, eval_percent=10)
    # without preference data the hash is what it was before these files existed
    train_text = (plain.path / "train.jsonl").read_text()
    eval_text = (plain.path / "eval.jsonl").read_text()
    assert plain.hash == hashlib.sha256(b"train\n" + train_text.encode() + b"eval\n" + eval_text.encode()).hexdigest()

    labels = [_label(50, "desirable"), _label(51, "undesirable")]
    with_labels = write_snapshot(examples, {}, eval_percent=10, labels=labels)
    again = write_snapshot(list(reversed(examples)), {}, eval_percent=10, labels=list(reversed(labels)))
    flipped = write_snapshot(examples, {}, eval_percent=10, labels=[_label(50, "undesirable"), labels[1]])
    with_pairs = write_snapshot(examples, {}, eval_percent=10, labels=labels, pairs=[_pair(3)])
    assert len({plain.hash, with_labels.hash, flipped.hash, with_pairs.hash}) == 4
    assert again.hash == with_labels.hash and again.reused
