"""Arena votes and ratings, and the Versions tab's arena driven with the real small model."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from loop.config import load_config
from loop.core import arena
from loop.core.registry import Registry
from loop.core.store import Store


def vote(a: str, b: str, winner: str) -> dict:
    return {"version_a": a, "version_b": b, "winner": winner}


def test_votes_persist_across_store_reopen(loop_home):
    store = Store.open()
    for _ in range(3):
        store.add_arena_vote("What is 2+2?", "v2", "v1", "4", "5", "a")
    store.add_arena_vote("Hi", "v1", "v2", "Hello!", "Hey.", "tie")
    before = arena.ratings(store.arena_votes())
    store.close()

    reopened = Store.open()
    votes = reopened.arena_votes()
    assert [(v["version_a"], v["version_b"], v["winner"]) for v in votes] == [("v2", "v1", "a")] * 3 + [("v1", "v2", "tie")]
    assert votes[0]["prompt"] == "What is 2+2?" and votes[0]["answer_b"] == "5"
    assert arena.ratings(votes) == before
    assert before["v2"]["rating"] > before["v1"]["rating"]
    with pytest.raises(ValueError):
        reopened.add_arena_vote("x", "v1", "v2", "a", "b", "both")


def test_repeated_wins_raise_a_rating_and_flipping_votes_flips_the_order():
    votes = [vote("A", "B", "a")] * 8 + [vote("B", "A", "b")] * 4 + [vote("A", "B", "b")] * 2
    r = arena.ratings(votes)
    assert r["A"]["rating"] > r["B"]["rating"]
    assert (r["A"]["wins"], r["A"]["losses"], r["A"]["games"]) == (12, 2, 14)

    flip = {"a": "b", "b": "a", "tie": "tie"}
    flipped = arena.ratings([dict(v, winner=flip[v["winner"]]) for v in votes])
    assert flipped["B"]["rating"] > flipped["A"]["rating"]
    assert flipped["B"]["rating"] == pytest.approx(r["A"]["rating"], abs=0.2)  # symmetric
    # More evidence, stronger belief: the prior matters less.
    more = arena.ratings(votes * 5)
    assert more["A"]["rating"] - more["B"]["rating"] > r["A"]["rating"] - r["B"]["rating"]


def test_ties_count_half_and_the_prior_keeps_ratings_finite():
    even = arena.ratings([vote("A", "B", "tie")] * 6)
    assert even["A"]["rating"] == pytest.approx(even["B"]["rating"])
    split = arena.ratings([vote("A", "B", "a"), vote("A", "B", "b")])
    assert split["A"]["rating"] == pytest.approx(split["B"]["rating"])
    one = arena.ratings([vote("A", "B", "a")])
    assert 1000 < one["A"]["rating"] < 1200 and one["A"]["rating"] + one["B"]["rating"] == pytest.approx(2000, abs=0.2)
    # Ties pull towards equality: 2 wins + 2 ties is weaker evidence than 4 wins.
    assert arena.ratings([vote("A", "B", "a")] * 2 + [vote("A", "B", "tie")] * 2)["A"]["rating"] < \
        arena.ratings([vote("A", "B", "a")] * 4)["A"]["rating"]


def test_ratings_are_transitive_and_list_versions_without_votes():
    r = arena.ratings([vote("A", "B", "a")] * 5 + [vote("B", "C", "a")] * 5, versions=["D"])
    assert r["A"]["rating"] > r["B"]["rating"] > r["C"]["rating"]
    assert r["D"] == {"rating": 1000.0, "games": 0, "wins": 0, "losses": 0, "ties": 0, "score": 0.0}
    assert [v for v, _ in arena.leaderboard(r)][0] == "A"
    assert arena.win_probability(r["A"]["rating"], r["C"]["rating"]) > 0.75
    with pytest.raises(ValueError):
        arena.ratings([vote("A", "B", "draw")])


# -- the Versions tab, with the real model --------------------------------------------------------------


def test_versions_tab_arena_side_by_side_and_plot(bundled_gguf, requantized_gguf, monkeypatch):
    import gradio as gr

    from app.versions_tab import build_versions_tab

    monkeypatch.setenv("LOOP_APP__MAX_TOKENS", "12")
    config = load_config()
    registry = Registry()
    v1 = registry.register(bundled_gguf, base_model="SmolLM2", quantization="Q4_1", link=True,
                           verification={"passed": True}, metrics={"heldout_loss": 2.0, "regression_loss": 1.5})
    v2 = registry.register(requantized_gguf, base_model="SmolLM2", parent=v1.id, quantization="Q4_0",
                           verification={"passed": True}, metrics={"heldout_loss": 1.9, "regression_loss": 1.55})
    bad = registry.register(requantized_gguf, base_model="SmolLM2", verification={"passed": False})
    registry.promote(v1.id, reason="base")
    ctx = SimpleNamespace(config=config, store=Store.open(), registry=registry)

    with gr.Blocks():
        tab = build_versions_tab(ctx)
    tab.rng = random.Random(7)
    assert tab.version_ids() == [v1.id, v2.id]  # a version that failed verification never answers users

    state, ans_a, ans_b, _, _ = tab.arena_start("What is the capital of France?")
    assert {state["version_a"], state["version_b"]} == {v1.id, v2.id}
    assert ans_a and ans_b and ans_a == state["answer_a"]
    winner = state["version_b"]
    cleared, reveal, _, rows = tab.arena_vote("B is better", state)
    assert cleared is None and winner in reveal
    stored = ctx.store.arena_votes()
    assert len(stored) == 1 and stored[0]["winner"] == "b" and stored[0]["version_b"] == winner
    assert stored[0]["answer_a"] == ans_a
    assert rows[0][0] == winner and rows[0][1] > rows[1][1]  # the winner tops the board
    with pytest.raises(gr.Error):
        tab.arena_vote("A is better", state)  # the same answer pair counts once
    assert len(ctx.store.arena_votes()) == 1
    with pytest.raises(gr.Error):
        tab.arena_start("   ")

    left, right = tab.side_by_side("Name a colour.", v1.id, v2.id)
    assert left.startswith(f"**{v1.id}**") and right.startswith(f"**{v2.id}**") and "tokens" in left
    assert len(tab.cache) == 2  # loaded once per version, reused by the arena and side by side

    fig = tab.figure()
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == [f"{v1.id}*", v2.id, bad.id]
    # Held-out losses come from each cycle's own held-out set: never plotted across versions (only
    # the fixed measures are, and none is cached here); the arena panel has its line once there are votes.
    assert not any("held-out" in line.get_label() for a in fig.axes for line in a.get_lines())
    assert [line.get_label() for line in fig.axes[2].get_lines()] == ["arena rating"]
    tab.cache.close()
