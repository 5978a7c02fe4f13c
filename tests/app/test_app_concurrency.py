"""Many users at once: 20 chat users through the engine, then 500 feedback events; none lost."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from app import feedback_panel
from app.generation import Sampling
from app.session import ChatSession, ShownTurn
from loop.core.reasons import REASONS_DOWN, REASONS_UP

USERS = 20
EVENTS_PER_USER = 25  # 20 x 25 = 500


def test_twenty_users_chat_and_give_500_feedback_events_at_once(engine):
    barrier = threading.Barrier(USERS)
    in_generation = []
    peak = [0]
    lock = threading.Lock()
    original_stream = type(engine._served.model).stream

    def watched_stream(self, *args, **kwargs):
        # Count generations running at once: the llama.cpp context must never be shared.
        with lock:
            in_generation.append(1)
            peak[0] = max(peak[0], len(in_generation))
        try:
            yield from original_stream(self, *args, **kwargs)
        finally:
            with lock:
                in_generation.pop()

    engine._served.model.stream = watched_stream.__get__(engine._served.model)

    def user(i: int) -> tuple[ChatSession, list[str]]:
        session = ChatSession()
        barrier.wait()  # all 20 ask at the same moment
        for event in engine.chat(conversation_id=None, history=[], user_message=f"User {i}: say hello.",
                                 sampling=Sampling(temperature=0.7, max_tokens=4)):
            if event.kind == "start":
                session.conversation_id = event.conversation_id
            if event.kind == "done":
                out = event.outcome
                session.turns.append(ShownTurn(out.turn_id, f"User {i}", out.answer, out.version_id))
        barrier.wait()  # then all give feedback at once, through the app's feedback path
        saved = []
        for j in range(EVENTS_PER_USER):
            thumbs = "down" if j % 2 else "up"
            reasons = [(REASONS_DOWN if thumbs == "down" else REASONS_UP)[j % 3]]
            panel = feedback_panel.on_like(session, engine.writer, 1, thumbs == "up")
            assert panel.ok, panel.notice
            panel = feedback_panel.submit(session, engine.writer, thumbs, reasons, f"user {i} event {j}", None)
            assert panel.ok, panel.notice
            saved.append(f"user {i} event {j}")
        return session, saved

    with ThreadPoolExecutor(USERS) as pool:
        results = list(pool.map(user, range(USERS)))

    assert peak[0] == 1  # generation was serialised
    engine.flush()
    turns = list(engine.store.iter_turns())
    assert len(turns) == USERS
    assert len({t["conversation_id"] for t in turns}) == USERS and all(t["position"] == 0 for t in turns)
    # Each submit is preceded by its thumb click: 2 x 500 events, and every comment is there once.
    assert engine.store.count_feedback() == 2 * USERS * EVENTS_PER_USER
    comments = [e["comment"] for t in turns for e in engine.store.feedback_events(t["id"]) if e["comment"]]
    assert sorted(comments) == sorted(c for _, saved in results for c in saved)
    assert len(comments) == 500
    for session, saved in results:  # and the latest event per turn is that user's last one
        latest = engine.store.latest_feedback(session.turns[0].turn_id)
        assert latest["comment"] == saved[-1]
    # Group commit: concurrent users shared transactions (fewer commits than writes).
    assert engine.writer.batches < USERS + 2 * USERS * EVENTS_PER_USER
