"""Canary rollout: the statistic, the decision, the registry's canary pointer, the check on a real
store, and the cycle's canary stage (``loop/rollout.py``, docs/rollout.md)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from loop.config import ConfigError, RolloutConfig, load_config
from loop.core.canary import Arm, decide, prob_canary_worse, rated_turns, status
from loop.core.registry import Registry, RegistryError, canary_arm
from loop.core.store import Store
from loop.rollout import check_canary

RULES = RolloutConfig(canary_share=0.5, min_rated_turns=10)


def _copy(src: Path, dst: Path) -> Path:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


@pytest.fixture
def two_versions(loop_home, bundled_gguf, tmp_path):
    """A registry with v1 current and v2 registered (both the bundled GGUF)."""
    registry = Registry()
    v1 = registry.register(bundled_gguf, base_model="test", verification={"passed": True}, link=True)
    registry.promote(v1.id, reason="base")
    v2 = registry.register(_copy(bundled_gguf, tmp_path / "v2.gguf"), base_model="test", parent=v1.id,
                           verification={"passed": True})
    return registry, v1.id, v2.id


def _rate(store: Store, version: str, thumbs: list[str | None]) -> list[str]:
    ids = []
    for t in thumbs:
        cid = store.new_conversation(client="test")
        tid = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": "q"}], answer="a",
                             model_version=version)
        if t is not None:
            store.add_feedback(tid, thumbs=t)
        ids.append(tid)
    return ids


# -- the statistic and the rule -------------------------------------------------------------------

def test_the_probability_that_the_canary_is_worse_matches_a_monte_carlo_estimate():
    import numpy as np

    rng = np.random.default_rng(0)
    c, b = Arm("c", 40, 14), Arm("b", 60, 15)
    draws_c, draws_b = rng.beta(1 + 14, 1 + 26, 400_000), rng.beta(1 + 15, 1 + 45, 400_000)
    for margin in (0.0, 0.05):
        assert prob_canary_worse(c, b, margin) == pytest.approx((draws_c > draws_b + margin).mean(), abs=0.004)
    assert prob_canary_worse(Arm("c", 10, 5), Arm("b", 10, 5)) == pytest.approx(0.5, abs=1e-6)
    lo, hi = Arm("x", 100, 30).interval()
    assert lo < 0.30 < hi and hi - lo < 0.2


def test_nothing_is_decided_before_each_arm_has_the_minimum_of_rated_turns_however_clear_the_evidence():
    verdict = decide(Arm("v2", 9, 9), Arm("v1", 200, 0), RULES)
    assert verdict.decision == "continue" and "needs 10 in each" in verdict.reason
    assert decide(Arm("v2", 10, 10), Arm("v1", 200, 0), RULES).decision == "rollback"
    assert decide(Arm("v2", 200, 0), Arm("v1", 9, 9), RULES).decision == "continue"


def test_a_worse_canary_is_rolled_back_a_better_or_equal_one_promoted_and_a_close_call_keeps_running():
    assert decide(Arm("v2", 30, 20), Arm("v1", 30, 5), RULES).decision == "rollback"
    assert decide(Arm("v2", 30, 3), Arm("v1", 30, 20), RULES).decision == "promote"
    assert decide(Arm("v2", 2000, 600), Arm("v1", 2000, 600), RULES).decision == "promote"  # no worse: kept
    close = decide(Arm("v2", 20, 7), Arm("v1", 20, 6), RULES)
    assert close.decision == "continue" and close.p_worse is not None


def test_at_the_deadline_an_undecided_canary_gets_the_stated_default_which_keeps_the_current_version():
    assert RolloutConfig().on_deadline == "rollback"
    assert decide(Arm("v2", 3, 1), Arm("v1", 3, 1), RULES, expired=True).decision == "rollback"
    assert decide(Arm("v2", 20, 7), Arm("v1", 20, 6), RULES, expired=True).decision == "rollback"
    eager = replace(RULES, on_deadline="promote")
    assert decide(Arm("v2", 20, 7), Arm("v1", 20, 6), eager, expired=True).decision == "promote"


def test_the_rollout_section_is_off_by_default_and_every_bad_field_is_reported(monkeypatch):
    assert load_config().rollout.canary_share == 0.0
    for key, value in {"CANARY_SHARE": "1.0", "MIN_RATED_TURNS": "0", "ON_DEADLINE": "maybe",
                       "ROLLBACK_THRESHOLD": "0.3"}.items():
        monkeypatch.setenv(f"LOOP_ROLLOUT__{key}", value)
    with pytest.raises(ConfigError) as err:
        load_config()
    assert len([p for p in err.value.problems if p.startswith("rollout.")]) == 4


def test_a_conversation_always_gets_the_same_arm_and_the_arms_split_by_the_share():
    pointer = {"version": "v2", "share": 0.2}
    ids = [f"conv-{i}" for i in range(5000)]
    arms = [canary_arm(c, pointer) for c in ids]
    assert arms == [canary_arm(c, pointer) for c in ids]
    assert sum(arms) / len(arms) == pytest.approx(0.2, abs=0.02)
    assert not canary_arm("conv-1", None) and not canary_arm("", pointer)


# -- the registry's canary pointer --------------------------------------------------------------------

def test_a_canary_is_served_beside_current_and_ends_promoted_through_the_history_or_rolled_back(two_versions):
    registry, v1, v2 = two_versions
    pointer = registry.start_canary(v2, share=0.3, reason="gate passed")
    assert registry.canary_id() == v2 and registry.current_id() == v1 and pointer["baseline"] == v1
    assert json.loads(registry.canary_file.read_text())["share"] == 0.3
    assert registry.start_canary(v2, share=0.3, reason="again") == pointer  # a resumed cycle starts nothing twice
    with pytest.raises(RegistryError, match="still running"):
        registry.start_canary(v1, share=0.3, reason="x")
    registry.prune(keep=0)
    assert registry.get(v2)  # never pruned while users judge it
    entry = registry.end_canary("promoted", reason="users liked it", expected=v2)
    assert registry.current_id() == v2 and registry.canary_id() is None
    assert registry.history()[-1]["to"] == v2 and registry.history()[-1]["action"] == "promote"
    assert [e["action"] for e in registry.canary_log()] == ["start", "promoted"] and entry["version"] == v2

    registry.start_canary(v1, share=0.3, reason="again v1")
    registry.end_canary("rolled_back", reason="worse")
    assert registry.current_id() == v2 and registry.canary_id() is None
    with pytest.raises(RegistryError, match="no canary"):
        registry.end_canary("rolled_back", reason="twice")


def test_a_version_that_failed_verification_or_is_current_never_becomes_a_canary(two_versions, bundled_gguf):
    registry, v1, _ = two_versions
    bad = registry.register(bundled_gguf, base_model="test", verification={"passed": False, "reasons": ["nan"]},
                            link=True)
    with pytest.raises(RegistryError, match="failed verification"):
        registry.start_canary(bad.id, share=0.2, reason="x")
    with pytest.raises(RegistryError, match="already current"):
        registry.start_canary(v1, share=0.2, reason="x")
    assert registry.canary_id() is None and not registry.canary_log()


# -- the check, on a real store ---------------------------------------------------------------------------

def test_only_the_latest_thumb_of_turns_since_the_canary_started_counts(two_versions):
    registry, v1, v2 = two_versions
    store = Store.open()
    _rate(store, v2, ["down"] * 3)  # before the canary: not counted
    since = registry.start_canary(v2, share=0.5, reason="t")["since"]
    _rate(store, v2, ["down", "up", None])
    taken_back = _rate(store, v1, ["down"])[0]
    store.add_feedback(taken_back, thumbs=None, comment="never mind")  # the latest event has no thumb
    changed = _rate(store, v1, ["down"])[0]
    store.add_feedback(changed, thumbs="up")
    rows = rated_turns(store, v2, v1, since)
    assert sorted((r["version"], r["thumbs"]) for r in rows) == [(v1, "up"), (v2, "down"), (v2, "up")]


def test_the_check_rolls_back_a_worse_canary_with_its_numbers_and_promotes_a_better_one(two_versions):
    registry, v1, v2 = two_versions
    store = Store.open()
    registry.start_canary(v2, share=0.5, reason="t")
    _rate(store, v2, ["down"] * 9 + ["up"] * 3)
    _rate(store, v1, ["up"] * 9 + ["down"] * 3)
    assert status(registry, store, replace(RULES, min_rated_turns=13))["verdict"]["decision"] == "continue"
    out = check_canary(registry, store, RULES)
    assert out["action"] == "rolled_back" and registry.canary_id() is None and registry.current_id() == v1
    last = registry.canary_log()[-1]
    assert last["action"] == "rolled_back" and last["decision"]["canary"]["down"] == 9

    registry.start_canary(v2, share=0.5, reason="again")
    _rate(store, v2, ["up"] * 12)
    _rate(store, v1, ["down"] * 12)
    out = check_canary(registry, store, RULES)
    assert out["action"] == "promoted" and registry.current_id() == v2 and registry.canary_id() is None


def test_a_canary_past_its_deadline_is_rolled_back_by_default(two_versions):
    registry, v1, v2 = two_versions
    registry.start_canary(v2, share=0.5, reason="t")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=RULES.deadline_hours + 1)
    out = check_canary(registry, Store.open(), RULES, now=later)
    assert out["action"] == "rolled_back" and "deadline" in out["reason"] and registry.current_id() == v1


def test_a_canary_whose_gguf_went_missing_is_rolled_back_with_the_reason_logged(two_versions, caplog):
    registry, v1, v2 = two_versions
    registry.start_canary(v2, share=0.5, reason="t")
    registry.get(v2).gguf_path.unlink()
    with caplog.at_level("ERROR", logger="loop.rollout"):
        out = check_canary(registry, Store.open(), RULES)
    assert out["action"] == "rolled_back" and "no GGUF file" in out["reason"]
    assert "no GGUF file" in registry.canary_log()[-1]["reason"] and "no GGUF file" in caplog.text
    assert registry.current_id() == v1 and registry.canary_id() is None


def test_a_canary_promoted_just_before_a_crash_is_ended_by_the_next_check(two_versions):
    registry, v1, v2 = two_versions
    registry.start_canary(v2, share=0.5, reason="t")
    registry.promote(v2, reason="promoted; the process died before canary.json went")
    out = check_canary(registry, Store.open(), RULES)
    assert out["action"] == "promoted" and registry.canary_id() is None
    assert [h["to"] for h in registry.history()].count(v2) == 1


# -- the cycle -----------------------------------------------------------------------------------------

def _gated_cycle(registry: Registry, candidate: Path):
    """An unfinished cycle whose stages through gate are done (no training runs here)."""
    from loop.cycle_state import CycleState

    config = load_config()
    basis = registry.current_id()
    state = CycleState.new(config.home / "cycles", False)
    merged = state.dir / "export" / "merged"
    merged.mkdir(parents=True)
    best = {"name": "lr0.001_r16", "learning_rate": 1e-3, "lora_rank": 16, "lora_alpha": 32}
    results = {
        "canary": {"canary": None},
        "push": {}, "pull": {"hash": "snap", "counts": {}},
        "decide": {"current_version": basis, "trained_from": basis},
        "train": {"best": best["name"], "variants": [best]},
        "export": {"verification": {"passed": True}, "export": {"gguf_path": str(candidate),
                                                                "merged_dir": str(merged), "quantization": "Q4_1"}},
        "gate": {"best": best, "candidate": {"heldout_loss": 1.0}, "current": {"heldout_loss": 2.0},
                 "decision": {"promote": True, "reasons": ["better"]}},
    }
    for name, result in results.items():
        state.data["stages"][name] = {"status": "done", "result": result, "seconds": 0.0}
    state.save()
    return state


def test_with_a_canary_share_the_gated_candidate_becomes_the_canary_and_no_new_candidate_trains_until_it_is_settled(
        two_versions, bundled_gguf, tmp_path, monkeypatch):
    from loop.cycle import Cycle
    from loop.cycle_pipeline import CycleContext
    from loop.cycle_stages import stage_canary, stage_decide
    from loop.cycle_state import StopCycle

    registry, v1, _ = two_versions
    monkeypatch.setenv("LOOP_ROLLOUT__CANARY_SHARE", "0.5")
    monkeypatch.setenv("LOOP_ROLLOUT__MIN_RATED_TURNS", "10")
    state = _gated_cycle(registry, _copy(bundled_gguf, tmp_path / "candidate.gguf"))
    summary = Cycle(load_config(), progress=False, log=lambda m: None).run()
    vid = summary["stages"]["promote"]["result"]["canary"]
    assert summary["cycle"] == state.id and summary["outcome"] == "canary", summary
    assert registry.canary_id() == vid and registry.current_id() == v1
    assert "published when the canary is promoted" in summary["stages"]["publish"]["result"]["skipped"]

    ctx = CycleContext.create(load_config(), force=True, progress=False, log=lambda m: None)
    with pytest.raises(StopCycle) as stop:
        stage_decide(ctx, state)  # --force too
    assert stop.value.outcome == "canary_pending" and vid in stop.value.reason

    store = Store.open()
    _rate(store, vid, ["up"] * 12)
    _rate(store, v1, ["down"] * 12)
    result = stage_canary(ctx, state)
    assert result.action == "promoted" and registry.current_id() == vid and registry.canary_id() is None


def test_the_canary_stage_does_nothing_without_a_canary(two_versions):
    from loop.cycle import STAGE_NAMES, Cycle
    from loop.cycle_stages import stage_canary

    assert STAGE_NAMES[0] == "canary"
    assert stage_canary(Cycle(load_config(), progress=False).ctx, None).to_dict() == {"canary": None}


def test_versions_canary_shows_both_rates_with_intervals_and_list_marks_the_canary(two_versions, capsys):
    from loop.versions import main

    registry, v1, v2 = two_versions
    assert main(["canary"]) == 0 and "no canary is running" in capsys.readouterr().out
    registry.start_canary(v2, share=0.25, reason="t")
    _rate(Store.open(), v2, ["down", "up", "up"])
    assert main(["canary", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    arm = data["verdict"]["canary"]
    assert data["canary"] == v2 and data["current"] == v1 and data["share"] == 0.25
    assert arm["rated"] == 3 and arm["down"] == 1 and arm["interval"][0] < 1 / 3 < arm["interval"][1]
    assert main(["canary"]) == 0
    text = capsys.readouterr().out
    assert "95% INTERVAL" in text and "verdict now: continue" in text
    assert main(["list", "--json"]) == 0
    marks = {r["id"]: r["marks"] for r in json.loads(capsys.readouterr().out)}
    assert marks[v2] == ["canary"] and marks[v1] == ["current"]
    registry.end_canary("rolled_back", reason="worse")
    assert main(["canary"]) == 0 and f"the last one, {v2}, was rolled_back" in capsys.readouterr().out
