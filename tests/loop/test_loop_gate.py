"""The promotion gate: what it promotes, what it refuses, and the numbers it reports."""

from __future__ import annotations

import json
import math

import pytest

from loop.config import ConfigError, GateConfig, load_config
from loop.core import arena
from loop.gate import decide

PASSED = {"passed": True, "reasons": []}
CURRENT = {"version": "v1", "heldout_loss": 2.00, "regression_loss": 1.50, "heldout_hash": "h1"}


def candidate(**over):
    base = {"version": "v2", "heldout_loss": 1.80, "regression_loss": 1.52, "heldout_hash": "h1",
            "status": "ok", "verification": PASSED}
    base.update(over)
    return base


def test_a_better_candidate_is_promoted_with_its_numbers():
    d = decide(candidate(), CURRENT, GateConfig(min_improvement=0.1, regression_tolerance=0.05))
    assert d.promote is True
    assert d.numbers["heldout_improvement"] == pytest.approx(0.20)
    assert d.numbers["regression_rel_change"] == pytest.approx(0.02 / 1.50)
    assert any("better by 0.2000" in r for r in d.reasons)
    json.dumps(d.to_dict())  # goes into the cycle report as is
    assert "PROMOTE" in d.summary()


@pytest.mark.parametrize("loss", [2.00, 2.30])
def test_a_worse_or_equal_model_is_refused(loss):
    d = decide(candidate(heldout_loss=loss), CURRENT, GateConfig())
    assert d.promote is False
    assert any("not above the margin" in r for r in d.reasons)


def test_improvement_must_reach_the_margin():
    gate = GateConfig(min_improvement=0.25)
    assert decide(candidate(heldout_loss=1.80), CURRENT, gate).promote is False  # 0.20 < 0.25
    assert decide(candidate(heldout_loss=1.70), CURRENT, gate).promote is True  # 0.30 >= 0.25


def test_regression_tolerance_is_relative():
    gate = GateConfig(regression_tolerance=0.05)
    within = decide(candidate(regression_loss=1.50 * 1.04), CURRENT, gate)
    beyond = decide(candidate(regression_loss=1.50 * 1.10), CURRENT, gate)
    assert within.promote is True
    assert beyond.promote is False
    assert beyond.numbers["regression_rel_change"] == pytest.approx(0.10)
    assert any("beyond the tolerance" in r for r in beyond.reasons)


@pytest.mark.parametrize(
    "over, why",
    [
        ({"verification": {"passed": False, "reasons": ["agreement 0.5 < 0.8"]}}, "verification failed: agreement 0.5"),
        ({"verification": None}, "verification missing"),
        ({"status": "failed", "error": "loss became NaN"}, "status is failed: loss became NaN"),
        ({"heldout_hash": "h2"}, "held-out sets differ"),
        ({"heldout_loss": math.nan}, "no finite held-out loss"),
        ({"regression_loss": None}, "no finite regression loss"),
    ],
)
def test_an_unusable_candidate_is_refused_however_good_its_loss(over, why):
    d = decide(candidate(**{"heldout_loss": 0.5, **over}), CURRENT, GateConfig())
    assert d.promote is False
    assert any(why in r for r in d.reasons), d.reasons


def test_the_current_version_must_have_been_scored():
    d = decide(candidate(), {"version": "v1"}, GateConfig())
    assert d.promote is False
    assert any("evaluate it first" in r for r in d.reasons)


def test_arena_criterion_uses_ratings():
    gate = GateConfig(use_arena=True, arena_min_games=5)
    wins_for_v2 = [{"version_a": "v2", "version_b": "v1", "winner": "a"}] * 6
    losses_for_v2 = [{"version_a": "v1", "version_b": "v2", "winner": "a"}] * 6
    assert decide(candidate(), CURRENT, gate, arena=arena.ratings(wins_for_v2)).promote is True
    refused = decide(candidate(), CURRENT, gate, arena=arena.ratings(losses_for_v2))
    assert refused.promote is False and any("below v1" in r for r in refused.reasons)
    assert refused.numbers["candidate_rating"] < refused.numbers["current_rating"]
    few = decide(candidate(), CURRENT, gate, arena=arena.ratings(wins_for_v2[:2]))
    assert few.promote is False and any("needs 5" in r for r in few.reasons)
    assert decide(candidate(), CURRENT, gate, arena=None).promote is False
    # Off by default: the same losing record does not block promotion.
    assert decide(candidate(), CURRENT, GateConfig(), arena=arena.ratings(losses_for_v2)).promote is True


def test_with_the_arena_on_an_unregistered_candidate_has_the_arena_rule_pending_not_refused():
    # What the cycle's gate stage sees: a candidate not registered yet has no id and no games.
    gate = GateConfig(use_arena=True, arena_min_games=5)
    unregistered = {k: v for k, v in candidate().items() if k != "version"}
    d = decide(unregistered, CURRENT, gate, arena=arena.ratings([]))
    assert d.promote is True and d.pending == ["arena"]
    assert d.to_dict()["pending"] == ["arena"] and "once arena is settled" in d.summary()
    # The losses still decide first: a worse candidate is refused, with nothing left pending.
    worse = decide({**unregistered, "heldout_loss": 2.5}, CURRENT, gate, arena=arena.ratings([]))
    assert worse.promote is False and worse.pending == []
    # Off: nothing is pending.
    assert decide(unregistered, CURRENT, GateConfig()).pending == []


@pytest.mark.parametrize("votes, verdict, why", [
    ([{"version_a": "v2", "version_b": "v1", "winner": "a"}] * 2, "wait", "v2 has 2 games, needs 5"),
    ([{"version_a": "v2", "version_b": "v1", "winner": "a"}] * 5, "pass", "arena: v2 rated"),
    ([{"version_a": "v1", "version_b": "v2", "winner": "a"}] * 5, "refuse", "below v1"),
])
def test_the_arena_verdict_for_a_registered_candidate_waits_passes_or_refuses(votes, verdict, why):
    from loop.gate import arena_verdict

    got, reason, numbers = arena_verdict("v2", "v1", arena.ratings(votes), GateConfig(use_arena=True, arena_min_games=5))
    assert got == verdict and why in reason
    assert numbers["candidate_games"] == len(votes)


def test_gate_and_registry_settings_come_from_config(loop_home, monkeypatch):
    (loop_home / "config.toml").write_text('[gate]\nmin_improvement = 0.02\nuse_arena = true\n'
                                           '[registry]\nhf_model_repo = "org/chat-model"\n')
    monkeypatch.setenv("LOOP_GATE__ARENA_MIN_GAMES", "3")
    cfg = load_config()
    assert (cfg.gate.min_improvement, cfg.gate.use_arena, cfg.gate.arena_min_games) == (0.02, True, 3)
    assert cfg.registry.hf_model_repo == "org/chat-model"
    monkeypatch.setenv("LOOP_GATE__ARENA_MIN_GAMES", "-1")
    monkeypatch.setenv("LOOP_REGISTRY__HF_SPACE_REPO", "not-a-repo-id")
    with pytest.raises(ConfigError) as err:
        load_config()
    text = str(err.value)
    assert "gate.arena_min_games" in text and "registry.hf_space_repo must look like" in text
