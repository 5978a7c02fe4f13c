"""The group-commit writer: same rows as the store's own methods, durable before "saved", ordered."""

from __future__ import annotations

import threading

import pytest

from app.writer import StoreWriter
from loop.feedback import FeedbackError
from loop.store import Store

TURN = dict(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "héllo"}], answer="a",
            model_version="v3", gguf_sha256="ab" * 32, sampling={"temperature": 0.2, "seed": 7}, latency_s=1.5,
            ttft_s=0.25, prompt_tokens=12, completion_tokens=3, logprob_mean=-0.5, logprob_min=-2.0,
            turn_id="01TURN", created_at="2026-11-27T00:00:00+00:00")


def rows(store: Store, table: str, skip: tuple[str, ...]) -> list[dict]:
    return [{k: r[k] for k in r.keys() if k not in skip} for r in store._conn().execute(f"SELECT * FROM {table}")]


def test_writer_rows_equal_the_stores_own(tmp_path):
    direct, batched = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    direct.log_turn(conversation_id="c1", **TURN)
    direct.add_feedback("01TURN", "down", ["style"], "c\x07", "better")
    writer = StoreWriter(batched)
    writer.log_turn(conversation_id="c1", **TURN)
    _, clean = writer.add_feedback_checked("01TURN", "down", ["style"], "c\x07", "better")
    writer.close()
    assert clean.notes  # the control character was cleaned, as the store does
    assert rows(direct, "turns", ()) == rows(batched, "turns", ())
    assert rows(direct, "feedback", ("id", "created_at")) == rows(batched, "feedback", ("id", "created_at"))
    # A second turn in the conversation gets the next position, as with the store.
    writer2 = StoreWriter(batched)
    writer2.log_turn(conversation_id="c1", **{**TURN, "turn_id": "01TURN2"})
    writer2.close()
    assert batched.get_turn("01TURN2")["position"] == 1


def test_feedback_is_durable_when_the_call_returns_and_a_bad_one_fails_alone(tmp_path):
    store = Store(tmp_path / "s.db")
    writer = StoreWriter(store)
    tid = writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")
    # Queued right behind its turn: FIFO order means the turn is there when the feedback lands.
    writer.add_feedback(tid, thumbs="up")
    other = Store(tmp_path / "s.db")  # a separate connection sees it committed
    assert other.latest_feedback(tid)["thumbs"] == "up"

    errors, barrier = [], threading.Barrier(9)

    def give(i):
        barrier.wait()
        try:
            writer.add_feedback(tid if i else "no-such-turn", thumbs="down", comment=f"c{i}")
        except KeyError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=give, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "no-such-turn" in str(errors[0])
    assert sorted(e["comment"] for e in other.feedback_events(tid) if e["comment"]) == [f"c{i}" for i in range(1, 9)]
    writer.close()


def test_malformed_feedback_is_refused_before_it_is_queued(tmp_path):
    store = Store(tmp_path / "s.db")
    writer = StoreWriter(store)
    tid = writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")
    with pytest.raises(FeedbackError, match="unknown reason"):
        writer.add_feedback(tid, thumbs="down", reasons=["nope"])
    with pytest.raises(ValueError, match="messages"):
        writer.log_turn(conversation_id="c", messages="not a list", answer="a")
    writer.close()
    assert store.count_feedback() == 0 and store.count_turns() == 1
    with pytest.raises(RuntimeError, match="closed"):
        writer.log_turn(conversation_id="c", messages=[], answer="late")


def test_close_commits_what_is_queued(tmp_path):
    store = Store(tmp_path / "s.db")
    writer = StoreWriter(store)
    cid = writer.new_conversation(client="app")
    ids = [writer.log_turn(conversation_id=cid, messages=[{"role": "user", "content": str(i)}], answer="a")
           for i in range(200)]
    writer.close()
    assert Store(tmp_path / "s.db").count_turns() == 200
    assert [t["id"] for t in store.conversation_turns(cid)] == ids  # positions follow queue order
    assert store._conn().execute("SELECT client FROM conversations WHERE id = ?", (cid,)).fetchone()[0] == "app"
    assert writer.batches < 200  # they shared commits
