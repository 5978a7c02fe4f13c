import json
import subprocess
import sys
import threading

import pytest

from loop.core.feedback import FeedbackError
from loop.core.store import Store


def make_turn(store, cid=None, answer="Paris.", **kw):
    cid = cid or store.new_conversation()
    return store.log_turn(
        conversation_id=cid,
        messages=[{"role": "user", "content": "Capital of France?"}],
        answer=answer,
        model_version="v1",
        gguf_sha256="ab" * 32,
        sampling={"temperature": 0.7},
        latency_s=0.5,
        ttft_s=0.1,
        prompt_tokens=12,
        completion_tokens=3,
        logprob_mean=-0.2,
        logprob_min=-1.5,
        **kw,
    )


def test_turn_roundtrip_and_positions():
    store = Store.open()
    cid = store.new_conversation()
    t1 = make_turn(store, cid)
    t2 = make_turn(store, cid, answer="Berlin.")
    turn = store.get_turn(t2)
    assert turn["position"] == 1 and store.get_turn(t1)["position"] == 0
    assert turn["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert turn["sampling"] == {"temperature": 0.7}
    assert turn["logprob_min"] == -1.5 and turn["gguf_sha256"] == "ab" * 32
    assert turn["feedback"] is None and turn["feedback_count"] == 0
    assert t1 < t2  # ULIDs sort by creation
    assert turn["created_at"].endswith("+00:00")  # UTC


def test_latest_feedback_counts():
    store = Store.open()
    tid = make_turn(store)
    store.add_feedback(tid, thumbs="up", reasons=["accurate"])
    store.add_feedback(tid, thumbs="down", reasons=["not_factually_correct", "style"], comment="wrong", correction="Lyon?")
    turn = store.get_turn(tid)
    assert turn["feedback_count"] == 2
    assert turn["feedback"]["thumbs"] == "down"
    assert turn["feedback"]["reasons"] == ["not_factually_correct", "style"]
    assert turn["feedback"]["correction"] == "Lyon?"
    assert [e["thumbs"] for e in store.feedback_events(tid)] == ["up", "down"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"thumbs": "sideways"}, "thumbs"),
        ({"thumbs": "down", "reasons": ["made_up_reason"]}, "unknown reason"),
        ({"comment": "x" * 5000}, "limit"),
        ({}, "empty feedback"),
    ],
)
def test_malformed_feedback_rejected_turn_untouched(kwargs, message):
    store = Store.open()
    tid = make_turn(store)
    before = store.get_turn(tid)
    with pytest.raises(FeedbackError, match=message):
        store.add_feedback(tid, **kwargs)
    assert store.get_turn(tid) == before
    assert store.count_feedback() == 0


def test_control_characters_cleaned_with_note():
    store = Store.open()
    tid = make_turn(store)
    _, clean = store.add_feedback_checked(tid, thumbs="down", comment="bad\x00\x1b[31m answer\n")
    assert clean.comment == "bad[31m answer"
    assert any("control" in n for n in clean.notes)
    assert store.get_turn(tid)["feedback"]["comment"] == "bad[31m answer"


def test_feedback_on_unknown_turn():
    store = Store.open()
    with pytest.raises(KeyError):
        store.add_feedback("nope", thumbs="up")


def test_concurrent_writers_lose_nothing():
    """20 chat users at once, 500 feedback events: every one is stored."""
    store = Store.open()
    turn_ids = [make_turn(store) for _ in range(20)]
    errors = []

    def user(i):
        try:
            local = store  # one Store, a connection per thread
            cid = local.new_conversation()
            own = make_turn(local, cid, answer=f"answer {i}")
            for k in range(25):
                local.add_feedback(turn_ids[(i + k) % 20] if k % 2 else own, thumbs="down" if k % 3 else "up",
                                   comment=f"user {i} event {k}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count_feedback() == 500
    assert store.count_turns() == 40
    comments = {e["comment"] for t in store.iter_turns() for e in store.feedback_events(t["id"])}
    assert comments == {f"user {i} event {k}" for i in range(20) for k in range(25)}


def test_sync_state_attempts():
    store = Store.open()
    tid = make_turn(store)
    store.sync_mark("argilla", tid, content_hash="h1", status="failed", error="down")
    store.sync_mark("argilla", tid, content_hash="h1", status="failed", error="down again")
    assert store.sync_state("argilla")[tid]["attempts"] == 2
    store.sync_mark("argilla", tid, content_hash="h1", status="sent")
    state = store.sync_state("argilla")[tid]
    assert state["attempts"] == 0 and state["status"] == "sent" and state["content_hash"] == "h1"
    assert store.sync_state("other") == {}


def test_export_cli_prints_every_turn_with_feedback(loop_home):
    store = Store.open()
    tids = [make_turn(store) for _ in range(3)]
    store.add_feedback(tids[1], thumbs="down", reasons=["style"], correction="Better.")
    out = subprocess.run([sys.executable, "-m", "loop.store", "export"], capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in records] == tids
    assert records[1]["feedback"]["correction"] == "Better."
    assert len(records[1]["feedback_events"]) == 1
    assert records[0]["feedback"] is None


def test_sync_mark_many_matches_sync_mark():
    store = Store.open()
    tids = [make_turn(store) for _ in range(3)]
    store.sync_mark("argilla", tids[0], content_hash="old", status="failed", error="down")
    store.sync_mark_many("argilla", [
        {"turn_id": tids[0], "content_hash": "h0", "status": "failed", "error": "still down", "next_attempt_at": "later"},
        {"turn_id": tids[1], "content_hash": "h1", "status": "sent"},
        {"turn_id": tids[2], "content_hash": None, "status": "pending"},
    ])
    state = store.sync_state("argilla")
    assert state[tids[0]]["attempts"] == 2 and state[tids[0]]["last_error"] == "still down"
    assert state[tids[1]]["status"] == "sent" and state[tids[1]]["attempts"] == 0
    assert state[tids[2]]["content_hash"] is None
    with pytest.raises(ValueError):
        store.sync_mark_many("argilla", [{"turn_id": tids[1], "content_hash": "x", "status": "bogus"}])
    assert store.sync_state("argilla")[tids[1]]["content_hash"] == "h1"  # nothing half-applied
