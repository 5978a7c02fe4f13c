"""Nothing acknowledged is lost, through the real engine (the bundled model, a real store):
a turn id is handed out only for a committed turn, and shutdown keeps the streams still running."""

from __future__ import annotations

import sqlite3
import threading

from app.generation import Sampling
from loop.core.store import Store

LONG = Sampling(temperature=0.7, max_tokens=200, seed=1)


def test_the_done_event_carries_a_turn_id_that_is_already_committed(engine):
    other = Store(engine.store.path)  # another connection sees only committed rows
    for i in range(5):
        done = [e for e in engine.chat(conversation_id=None, history=[], user_message=f"Say hi {i}.",
                                       sampling=Sampling(temperature=0.7, max_tokens=4)) if e.kind == "done"][0]
        assert other.get_turn(done.outcome.turn_id) is not None, "a turn id was handed out before its commit"


def test_a_stream_whose_consumer_is_parked_at_shutdown_keeps_its_turn(engine):
    stream = engine.chat(conversation_id=None, history=[], user_message="Tell me a long story.", sampling=LONG)
    start = next(stream)
    seen = ""
    for event in stream:  # the user has seen a few tokens; the server then shuts down
        seen += event.text
        if len(seen) > 10:
            break
    engine.close()
    turns = Store(engine.store.path).conversation_turns(start.conversation_id)
    assert len(turns) == 1, "the turn of a stream running at shutdown was lost"
    assert turns[0]["sampling"]["finish_reason"] == "shutdown"
    assert turns[0]["answer"] and seen.strip().startswith(turns[0]["answer"][:5])


def test_a_stream_generating_at_shutdown_stops_and_keeps_its_turn(engine):
    events, first_delta = [], threading.Event()

    def user():
        for event in engine.chat(conversation_id=None, history=[], user_message="Tell me a long story.",
                                 sampling=LONG):
            events.append(event)
            if event.kind == "delta":
                first_delta.set()

    t = threading.Thread(target=user)
    t.start()
    assert first_delta.wait(120)
    engine.close()
    t.join(timeout=60)
    assert not t.is_alive()
    done = [e for e in events if e.kind == "done"]
    assert done and done[0].outcome.turn_id and done[0].outcome.finish_reason == "shutdown"
    assert Store(engine.store.path).get_turn(done[0].outcome.turn_id)["sampling"]["finish_reason"] == "shutdown"


def test_a_failing_store_is_shown_in_the_status_and_the_turn_still_gets_a_durable_id(engine):
    engine.writer.retry_delays = (0.01,)
    fault = sqlite3.connect(engine.store.path, isolation_level=None)
    fault.execute("CREATE TRIGGER fail_turns BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END")
    done = [e for e in engine.chat(conversation_id=None, history=[], user_message="Hi",
                                   sampling=Sampling(temperature=0.7, max_tokens=4)) if e.kind == "done"][0]
    tid = done.outcome.turn_id
    assert tid and engine.store.get_turn(tid) is None  # in the fallback file, not the store
    assert any("fallback file" in n and "simulated disk failure" in n for n in engine.status()["notices"])
    engine.writer.add_feedback(tid, thumbs="up", comment="kept")
    engine.close()
    fault.execute("DROP TRIGGER fail_turns")
    from app.engine import Engine
    from loop.config import load_config

    restarted = Engine(load_config())  # the next start replays the fallback file
    try:
        assert restarted.store.get_turn(tid)["feedback"]["comment"] == "kept"
        assert not any("fallback" in n for n in restarted.status()["notices"])
    finally:
        restarted.close()
