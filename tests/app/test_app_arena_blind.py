"""The Versions tab's arena stays blind next to the side-by-side view, and takes one vote per pair per session.

Two real models: the bundled SmolLM2 Q4_1 GGUF and the same weights requantised to Q4_0 by llama.cpp.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from loop.config import load_config
from loop.core.registry import Registry
from loop.core.store import Store

PROMPT = "Write a short story about a lighthouse keeper and a storm."


@pytest.fixture
def tab(bundled_gguf, requantized_gguf, monkeypatch):
    import gradio as gr

    from app.versions_tab import build_versions_tab

    monkeypatch.setenv("LOOP_APP__MAX_TOKENS", "24")
    registry = Registry()
    v1 = registry.register(bundled_gguf, base_model="SmolLM2", quantization="Q4_1", link=True,
                           verification={"passed": True})
    registry.register(requantized_gguf, base_model="SmolLM2", parent=v1.id, quantization="Q4_0",
                      verification={"passed": True})
    registry.promote(v1.id, reason="base")
    ctx = SimpleNamespace(config=load_config(), store=Store.open(), registry=registry)
    with gr.Blocks():
        logic = build_versions_tab(ctx)
    logic.rng = random.Random(11)
    yield logic
    logic.cache.close()


def session(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)


def test_side_by_side_answers_do_not_unmask_the_arenas(tab):
    state, answer_a, answer_b, _, _ = tab.arena_start(PROMPT, session("s1"))
    greedy = {vid: tab.answer(vid, PROMPT).answer for vid in (state["version_a"], state["version_b"])}
    assert greedy == {vid: tab.answer(vid, PROMPT).answer for vid in greedy}  # greedy is the same every time
    assert answer_a != greedy[state["version_a"]] and answer_b != greedy[state["version_b"]]
    again, *_ = tab.arena_start(PROMPT, session("s1"))  # a second ask draws new answers, not fixed ones
    assert {again["answer_a"], again["answer_b"]}.isdisjoint({answer_a, answer_b})


def test_side_by_side_refuses_the_prompt_open_in_the_arena_until_the_vote(tab):
    import gradio as gr

    state, *_ = tab.arena_start(PROMPT, session("s1"))
    a, b = state["version_a"], state["version_b"]
    with pytest.raises(gr.Error, match="open in the blind arena"):
        tab.side_by_side(PROMPT, a, b, state)
    tab.arena_vote("Tie", state, session("s1"))
    left, right = tab.side_by_side(PROMPT, a, b, state)
    assert left.startswith(f"**{a}**") and right.startswith(f"**{b}**")


def test_one_vote_per_pair_of_versions_per_session(tab):
    import gradio as gr

    first, *_ = tab.arena_start(PROMPT, session("s1"))
    second, *_ = tab.arena_start("Name a colour.", session("s1"))  # asked before voting on the first
    tab.arena_vote("A is better", first, session("s1"))
    with pytest.raises(gr.Error, match="already voted on this pair"):
        tab.arena_vote("B is better", second, session("s1"))
    with pytest.raises(gr.Error, match="voted on every pair"):
        tab.arena_start("Another question?", session("s1"))
    with pytest.raises(gr.Error, match="another session"):
        tab.arena_vote("A is better", second, session("s2"))
    other, *_ = tab.arena_start("Name a colour.", session("s2"))
    tab.arena_vote("B is better", other, session("s2"))
    assert [v["winner"] for v in tab.ctx.store.arena_votes()] == ["a", "b"]
