"""Acceptance: a canary judged by simulated users through the running app's HTTP API.

The real app (``python -m app`` on a loopback port, the bundled model) answers ``/ask``; a scripted
user gives ``/feedback`` thumbs, more often down on answers from the version it dislikes (told
apart by the version tag on each turn: both versions are the same base file). The cycle's own
canary stage, called between batches as the scheduler would, reads the store and decides. A worse
canary is rolled back, a better one promoted, and the app follows either without a restart; a
canary whose GGUF disappears is rolled back by the app itself while the chat keeps answering.
The Versions tab plots both arms' thumbs-down rates with their intervals.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from loop.config import load_config
from loop.core.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.load_test import App, call, free_port  # noqa: E402

MIN_RATED = 8


@pytest.fixture
def canary_app(loop_home, tmp_path, monkeypatch, bundled_gguf):
    from loop.core.bootstrap import ensure_base_version

    monkeypatch.setenv("LOOP_ROLLOUT__CANARY_SHARE", "0.5")
    monkeypatch.setenv("LOOP_ROLLOUT__MIN_RATED_TURNS", str(MIN_RATED))
    registry = Registry()
    ensure_base_version(load_config(), registry)  # v1, current

    def register_copy() -> str:
        src = tmp_path / f"copy-{len(registry.list())}.gguf"
        shutil.copyfile(bundled_gguf, src)
        return registry.register(src, base_model="test", verification={"passed": True}).id

    app = App(loop_home, free_port(), 4, tmp_path / "app.log")
    app.start()
    try:
        with httpx.Client(base_url=app.url, timeout=120) as http:
            yield app, http, registry, register_copy
    finally:
        app.stop()


def _judge_until_decided(http: httpx.Client, disliked: str, rng: random.Random, max_asks: int = 120) -> dict:
    """Ask in new conversations and rate each answer (down 85% of the time on ``disliked``'s answers,
    15% on the other's), running the cycle's canary stage every 8 answers until it acts."""
    from loop.cycle import Cycle
    from loop.cycle_stages import stage_canary

    cycle = Cycle(load_config(), progress=False, log=lambda m: None)
    seen: dict[str, int] = {}
    for i in range(1, max_asks + 1):
        turn = call(http, "ask", [f"Question {i}: name a colour.", "", "", 0.0, 4], 120)
        seen[turn["version"]] = seen.get(turn["version"], 0) + 1
        p_down = 0.85 if turn["version"] == disliked else 0.15
        call(http, "feedback", [turn["turn_id"], "down" if rng.random() < p_down else "up", [], "", ""], 120)
        if i % 8 == 0:
            result = stage_canary(cycle.ctx, None).to_dict()
            if result.get("action") in ("promoted", "rolled_back"):
                return {**result, "asks": i, "seen": seen}
    raise AssertionError(f"no decision after {max_asks} rated answers: {seen}")


@pytest.mark.slow
def test_users_thumbs_roll_back_a_worse_canary_and_promote_a_better_one_through_the_apps_api(canary_app):
    app, http, registry, register_copy = canary_app
    rng = random.Random(7)

    # A worse canary: the scripted user dislikes v2's answers.
    v2 = register_copy()
    registry.start_canary(v2, share=0.5, reason="test: gate passed")
    first = call(http, "ask", ["Hello.", "", "", 0.0, 4], 120)
    follow = call(http, "ask", ["And again.", first["conversation_id"], "", 0.0, 4], 120)
    assert follow["version"] == first["version"]  # sticky for the whole conversation
    decided = _judge_until_decided(http, disliked=v2, rng=rng)
    assert decided["action"] == "rolled_back", decided
    assert decided["seen"].get(v2, 0) >= MIN_RATED and decided["seen"].get("v1", 0) >= MIN_RATED
    assert registry.current_id() == "v1" and registry.canary_id() is None
    assert {call(http, "ask", [f"After rollback {i}.", "", "", 0.0, 4], 120)["version"] for i in range(4)} == {"v1"}

    # A better canary: now the user dislikes the current version's answers.
    v3 = register_copy()
    registry.start_canary(v3, share=0.5, reason="test: gate passed")
    decided = _judge_until_decided(http, disliked="v1", rng=rng)
    assert decided["action"] == "promoted", decided
    assert registry.current_id() == v3 and registry.history()[-1]["action"] == "promote"
    assert {call(http, "ask", [f"After promotion {i}.", "", "", 0.0, 4], 120)["version"] for i in range(4)} == {v3}
    log = registry.canary_log()
    assert [(e["version"], e["action"]) for e in log if e["action"] != "start"] == [(v2, "rolled_back"),
                                                                                   (v3, "promoted")]


@pytest.mark.slow
def test_a_canary_whose_gguf_goes_missing_is_rolled_back_with_a_logged_reason_and_the_chat_keeps_answering(
        canary_app):
    app, http, registry, register_copy = canary_app
    v2 = register_copy()
    registry.start_canary(v2, share=0.99, reason="test")
    registry.get(v2).gguf_path.unlink()
    answers = [call(http, "ask", [f"Still there? {i}", "", "", 0.0, 4], 120) for i in range(3)]
    assert all(a["answer"] is not None and a["version"] == "v1" for a in answers)
    assert registry.canary_id() is None and registry.current_id() == "v1"
    last = registry.canary_log()[-1]
    assert last["action"] == "rolled_back" and "model file not found" in last["reason"]
    assert "rolling back canary" in app.log.read_text()


def test_the_versions_tab_plots_both_arms_thumbs_down_rates_with_intervals(loop_home, bundled_gguf):
    from types import SimpleNamespace

    from app.versions_tab import VersionsTab
    from loop.core.store import Store

    registry = Registry()
    v1 = registry.register(bundled_gguf, base_model="test", verification={"passed": True}, link=True).id
    registry.promote(v1, reason="base")
    v2 = registry.register(bundled_gguf, base_model="test", verification={"passed": True}, link=True).id
    store = Store.open()
    tab = VersionsTab(SimpleNamespace(config=load_config(), store=store, registry=registry))
    assert "no canary running" in tab.canary_plot().axes[0].texts[0].get_text()

    registry.start_canary(v2, share=0.5, reason="test")
    for i in range(20):
        version = v2 if i % 2 else v1
        tid = store.log_turn(conversation_id=store.new_conversation(), messages=[{"role": "user", "content": "q"}],
                             answer="a", model_version=version)
        store.add_feedback(tid, thumbs="down" if (version == v2) == (i % 4 == 1) else "up")
    data, points = tab.canary_data()
    assert data["canary"] == v2 and {p["version"] for p in points} == {v1, v2}
    assert all(p["low"] <= p["rate"] <= p["high"] for p in points)
    ax = tab.canary_plot().axes[0]
    assert sorted(line.get_label().split()[1] for line in ax.get_lines()) == sorted([v1, v2])
    assert len(ax.collections) == 2  # one interval band per arm
