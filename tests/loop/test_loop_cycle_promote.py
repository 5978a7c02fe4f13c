"""Promote once, publish as its own stage, the failure policy, and the arena rule, through the real cycle.

Each test builds a cycle that has trained and exported (the bundled GGUF stands in for the exported
candidate; no training runs here) and resumes it with ``Cycle.run()``: the real orchestrator, the
real gate, promote, publish and report stages, a real registry and store. Kills are real SIGKILLs
of a child process running the cycle, sent from inside ``Registry.register``/``Registry.promote``
right after the real call returns: the windows the docs name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loop.config import load_config
from loop.core.registry import Registry
from loop.core.store import Store
from loop.cycle import Cycle
from loop.cycle_state import CycleState

REPO = Path(__file__).resolve().parents[2]


def _registry() -> Registry:
    return Registry()


def _trained_cycle(candidate: Path, *, done_through: str = "export", interrupted: str | None = None) -> CycleState:
    """An unfinished cycle whose stages up to ``done_through`` are done, based on the current version.

    ``interrupted`` names a stage left "running", as a killed process leaves it."""
    from loop.core.bootstrap import ensure_base_version

    config = load_config()
    registry = _registry()
    ensure_base_version(config, registry)
    basis = registry.current_id()
    state = CycleState.new(config.home / "cycles", False)
    state.data["current_at_start"] = basis
    cdir = state.dir
    eval_path = cdir / "eval.jsonl"
    eval_path.write_text(json.dumps({"id": "e1", "messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}) + "\n")
    merged = cdir / "export" / "merged"
    merged.mkdir(parents=True)
    card = cdir / "export" / "README.md"
    card.write_text("# candidate\n")
    best = {"name": "lr0.001_r16", "status": "ok", "learning_rate": 1e-3, "lora_rank": 16, "lora_alpha": 32,
            "eval_loss": 1.5, "eval_loss_start": 2.0, "regression_loss": 1.0, "regression_loss_start": 1.0,
            "adapter_dir": str(cdir / "variants" / "lr0.001_r16" / "adapter")}
    results = {
        "push": {"pushed": 0},
        "pull": {"hash": "snap-" + state.id, "counts": {"records": 12}, "eval_path": str(eval_path)},
        "decide": {"current_version": basis, "eval_path": str(eval_path),
                   "train_path": str(cdir / "no-such-train.jsonl")},
        "train": {"base_dir": str(cdir / "base"), "variants": [best], "best": best["name"],
                  "variants_dir": str(cdir / "variants")},
        "export": {"variant": best["name"], "verification": {"passed": True, "reasons": []},
                   "export": {"gguf_path": str(candidate), "merged_dir": str(merged), "card_path": str(card),
                              "quantization": "Q4_1"}},
    }
    order = list(results)
    for name in order[: order.index(done_through) + 1]:
        state.data["stages"][name] = {"status": "done", "result": results[name], "seconds": 0.0}
    if interrupted:
        state.data["stages"][interrupted] = {"status": "running", "started_at": "earlier"}
    state.save()
    return state


def _run_child_killed_after(method: str) -> subprocess.CompletedProcess:
    """Resume the cycle in a child process that SIGKILLs itself right after ``Registry.<method>`` returns."""
    code = f"""
import os, signal
from loop.core.registry import Registry
real = Registry.{method}
def then_die(self, *a, **k):
    out = real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
    return out
Registry.{method} = then_die
from loop.config import load_config
from loop.cycle import Cycle
Cycle(load_config(), progress=False).run()
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _made_current(registry: Registry, vid: str) -> list[dict]:
    return [h for h in registry.history() if h["to"] == vid]


def test_a_version_killed_right_after_promotion_and_then_rolled_back_is_not_promoted_again(candidate_gguf):
    state = _trained_cycle(candidate_gguf)
    _run_child_killed_after("promote")
    registry = _registry()
    assert registry.current_id() == "v2"
    killed = json.loads(state.path.read_text())
    assert killed["outcome"] is None and killed["stages"]["promote"]["status"] == "running"

    registry.rollback(reason="a person took v2 out of service")
    summary = Cycle(load_config(), progress=False).run()

    assert summary["cycle"] == state.id and summary["outcome"] == "promoted", summary
    assert registry.current_id() == "v1", "the resume undid the rollback"
    assert [h["action"] for h in _made_current(registry, "v2")] == ["promote"]
    assert [v.id for v in registry.list()] == ["v1", "v2"]
    promoted = summary["stages"]["promote"]["result"]
    assert promoted["promoted_now"] is False and promoted["moved_away"]["action"] == "rollback"
    published = summary["stages"]["publish"]["result"]
    assert published["published"] is None and "no longer current" in published["skipped"]
    report = Path(summary["report"]).read_text()
    assert "then rollback to v1" in report and "Not published" in report


def test_a_kill_between_register_and_promote_registers_once_and_promotes_once(candidate_gguf):
    state = _trained_cycle(candidate_gguf)
    _run_child_killed_after("register")
    registry = _registry()
    assert [v.id for v in registry.list()] == ["v1", "v2"] and registry.current_id() == "v1"

    summary = Cycle(load_config(), progress=False).run()

    assert summary["cycle"] == state.id and summary["outcome"] == "promoted", summary
    assert [v.id for v in registry.list()] == ["v1", "v2"], "the resume registered the candidate again"
    assert registry.current_id() == "v2"
    assert [h["action"] for h in _made_current(registry, "v2")] == ["promote"]
    assert summary["stages"]["promote"]["result"]["registered_now"] is False


def test_a_publish_that_keeps_failing_is_retried_without_promoting_again_then_abandoned(candidate_gguf,
                                                                                       monkeypatch):
    # A real publish failure: a Hub target with the Hub unreachable (offline) and no token.
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "example-org/chat-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOOP_CYCLE__MAX_STAGE_ATTEMPTS", "2")
    state = _trained_cycle(candidate_gguf)
    registry = _registry()

    first = Cycle(load_config(), progress=False).run()
    assert first["outcome"] == "failed" and first["failed_stage"] == "publish", first
    assert "PublishError" in first["reason"]
    assert first["stages"]["promote"]["status"] == "done" and registry.current_id() == "v2"

    second = Cycle(load_config(), progress=False).run()
    assert second["cycle"] == state.id and second["outcome"] == "abandoned", second
    assert "stage publish failed or was interrupted 2 time(s)" in second["reason"]
    assert [h["action"] for h in _made_current(registry, "v2")] == ["promote"]
    assert registry.current_id() == "v2"  # abandoning the upload does not undo the local promotion
    report = Path(second["report"]).read_text()
    assert "## Abandoned (failure policy)" in report and "cycle.max_stage_attempts` = 2" in report
    assert report.count("| publish |") >= 3  # the stage row and both failed attempts
    assert CycleState.unfinished(load_config().home / "cycles") is None  # the next run starts a new cycle


@pytest.mark.parametrize("interrupted, done_through", [("train", "decide"), ("gate", "export")])
def test_a_rollback_under_an_unfinished_cycle_abandons_it_instead_of_training_or_promoting_on_the_old_basis(
        candidate_gguf, interrupted, done_through):
    from loop.core.bootstrap import ensure_base_version

    config = load_config()
    registry = _registry()
    ensure_base_version(config, registry)
    earlier = registry.register(candidate_gguf, base_model="m", parent="v1", hf_dir=str(candidate_gguf.parent),
                                verification={"passed": True}, link=True)
    registry.promote(earlier.id, reason="an earlier cycle")
    state = _trained_cycle(candidate_gguf, done_through=done_through, interrupted=interrupted)
    assert state.result("decide")["current_version"] == "v2"
    registry.rollback(reason="a person rolled back")

    summary = Cycle(load_config(), progress=False).run()

    assert summary["cycle"] == state.id and summary["outcome"] == "abandoned", summary
    assert "changed from v2 to v1" in summary["reason"] and "rollback" in summary["reason"]
    assert summary["stages"][interrupted]["status"] == "abandoned"
    assert registry.current_id() == "v1" and [v.id for v in registry.list()] == ["v1", "v2"]
    assert "## Abandoned (failure policy)" in Path(summary["report"]).read_text()
    assert CycleState.unfinished(config.home / "cycles") is None


def test_missing_merged_weights_of_the_current_version_stop_the_cycle_instead_of_training_from_the_base(
        candidate_gguf, tmp_path):
    from loop.core.bootstrap import ensure_base_version

    config = load_config()
    registry = _registry()
    ensure_base_version(config, registry)
    weights = tmp_path / "v2-merged"
    weights.mkdir()
    registry.promote(registry.register(candidate_gguf, base_model="m", parent="v1", hf_dir=str(weights),
                                       verification={"passed": True}, link=True).id, reason="an earlier cycle")
    shutil.rmtree(weights)
    state = _trained_cycle(candidate_gguf, done_through="decide")

    summary = Cycle(load_config(), progress=False).run()

    assert summary["cycle"] == state.id and summary["outcome"] == "missing_weights", summary
    assert "v2 has no merged weights" in summary["reason"] and str(weights) in summary["reason"]
    assert summary["stages"]["train"]["status"] == "stopped" and "gate" not in summary["stages"]


def _vote(store: Store, winner: str, loser: str, n: int) -> None:
    for i in range(n):
        store.add_arena_vote(f"prompt {winner} {i}", winner, loser, "answer a", "answer b", "a")


def test_with_the_arena_on_a_candidate_is_registered_and_held_until_its_games_settle_it(candidate_gguf,
                                                                                        monkeypatch):
    monkeypatch.setenv("LOOP_GATE__USE_ARENA", "true")
    monkeypatch.setenv("LOOP_GATE__ARENA_MIN_GAMES", "3")
    state = _trained_cycle(candidate_gguf)
    registry = _registry()

    waiting = Cycle(load_config(), progress=False).run()
    assert waiting["cycle"] == state.id and waiting["outcome"] == "pending_arena", waiting
    assert "v2 has 0 games, needs 3" in waiting["reason"]
    assert waiting["stages"]["gate"]["status"] == "done"
    assert waiting["stages"]["gate"]["result"]["decision"]["pending"] == ["arena"]
    assert [v.id for v in registry.list()] == ["v1", "v2"] and registry.current_id() == "v1"

    store = Store.open()
    _vote(store, "v2", "v1", 2)
    still = Cycle(load_config(), progress=False).run()
    assert still["cycle"] == state.id and still["outcome"] == "pending_arena" and "has 2 games" in still["reason"]
    assert [v.id for v in registry.list()] == ["v1", "v2"]  # held, never registered twice

    _vote(store, "v2", "v1", 1)
    settled = Cycle(load_config(), progress=False).run()
    assert settled["cycle"] == state.id and settled["outcome"] == "promoted", settled
    assert registry.current_id() == "v2"
    promotion = [h for h in registry.history() if h["to"] == "v2"]
    assert len(promotion) == 1 and any("arena: v2 rated" in r for r in promotion[0]["decision"]["reasons"])


def test_with_the_arena_on_a_candidate_that_loses_its_games_is_refused(candidate_gguf, monkeypatch):
    monkeypatch.setenv("LOOP_GATE__USE_ARENA", "true")
    monkeypatch.setenv("LOOP_GATE__ARENA_MIN_GAMES", "3")
    state = _trained_cycle(candidate_gguf)
    registry = _registry()
    assert Cycle(load_config(), progress=False).run()["outcome"] == "pending_arena"
    _vote(Store.open(), "v1", "v2", 3)

    summary = Cycle(load_config(), progress=False).run()

    assert summary["cycle"] == state.id and summary["outcome"] == "arena_refused", summary
    assert "below v1" in summary["reason"] and registry.current_id() == "v1"
    assert CycleState.unfinished(load_config().home / "cycles") is None
