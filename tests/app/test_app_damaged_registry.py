"""A damaged ``current.json`` never takes the app down: it says why and serves what it can.

Real engine, real bundled model, real registry; the pointer is damaged the way a crash of an older
version, a full disk or a hand edit leaves it.
"""

from __future__ import annotations

from app.engine import Engine
from app.generation import Sampling
from app.versions_tab import VersionsTab
from loop.config import load_config

TORN = b'{"version": "v1", "prev'


def test_a_running_app_keeps_serving_its_model_when_the_pointer_is_damaged_and_recovers_on_repair(engine, registry):
    assert engine.status()["version"] == "v1"
    registry.current_file.write_bytes(TORN)

    status = engine.status()
    assert status["version"] == "v1" and status["current"] is None
    assert "current.json is damaged" in status["error"]
    events = list(engine.chat(conversation_id=None, history=[], user_message="Hello?",
                              sampling=Sampling(temperature=0.0, max_tokens=4)))
    assert events[-1].kind == "done" and events[-1].outcome.version_id == "v1"

    registry.rollback("v1", reason="test: repair the pointer")
    status = engine.status()
    assert status["current"] == "v1" and status["error"] is None


def test_the_app_starts_on_a_damaged_pointer_and_its_versions_tab_still_lists_versions(loop_home, registry):
    Engine(load_config()).close()  # bootstrap: v1 registered and current
    registry.current_file.write_bytes(TORN)
    eng = Engine(load_config())
    try:
        status = eng.status()
        assert status["version"] is None and "current.json is damaged" in status["error"]
        tab = VersionsTab(eng)
        figure, choice_a, choice_b, rows = tab.refresh()
        assert choice_a["choices"] == ["v1"] and choice_a["value"] is None
    finally:
        eng.close()
