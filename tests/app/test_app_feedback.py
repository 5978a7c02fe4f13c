"""Feedback mapping and the feedback panel's rules, against the real store (no browser)."""

from __future__ import annotations

from app import feedback_panel
from app.session import ChatSession, ShownTurn, session_from_store
from loop.core.feedback import MAX_COMMENT_CHARS
from loop.core.store import Store


def _logged_session(store: Store, n: int = 3) -> ChatSession:
    cid = store.new_conversation(client="test")
    session = ChatSession(conversation_id=cid)
    for i in range(n):
        tid = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": f"q{i}"}], answer=f"answer {i}",
                             model_version="v1", gguf_sha256="ab" * 32, sampling={"finish_reason": "stop"})
        session.turns.append(ShownTurn(tid, f"q{i}", f"answer {i}", "v1"))
    return session


def test_message_index_maps_to_turn_only_for_answers():
    s = ChatSession(turns=[ShownTurn("t0", "q", "a", "v1"), ShownTurn("t1", "q", "a", "v2")])
    assert [s.turn_at(i) for i in range(5)] == [None, 0, None, 1, None]
    assert s.turn_at((3, 1)) == 1 and s.turn_at(-1) is None and s.turn_at("1") is None and s.turn_at(True) is None
    msgs = s.chat_messages()
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert "model v2" in msgs[3]["content"]  # each answer says which version wrote it


def test_history_excludes_an_answer_still_streaming():
    s = ChatSession(turns=[ShownTurn("t0", "q0", "a0", "v1"), ShownTurn(None, "q1", "partial", "v1")])
    assert s.history() == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]


def test_thumb_click_is_saved_at_once_and_opens_the_panel():
    store = Store.open()
    session = _logged_session(store)
    panel = feedback_panel.on_like(session, store, 3, False)  # message 3 = the second answer
    assert panel.visible and panel.ok and panel.turn == 1 and panel.thumbs == "down"
    assert panel.correction == "answer 1"  # "suggest a better answer" starts from the answer
    assert store.latest_feedback(session.turns[1].turn_id)["thumbs"] == "down"
    assert store.latest_feedback(session.turns[0].turn_id) is None
    assert session.feedback_value() == [None, "Dislike", None]


def test_like_on_a_user_message_or_unfinished_answer_records_nothing():
    store = Store.open()
    session = _logged_session(store, 1)
    session.turns.append(ShownTurn(None, "q", "partial", "v1"))
    assert not feedback_panel.on_like(session, store, 0, True).ok
    assert "Wait for the answer" in feedback_panel.on_like(session, store, 3, True).notice
    assert store.count_feedback() == 0


def test_full_feedback_then_a_change_later_latest_counts():
    store = Store.open()
    session = _logged_session(store)
    feedback_panel.on_like(session, store, 1, False)
    p = feedback_panel.submit(session, store, "down", ["not_factually_correct", "incomplete"], "Wrong.", "The right answer.")
    assert p.ok and not p.visible
    tid = session.turns[0].turn_id
    latest = store.latest_feedback(tid)
    assert (latest["thumbs"], latest["reasons"], latest["comment"], latest["correction"]) == (
        "down", ["not_factually_correct", "incomplete"], "Wrong.", "The right answer.")
    # Later the user changes their mind: a new event, and the latest one counts.
    feedback_panel.on_like(session, store, 1, True)
    feedback_panel.submit(session, store, "up", ["accurate"], "", "answer 0")
    latest = store.latest_feedback(tid)
    assert latest["thumbs"] == "up" and latest["reasons"] == ["accurate"] and latest["correction"] is None
    assert len(store.feedback_events(tid)) == 4


def test_unchanged_correction_is_not_a_correction_and_wrong_direction_reasons_are_cleaned():
    store = Store.open()
    session = _logged_session(store, 1)
    feedback_panel.on_like(session, store, 1, True)
    p = feedback_panel.submit(session, store, "up", ["accurate", "style"], "ok\x07", "answer 0  ")
    assert p.ok and "style" in p.notice and "control character" in p.notice
    latest = store.latest_feedback(session.turns[0].turn_id)
    assert latest["reasons"] == ["accurate"] and latest["correction"] is None and latest["comment"] == "ok"


def test_malformed_feedback_is_rejected_and_the_turn_untouched():
    store = Store.open()
    session = _logged_session(store, 1)
    tid = session.turns[0].turn_id
    before = store.get_turn(tid)
    feedback_panel.on_like(session, store, 1, False)
    events = store.feedback_events(tid)
    huge = feedback_panel.submit(session, store, "down", ["style"], "x" * (MAX_COMMENT_CHARS + 1), None)
    assert not huge.ok and huge.visible and "limit" in huge.notice  # the panel stays open to fix it
    unknown = feedback_panel.submit(session, store, None, ["made_up_reason"], None, None)
    assert not unknown.ok and "unknown reason" in unknown.notice
    assert store.feedback_events(tid) == events
    after = store.get_turn(tid)
    for key in ("answer", "messages", "model_version", "sampling", "created_at"):
        assert after[key] == before[key]


def test_submit_without_a_selected_answer_is_refused():
    store = Store.open()
    session = _logged_session(store, 1)
    assert not feedback_panel.submit(session, store, "up", [], None, None).ok
    assert store.count_feedback() == 0


def test_session_rebuilt_from_store_after_reload():
    store = Store.open()
    session = _logged_session(store, 2)
    feedback_panel.on_like(session, store, 3, False)
    again = session_from_store(store, session.conversation_id)
    assert [t.turn_id for t in again.turns] == [t.turn_id for t in session.turns]
    assert again.feedback_value() == [None, "Dislike"] and again.turns[1].answer == "answer 1"
    assert session_from_store(store, "no-such-conversation") is None
