"""The group-commit writer: same rows as the store's own methods, durable before "saved", ordered."""

from __future__ import annotations

import queue
import sqlite3
import sys
import threading
import time

import pytest

from app.writer import StoreWriter
from loop.core.feedback import FeedbackError
from loop.core.store import Store

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
    pending = [writer.submit_turn(conversation_id=cid, messages=[{"role": "user", "content": str(i)}], answer="a")
               for i in range(200)]  # queued without waiting
    writer.close()
    ids = [p.wait(timeout=0) for p in pending]
    assert Store(tmp_path / "s.db").count_turns() == 200
    assert [t["id"] for t in store.conversation_turns(cid)] == ids  # positions follow queue order
    assert store._conn().execute("SELECT client FROM conversations WHERE id = ?", (cid,)).fetchone()[0] == "app"
    assert writer.batches < 200  # they shared commits


# -- nothing acknowledged is lost -----------------------------------------------------------------

def fail_turn_inserts(path) -> sqlite3.Connection:
    """A real SQLite fault: every INSERT into turns fails (as a full disk or an I/O error would)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TRIGGER fail_turns BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END")
    return db


def test_a_turn_id_is_returned_only_once_the_turn_is_committed(tmp_path):
    store = Store(tmp_path / "s.db")
    writer = StoreWriter(store)
    other = Store(tmp_path / "s.db")  # another connection: sees only what is committed
    for i in range(20):
        tid = writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": str(i)}], answer="a")
        assert other.get_turn(tid) is not None, f"turn {i} was handed out before its commit"
    writer.close()


def test_a_batch_that_fails_for_a_moment_is_retried_and_committed(tmp_path):
    store = Store(tmp_path / "s.db")
    fault = fail_turn_inserts(store.path)
    writer = StoreWriter(store, retry_delays=[0.2] * 20)
    result = {}
    t = threading.Thread(target=lambda: result.update(
        tid=writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")))
    t.start()
    deadline = time.monotonic() + 10
    while writer.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.failures >= 1 and "simulated disk failure" in writer.health()["error"]
    fault.execute("DROP TRIGGER fail_turns")  # the fault clears while the writer retries
    t.join(timeout=15)
    assert Store(tmp_path / "s.db").get_turn(result["tid"])["answer"] == "a"
    assert not writer.fallback_path.exists()
    assert writer.add_feedback(result["tid"], thumbs="up")
    writer.close()


def test_turns_the_store_keeps_refusing_go_to_a_fallback_file_that_the_next_start_replays(tmp_path):
    store = Store(tmp_path / "s.db")
    fault = fail_turn_inserts(store.path)
    writer = StoreWriter(store, retry_delays=[0.01, 0.01])
    tid = writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="kept")
    health = writer.health()
    assert health["fallback_rows"] >= 1 and "simulated disk failure" in health["error"]  # the error is visible
    assert store.get_turn(tid) is None and oct(writer.fallback_path.stat().st_mode & 0o777) == "0o600"
    # Feedback on that turn is acknowledged too: it waits in the fallback file behind its turn.
    fid = writer.add_feedback(tid, thumbs="down", comment="wrong")
    with pytest.raises(KeyError):  # an unknown turn is still refused
        writer.add_feedback("no-such-turn", thumbs="up")
    writer.close()

    fault.execute("DROP TRIGGER fail_turns")  # the disk is fixed; the app starts again
    restarted = StoreWriter(Store(tmp_path / "s.db"))
    assert not restarted.fallback_path.exists()
    turn = Store(tmp_path / "s.db").get_turn(tid)
    assert turn["answer"] == "kept" and turn["feedback"]["id"] == fid and turn["feedback"]["comment"] == "wrong"
    assert restarted.health()["fallback_rows"] == 0
    # Replaying twice (a crash between the replay's commit and the file's removal) adds nothing.
    restarted.close()
    writer.fallback_path.write_text("")
    StoreWriter(Store(tmp_path / "s.db")).close()
    assert store.count_turns() == 1 and store.count_feedback() == 1


def test_a_torn_last_line_in_the_fallback_file_is_skipped_and_the_rest_replayed(tmp_path):
    store = Store(tmp_path / "s.db")
    fault = fail_turn_inserts(store.path)
    writer = StoreWriter(store, retry_delays=[])
    tid = writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")
    writer.close()
    fault.execute("DROP TRIGGER fail_turns")
    with open(writer.fallback_path, "a") as f:
        f.write('{"kind": "turn", "id": "torn')  # a crash mid-append: never acknowledged
    StoreWriter(Store(tmp_path / "s.db")).close()
    assert store.get_turn(tid) is not None and store.count_turns() == 1


def test_close_racing_with_writers_hangs_no_one_and_loses_no_acknowledged_write(tmp_path):
    store = Store(tmp_path / "s.db")
    base = store.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the window between "closed?" and "queued"
    try:
        for round_ in range(30):
            writer = StoreWriter(store)
            acked, refused, go = [], [], threading.Event()

            def user(i):
                go.wait()
                for j in range(20):
                    try:
                        if j % 2:
                            acked.append(("fb", writer.add_feedback(base, thumbs="up")))
                        else:
                            acked.append(("turn", writer.log_turn(conversation_id="c", answer="a",
                                                                  messages=[{"role": "user", "content": "q"}])))
                    except RuntimeError as exc:  # WriterClosed: refused, so not acknowledged
                        refused.append(exc)

            threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(6)]
            for t in threads:
                t.start()
            go.set()
            time.sleep(0.0005 * round_)
            writer.close()
            for t in threads:
                t.join(timeout=15)
            assert not any(t.is_alive() for t in threads), f"round {round_}: a writer call hung after close()"
            for kind, rid in acked:
                found = store.get_turn(rid) if kind == "turn" else store._conn().execute(
                    "SELECT 1 FROM feedback WHERE id = ?", (rid,)).fetchone()
                assert found, f"round {round_}: acknowledged {kind} {rid} is not in the store"
            assert all("shutting down" in str(e) or "closed" in str(e) for e in refused)
    finally:
        sys.setswitchinterval(old_interval)


def test_a_write_caught_between_the_closed_check_and_the_enqueue_is_still_committed(tmp_path, monkeypatch):
    import types

    import app.writer

    entered = threading.Event()

    class SlowPutQueue(queue.Queue):
        """Holds the user's thread inside put() for a while: the scheduler's worst moment."""

        def put(self, item, *args, **kwargs):
            if threading.current_thread().name == "slow-user":
                entered.set()
                time.sleep(0.3)
            super().put(item, *args, **kwargs)

    monkeypatch.setattr(app.writer, "queue", types.SimpleNamespace(Queue=SlowPutQueue, Empty=queue.Empty))
    store = Store(tmp_path / "s.db")
    base = store.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")
    writer = StoreWriter(store)
    result = {}

    def user():
        try:
            result["fid"] = writer.add_feedback(base, thumbs="up")
        except RuntimeError as exc:
            result["refused"] = exc

    t = threading.Thread(target=user, name="slow-user", daemon=True)
    t.start()
    assert entered.wait(5)
    writer.close()  # runs while the user's write is between "not closed" and "queued"
    t.join(timeout=15)
    assert not t.is_alive(), "the feedback call hung: its write was queued after the stop marker"
    if "fid" in result:
        assert store._conn().execute("SELECT 1 FROM feedback WHERE id = ?", (result["fid"],)).fetchone()


def test_feedback_waits_at_most_its_timeout_and_says_so_when_the_store_is_locked(tmp_path):
    from app.writer import WriteTimeout

    store = Store(tmp_path / "s.db")
    writer = StoreWriter(store)
    tid = writer.log_turn(conversation_id="c", messages=[{"role": "user", "content": "q"}], answer="a")
    lock = sqlite3.connect(store.path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    t0 = time.monotonic()
    with pytest.raises(WriteTimeout, match="not confirmed saved within 0.5 s"):
        writer.add_feedback(tid, thumbs="up", comment="late", timeout=0.5)
    assert time.monotonic() - t0 < 3
    lock.execute("ROLLBACK")
    assert writer.flush(timeout=30)  # it was only late: once the lock is gone it is written
    assert store.latest_feedback(tid)["comment"] == "late"
    writer.close()
