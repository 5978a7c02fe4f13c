"""Reviewers submit through the SDK (annotator role) and pull turns their work into the expected snapshot."""

from __future__ import annotations

import uuid

import argilla as rg
import pytest

from annotation.client import connect
from annotation.config import AnnotationConfig
from annotation.judge_split import split_for_judging
from annotation.pull import pull_snapshot, review_queue, submit_review
from annotation.push import push
from annotation.schema import find_dataset
from loop.core.store import Store

SYSTEM = {"role": "system", "content": "Be helpful."}


@pytest.fixture
def owner(argilla_stack):
    return connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)


@pytest.fixture
def reviewer(argilla_stack):
    client = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.reviewer_api_key)
    assert client.me.role.value == "annotator"
    return client


def _push_turns(cfg, owner, specs):
    """specs: name -> (question, answer); returns name -> turn id, after pushing them all."""
    store = Store.open()
    cid = store.new_conversation()
    ids = {name: store.log_turn(conversation_id=cid, messages=[SYSTEM, {"role": "user", "content": q}], answer=a,
                                model_version="v7")
           for name, (q, a) in specs.items()}
    assert push(cfg, store, owner, progress=False).sent == len(specs)
    return store, ids


def _server_ids(client, cfg):
    return {r["external_id"]: r["id"] for r in review_queue(client, find_dataset(client, cfg).id)}


def _example(q, a, tid):
    return {"id": tid, "messages": [SYSTEM, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_annotator_reviews_become_the_expected_snapshot(owner, reviewer):
    cfg = AnnotationConfig(dataset=f"rev-{uuid.uuid4().hex[:10]}", eval_percent=50)
    specs = {"fixed": ("Capital of Italy?", "Milan."), "good": ("2+2?", "4"), "meh": ("Tell a joke", "No."),
             "junk": ("asdf", "?"), "later": ("Hi", "Hello!")}
    store, ids = _push_turns(cfg, owner, specs)
    server = _server_ids(reviewer, cfg)  # the reviewer's own queue, as in the UI
    assert set(server) == set(ids.values())
    submit_review(reviewer, server[ids["fixed"]], quality=1, correction="Rome.", issues=["not_factually_correct"])
    submit_review(reviewer, server[ids["good"]], quality=5, correction="4")  # pre-filled answer left unchanged
    submit_review(reviewer, server[ids["meh"]], quality=3, correction="No.")
    submit_review(reviewer, server[ids["junk"]], status="discarded")

    snap = pull_snapshot(cfg, client=owner, previous=False, progress=False)
    expected = {ids["fixed"]: _example("Capital of Italy?", "Rome.", ids["fixed"]),
                ids["good"]: _example("2+2?", "4", ids["good"])}
    got = {e["id"]: e for e in snap.examples("train") + snap.examples("eval")}
    assert got == expected
    judged = split_for_judging(expected.values(), eval_percent=50, min_held_out=cfg.min_held_out).held_out_ids
    assert {e["id"] for e in snap.examples("eval")} == judged and len(judged) == 1
    c = snap.counts
    assert (c["records"], c["submitted"], c["pending"], c["discarded"], c["rejected"], c["conflicts"]) == (5, 3, 1, 1, 1, 0)
    assert (c["examples"], c["from_corrections"], c["from_answers"], c["new"], c["changed"]) == (2, 1, 1, 2, 0)

    again = pull_snapshot(cfg, client=owner, progress=False)  # previous = the latest snapshot
    assert again.hash == snap.hash and again.reused and again.counts["new"] == 0

    submit_review(reviewer, server[ids["later"]], quality=4)
    third = pull_snapshot(cfg, client=owner, progress=False)
    assert third.hash != snap.hash and third.counts["new"] == 1 and third.counts["examples"] == 3
    for split in ("train", "eval"):  # earlier examples keep their side of the split
        assert {e["id"] for e in snap.examples(split)} <= {e["id"] for e in third.examples(split)}

    # a push after the reviews (new user feedback) updates the record and keeps the reviews
    store.add_feedback(ids["good"], thumbs="up")
    assert push(cfg, store, owner, progress=False).updated == 1
    assert pull_snapshot(cfg, client=owner, progress=False).hash == third.hash


def test_two_reviewers_disagreeing_resolve_by_the_documented_rules(owner, reviewer):
    cfg = AnnotationConfig(dataset=f"rev2-{uuid.uuid4().hex[:10]}", min_submitted=2, eval_percent=0)
    specs = {"split": ("Is water wet?", "Yes."), "rewritten": ("Say hi", "hey"), "half": ("Name a color", "Blue.")}
    _, ids = _push_turns(cfg, owner, specs)
    as_reviewer, as_owner = _server_ids(reviewer, cfg), _server_ids(owner, cfg)
    # ratings 5 and 2: the lower middle (2) decides -> no training example; a conflict
    submit_review(reviewer, as_reviewer[ids["split"]], quality=5)
    submit_review(owner, as_owner[ids["split"]], quality=2)
    # two corrections: the later one wins; a conflict
    submit_review(reviewer, as_reviewer[ids["rewritten"]], quality=2, correction="Hi!")
    submit_review(owner, as_owner[ids["rewritten"]], quality=3, correction="Hello there!")
    # one submission of two required: still pending
    submit_review(reviewer, as_reviewer[ids["half"]], quality=5)

    statuses = {r["external_id"]: r["status"] for r in review_queue(owner, find_dataset(owner, cfg).id)}
    assert statuses == {ids["split"]: "completed", ids["rewritten"]: "completed", ids["half"]: "pending"}
    snap = pull_snapshot(cfg, client=owner, previous=False, progress=False)
    assert snap.examples("train") == [_example("Say hi", "Hello there!", ids["rewritten"])]
    c = snap.counts
    assert (c["submitted"], c["pending"], c["rejected"], c["conflicts"], c["examples"]) == (2, 1, 1, 2, 1)
