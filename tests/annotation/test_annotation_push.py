"""Push to the real local Argilla: records, scrub, idempotence, updates, budget and priority order."""

from __future__ import annotations

import json
import socket
import sqlite3
import uuid

import pytest

from annotation.client import ArgillaUnavailable, connect
from annotation.config import AnnotationConfig
from annotation.pull import review_queue
from annotation.push import push
from annotation.schema import find_dataset
from loop.core.store import Store

EMAIL, PHONE, KEY = "jane.roe@example.org", "+1 415 555 0100", "sk-proj-Abcdefghijklmnop123456"


@pytest.fixture
def owner(argilla_stack):
    return connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)


@pytest.fixture
def cfg():
    return AnnotationConfig(dataset=f"push-{uuid.uuid4().hex[:10]}", thumbs_up_sample_rate=1.0)


def _records(client, cfg) -> dict[str, dict]:
    ds = find_dataset(client, cfg)
    resp = client.api.http_client.get(f"/api/v1/datasets/{ds.id}/records",
                                      params={"limit": 1000, "include": ["responses", "suggestions"]})
    resp.raise_for_status()
    items = resp.json()["items"]
    assert resp.json()["total"] == len(items)
    by_id = {r["external_id"]: r for r in items}
    assert len(by_id) == len(items), "a turn appears twice in Argilla"
    return by_id


def _log(store, cid, text, answer="An answer.", **kw):
    return store.log_turn(conversation_id=cid, messages=[{"role": "system", "content": "Be helpful."},
                                                         {"role": "user", "content": text}],
                          answer=answer, model_version=kw.pop("model_version", "v3"), **kw)


def test_push_sends_scrubbed_records_with_suggestions_and_metadata(owner, cfg):
    store = Store.open()
    cid = store.new_conversation()
    bad = _log(store, cid, f"Write to {EMAIL} please", answer=f"Use key {KEY}.", logprob_mean=-0.4,
               logprob_min=-5.0, latency_s=1.25, created_at="2025-03-01T12:00:00+00:00")
    store.add_feedback(bad, thumbs="down", reasons=["not_factually_correct", "too_verbose"],
                       comment=f"call me at {PHONE}", correction="Never share keys.")
    plain = _log(store, cid, "What is 2+2?", answer="4", logprob_mean=float("-inf"))

    report = push(cfg, store, owner, progress=False)
    assert (report.sent, report.created, report.updated, report.failed) == (2, 2, 0, 0)
    assert report.scrubbed == {"email": 1, "secret": 1, "phone": 1}
    assert report.tiers == {"negative": 1, "uncertain": 1}  # a -inf log-prob is as unsure as it gets

    records = _records(owner, cfg)
    assert set(records) == {bad, plain}
    raw = json.dumps(records)
    for secret in (EMAIL, KEY, "555 0100"):
        assert secret not in raw, f"{secret!r} reached Argilla"
    rec = records[bad]
    assert rec["fields"]["conversation"] == [{"role": "system", "content": "Be helpful."},
                                             {"role": "user", "content": "Write to [EMAIL] please"}]
    assert rec["fields"]["answer"] == "Use key [SECRET]."
    assert "[PHONE]" in rec["fields"]["user_feedback"] and "Never share keys." in rec["fields"]["user_feedback"]
    meta = rec["metadata"]
    assert {k: meta[k] for k in ("model_version", "thumbs", "reasons", "tier", "logprob_mean", "logprob_min",
                                 "latency_s", "created_at", "schema_version")} == {
        "model_version": "v3", "thumbs": "down", "reasons": ["not_factually_correct", "too_verbose"],
        "tier": "negative", "logprob_mean": -0.4, "logprob_min": -5.0, "latency_s": 1.25, "created_at": 1740830400,
        "schema_version": 1}
    assert 4 <= meta["priority"] < 5
    ds = find_dataset(owner, cfg)
    qname = {str(q.id): q.name for q in ds.settings.questions}
    sugg = {qname[s["question_id"]]: s for s in rec["suggestions"]}
    assert sugg["corrected_response"]["value"] == "Use key [SECRET]." and sugg["corrected_response"]["agent"] == "v3"
    assert sugg["issues"]["value"] == ["not_factually_correct", "too_verbose"] and sugg["issues"]["agent"] == "v3"
    assert "logprob_mean" not in records[plain]["metadata"] or records[plain]["metadata"]["logprob_mean"] is None


def test_repush_never_duplicates_and_new_feedback_updates(owner, cfg):
    store = Store.open()
    cid = store.new_conversation()
    ids = [_log(store, cid, f"question {i}") for i in range(6)]
    assert push(cfg, store, owner, progress=False).sent == 6
    again = push(cfg, store, owner, progress=False)
    assert (again.sent, again.unchanged, again.skipped) == (0, 6, 6)

    store.add_feedback(ids[2], thumbs="down", reasons=["incomplete"])
    store.add_feedback(ids[4], thumbs="up", reasons=["clear"])
    third = push(cfg, store, owner, progress=False)
    assert (third.sent, third.created, third.updated, third.unchanged) == (2, 0, 2, 4)
    records = _records(owner, cfg)
    assert len(records) == 6
    assert records[ids[2]]["metadata"]["thumbs"] == "down" and records[ids[2]]["metadata"]["tier"] == "negative"
    assert records[ids[4]]["metadata"]["reasons"] == ["clear"]
    sync = store.sync_state(third.target)
    assert {s["status"] for s in sync.values()} == {"sent"} and len(sync) == 6


def test_budget_sends_the_highest_priority_first_and_reviewers_see_that_order(owner, cfg):
    cfg.budget_per_cycle = 3
    cfg.thumbs_up_sample_rate = 0.0
    store = Store.open()
    cid = store.new_conversation()
    t = {name: _log(store, cid, name, logprob_mean=lp, created_at=f"2025-01-0{day}T00:00:00+00:00")
         for name, lp, day in [("old", -0.1, 1), ("new", -0.1, 5), ("unsure", -2.0, 2), ("very_unsure", -4.0, 2),
                               ("disliked", -0.1, 1), ("liked", -3.0, 3)]}
    store.add_feedback(t["disliked"], thumbs="down")
    store.add_feedback(t["liked"], thumbs="up")

    first = push(cfg, store, owner, progress=False)
    assert (first.sent, first.over_budget, first.not_eligible) == (3, 2, 1)
    second = push(cfg, store, owner, progress=False)
    assert (second.sent, second.over_budget) == (2, 0)
    queue = [r["external_id"] for r in review_queue(owner, find_dataset(owner, cfg).id)]
    assert queue == [t["disliked"], t["very_unsure"], t["unsure"], t["new"], t["old"]]
    assert t["liked"] not in queue  # thumbs-up sampled at rate 0
    assert push(cfg, store, owner, progress=False).sent == 0


def test_no_argilla_means_a_clear_error_and_an_untouched_outbox(monkeypatch):
    store = Store.open()
    _log(store, store.new_conversation(), "hello")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ARGILLA_API_KEY", "some-key")
    with pytest.raises(ArgillaUnavailable, match=f"cannot use Argilla at http://127.0.0.1:{port}"):
        push(AnnotationConfig(), store, progress=False)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM sync_state").fetchone()[0] == 0


def test_missing_key_says_how_to_get_one(loop_home):
    with pytest.raises(ArgillaUnavailable, match="annotation.server start"):
        connect(AnnotationConfig())
