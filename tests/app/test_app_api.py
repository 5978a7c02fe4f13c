"""The app's documented API, through the running app (`python -m app` on a free loopback port):
`/ask` returns the turn id, `/feedback` takes it and answers only once the event is durable,
from `gradio_client` and from plain HTTP alike."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from loop.core.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.load_test import ApiError, App, call, free_port  # noqa: E402


@pytest.fixture
def running_app(loop_home, tmp_path):
    app = App(loop_home, free_port(), 8, tmp_path / "app.log")
    app.start()
    yield app
    app.stop()


def test_a_program_chats_and_gives_feedback_by_turn_id_through_gradio_client_and_plain_http(running_app, loop_home):
    from gradio_client import Client

    client = Client(running_app.url, verbose=False)
    first = client.predict("Say hello.", api_name="/ask")
    assert set(first) >= {"turn_id", "conversation_id", "answer", "version", "finish_reason"}
    assert first["version"] == "v1"
    second = client.predict("And again.", first["conversation_id"], api_name="/ask")
    assert second["conversation_id"] == first["conversation_id"] and second["turn_id"] != first["turn_id"]

    fb = client.predict(second["turn_id"], "down", ["incomplete", "style"], "too short", "Hello there!",
                        api_name="/feedback")
    # Durable when answered: a separate connection to the store sees it at once.
    store = Store(loop_home / "store.db")
    latest = store.latest_feedback(second["turn_id"])
    assert latest["id"] == fb["feedback_id"] and latest["reasons"] == ["incomplete", "style"]
    assert latest["correction"] == "Hello there!" and latest["source"] == "api"
    turns = store.conversation_turns(first["conversation_id"])
    assert [t["id"] for t in turns] == [first["turn_id"], second["turn_id"]]
    assert turns[1]["messages"][-3]["content"] == "Say hello."  # the second turn saw the first

    with pytest.raises(Exception, match="no turn with id"):
        client.predict("no-such-turn", "up", [], "", "", api_name="/feedback")
    with pytest.raises(Exception, match="unknown reason"):
        client.predict(first["turn_id"], "up", ["nope"], "", "", api_name="/feedback")
    assert store.count_feedback() == 1

    # The same through plain HTTP (Gradio's /gradio_api/call/<name>), as curl would.
    with httpx.Client(base_url=running_app.url, timeout=120) as http:
        turn = call(http, "ask", ["What is 2 + 2?", "", "", 0.0, 4], 120)
        fb = call(http, "feedback", [turn["turn_id"], "up", ["accurate"], "", ""], 120)
        with pytest.raises(ApiError):
            call(http, "feedback", [turn["turn_id"], "sideways", [], "", ""], 120)
    assert Store(loop_home / "store.db").latest_feedback(turn["turn_id"])["id"] == fb["feedback_id"]
