"""The cycle's stage machine (``loop.cycle_pipeline.Pipeline``) with fake stages: no model, no Argilla.

Each fake stage records that it ran and returns a small result dataclass; what it does otherwise
(fail, stop, wait, die) is set per test. Then the state file a cycle directory written before the
stages' results were typed: it resumes and promotes through the real stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from loop.cycle_pipeline import CycleContext, Pipeline, Stage
from loop.cycle_state import CycleState, StageResult, StopCycle, WaitCycle


@dataclass(kw_only=True)
class Ran(StageResult):
    stage = "fake"
    name: str = ""
    run: int = 0  # this stage's how-manieth run


class Killed(BaseException):
    """What a SIGKILL looks like from inside: nothing of the pipeline runs after it."""


class Fakes:
    """Stages ``canary`` (every run), ``a``, ``promote``, ``publish`` and ``report`` (closing)."""

    NAMES = ("canary", "a", "promote", "publish", "report")

    def __init__(self, tmp_path: Path, *, max_attempts: int = 3, world_changed=None):
        self.calls: list[str] = []
        self.after: list[str] = []
        self.logs: list[str] = []
        self.behaviour: dict[str, list] = {}  # name -> what its next runs do (an exception to raise), in order
        self.ctx = CycleContext(config=SimpleNamespace(home=tmp_path), registry=None, log=self.logs.append)
        self.root = tmp_path / "cycles"
        self.pipeline = Pipeline(
            [Stage(n, self._stage(n), every_run=n == "canary") for n in self.NAMES],
            max_attempts=max_attempts,
            outcome_of=lambda state: "promoted" if state.stage("promote").get("status") == "done" else "not_promoted",
            world_changed=world_changed,
            after_stage=lambda ctx, name, result: self.after.append(name),
        )

    def _stage(self, name: str):
        def run(ctx: CycleContext, state: CycleState) -> Ran:
            self.calls.append(name)
            todo = self.behaviour.get(name) or []
            if todo:
                exc = todo.pop(0)
                if exc is not None:
                    raise exc
            return Ran(name=name, run=self.calls.count(name))

        return run

    def new(self) -> CycleState:
        return CycleState.new(self.root, False)

    def runs(self, n: int) -> None:
        """``n`` runs of one cycle: a new one, then ``n - 1`` resumes."""
        self.pipeline.run(self.ctx, self.new())
        for _ in range(n - 1):
            self.resume()

    def resume(self) -> tuple[CycleState, str | None]:
        """Run the unfinished cycle as the next ``python -m loop.cycle`` would, from its file."""
        state = CycleState.unfinished(self.root)
        assert state is not None, "no unfinished cycle to resume"
        return state, self.pipeline.run(self.ctx, state)


def _on_disk(state: CycleState) -> dict:
    return json.loads(state.path.read_text())


def test_a_new_cycle_runs_every_stage_once_in_order_and_stores_each_result_as_its_dict(tmp_path):
    fakes = Fakes(tmp_path)
    state = fakes.new()

    assert fakes.pipeline.run(fakes.ctx, state) is None

    assert fakes.calls == list(Fakes.NAMES)
    saved = _on_disk(state)
    assert saved["outcome"] == "promoted" and saved["ended_at"]
    for name in Fakes.NAMES:
        assert saved["stages"][name]["status"] == "done"
        assert saved["stages"][name]["result"] == {"name": name, "run": 1}
    assert state.read(Ran).name == "" and Ran.from_dict(state.result("a")) == Ran(name="a", run=1)
    assert CycleState.unfinished(fakes.root) is None


def test_a_failed_stage_leaves_the_cycle_unfinished_and_the_next_run_resumes_there_skipping_done_stages(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["promote"] = [RuntimeError("registry on a full disk")]
    state = fakes.new()

    assert fakes.pipeline.run(fakes.ctx, state) == "promote"
    saved = _on_disk(state)
    assert saved["outcome"] is None and saved["error"] == "RuntimeError: registry on a full disk"
    assert saved["stages"]["promote"]["status"] == "failed" and "Traceback" in saved["stages"]["promote"]["traceback"]
    assert saved["failures"] == {"promote": 1} and "report" not in saved["stages"]

    fakes.calls.clear()
    resumed, failed = fakes.resume()
    assert failed is None and resumed.id == state.id
    assert fakes.calls == ["canary", "promote", "publish", "report"], "a done stage ran again, or one was skipped"
    assert _on_disk(resumed)["outcome"] == "promoted"


def test_the_every_run_stage_runs_again_on_each_resume(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["a"] = [RuntimeError("argilla down"), RuntimeError("argilla down")]
    fakes.runs(3)
    assert fakes.calls.count("canary") == 3 and fakes.calls.count("a") == 3
    assert fakes.calls.count("promote") == 1


def test_a_stop_ends_the_cycle_with_its_outcome_and_declared_result_and_still_writes_the_report(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["a"] = [StopCycle("nothing_new", "3 new examples; training waits for 10", Ran(name="a", run=7))]
    state = fakes.new()

    assert fakes.pipeline.run(fakes.ctx, state) is None

    assert fakes.calls == ["canary", "a", "report"] and fakes.after == ["canary"]  # a stop is not "done"
    saved = _on_disk(state)
    assert saved["outcome"] == "nothing_new" and saved["reason"] == "3 new examples; training waits for 10"
    stopped = saved["stages"]["a"]
    assert stopped["status"] == "stopped" and stopped["reason"] == "3 new examples; training waits for 10"
    assert stopped["result"] == {"name": "a", "run": 7}
    assert saved["stages"]["report"]["status"] == "done"
    assert CycleState.unfinished(fakes.root) is None  # a stopped cycle is finished: the next run starts a new one


def test_a_stop_without_a_result_stores_an_empty_one(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["a"] = [StopCycle("missing_weights", "v2 has no merged weights")]
    state = fakes.new()
    fakes.pipeline.run(fakes.ctx, state)
    assert _on_disk(state)["stages"]["a"]["result"] == {}


def test_a_run_stops_at_a_stage_already_stopped(tmp_path):
    fakes = Fakes(tmp_path)
    state = fakes.new()
    state.data["stages"]["a"] = {"status": "stopped", "reason": "earlier", "result": {}}
    fakes.pipeline.run(fakes.ctx, state)
    assert fakes.calls == ["canary", "report"]


def test_a_stage_killed_while_running_counts_as_an_attempt_and_runs_again(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["promote"] = [Killed()]
    state = fakes.new()
    with pytest.raises(Killed):
        fakes.pipeline.run(fakes.ctx, state)
    assert _on_disk(state)["stages"]["promote"]["status"] == "running"  # what a dead process leaves

    resumed, failed = fakes.resume()

    saved = _on_disk(resumed)
    assert failed is None and saved["outcome"] == "promoted"
    assert saved["failures"] == {"promote": 1}
    assert saved["failure_log"][0]["stage"] == "promote" and "interrupted" in saved["failure_log"][0]["why"]
    assert saved["stages"]["promote"]["result"] == {"name": "promote", "run": 2}


def test_a_stage_that_fails_max_attempts_times_abandons_the_cycle_and_the_report_still_runs(tmp_path):
    fakes = Fakes(tmp_path, max_attempts=2)
    fakes.behaviour["publish"] = [RuntimeError("hub offline"), RuntimeError("hub offline again")]
    state = fakes.new()

    assert fakes.pipeline.run(fakes.ctx, state) == "publish"
    _, failed = fakes.resume()

    assert failed is None
    saved = _on_disk(state)
    assert saved["outcome"] == "abandoned" and saved["stages"]["publish"]["status"] == "abandoned"
    assert "stage publish failed or was interrupted 2 time(s)" in saved["reason"]
    assert "last: RuntimeError: hub offline again" in saved["reason"]
    assert saved["abandoned"]["stage"] == "publish" and saved["abandoned"]["failures"] == {"publish": 2}
    assert saved["abandoned"]["max_stage_attempts"] == 2
    assert saved["stages"]["report"]["status"] == "done"
    assert fakes.calls.count("promote") == 1
    assert CycleState.unfinished(fakes.root) is None


def test_kills_count_toward_the_attempts_so_a_stage_that_always_dies_is_abandoned_before_it_runs_again(tmp_path):
    fakes = Fakes(tmp_path, max_attempts=2)
    state = fakes.new()
    state.data["stages"]["a"] = {"status": "running", "started_at": "earlier"}
    state.data["failures"] = {"a": 1}
    state.data["failure_log"] = [{"stage": "a", "at": "earlier", "why": "interrupted: the process running this stage died"}]
    state.save()

    fakes.resume()

    assert "a" not in fakes.calls and fakes.calls == ["canary", "report"]
    saved = _on_disk(state)
    assert saved["outcome"] == "abandoned" and saved["failures"] == {"a": 2}


def test_the_world_changed_rule_abandons_the_cycle_before_the_stage_it_refuses(tmp_path):
    def world_changed(ctx, state, name):
        return "the current version changed from v2 to v1" if name == "promote" else None

    fakes = Fakes(tmp_path, world_changed=world_changed)
    state = fakes.new()

    assert fakes.pipeline.run(fakes.ctx, state) is None

    assert fakes.calls == ["canary", "a", "report"]
    saved = _on_disk(state)
    assert saved["outcome"] == "abandoned" and saved["reason"] == "the current version changed from v2 to v1"
    assert saved["stages"]["promote"]["status"] == "abandoned" and saved["abandoned"]["stage"] == "promote"
    assert any("abandoned at stage promote" in line for line in fakes.logs)


def test_a_waiting_stage_pauses_the_cycle_without_a_failure_and_the_next_run_retries_it(tmp_path):
    fakes = Fakes(tmp_path, max_attempts=1)
    fakes.behaviour["promote"] = [WaitCycle("pending_arena", "v2 has 0 games, needs 3", Ran(name="promote")),
                                  WaitCycle("pending_arena", "v2 has 2 games, needs 3")]
    state = fakes.new()

    assert fakes.pipeline.run(fakes.ctx, state) is None
    saved = _on_disk(state)
    assert saved["outcome"] is None and saved["waiting"] == {"stage": "promote", "outcome": "pending_arena",
                                                             "reason": "v2 has 0 games, needs 3"}
    assert saved["stages"]["promote"]["status"] == "waiting" and saved["stages"]["promote"]["result"]["name"] == "promote"
    assert "failures" not in saved and "report" not in saved["stages"]

    fakes.resume()  # waits again: with max_attempts = 1 a counted wait would have abandoned it
    _, failed = fakes.resume()

    saved = _on_disk(state)
    assert failed is None and saved["outcome"] == "promoted" and "waiting" not in saved
    assert fakes.calls.count("promote") == 3 and fakes.after.count("promote") == 1


def test_a_stage_done_is_never_run_again_so_a_later_failure_does_not_promote_twice(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["publish"] = [RuntimeError("upload failed"), RuntimeError("upload failed")]
    fakes.runs(3)

    assert fakes.calls.count("promote") == 1 and fakes.calls.count("publish") == 3
    assert fakes.after == ["canary", "a", "promote", "canary", "canary", "publish", "report"]


def test_a_stage_that_finished_in_an_earlier_run_gets_no_after_stage_call_again(tmp_path):
    fakes = Fakes(tmp_path)
    fakes.behaviour["report"] = [RuntimeError("disk full")]
    fakes.pipeline.run(fakes.ctx, fakes.new())
    assert fakes.after.count("promote") == 1
    fakes.resume()
    assert fakes.after.count("promote") == 1 and fakes.after[-1] == "report"


def test_the_after_stage_call_is_timed_apart_from_its_stage_and_stored_with_it(tmp_path):
    import time

    fakes = Fakes(tmp_path)
    fakes.pipeline.after_stage = lambda ctx, name, result: time.sleep(0.3 if name == "promote" else 0)
    state = fakes.new()
    fakes.pipeline.run(fakes.ctx, state)
    promote = _on_disk(state)["stages"]["promote"]
    assert promote["after_stage_seconds"] >= 0.3 and promote["seconds"] < 0.3


def test_a_pipeline_refuses_two_stages_of_one_name():
    stage = Stage("a", lambda ctx, state: None)
    with pytest.raises(ValueError, match="distinct names"):
        Pipeline([stage, stage], max_attempts=3, outcome_of=lambda state: "x")


def test_the_cycle_lists_its_stages_once_in_order_with_the_report_closing():
    from loop.cycle import STAGE_NAMES, STAGES

    assert STAGE_NAMES == ("canary", "push", "pull", "decide", "train", "export", "gate", "promote", "publish",
                           "report")
    assert [s.name for s in STAGES if s.every_run] == ["canary"]


# -- results: the state file's shape --------------------------------------------------------------------

# Stage results as the cycle wrote them when they were plain dicts (every key, each stage's success path).
OLD_RESULTS = {
    "canary": {"canary": None},
    "push": {"target": "local", "dataset": "ds", "review_url": "", "considered": 30, "sent": 28, "created": 28,
             "updated": 0, "failed": 0, "skipped": 2, "unchanged": 0, "over_budget": 0, "not_eligible": 2,
             "deferred": 0, "tiers": {"negative": 25}, "scrubbed": {}, "errors": [], "duration_s": 1.5},
    "pull": {"path": "/s/abc", "hash": "abc", "counts": {"records": 28}, "judge": {"notes": []},
             "train_path": "/s/abc/train.jsonl", "eval_path": "/s/abc/eval.jsonl"},
    "decide": {"current_version": "v1", "curated_train": 20, "curated_eval": 8, "new_since_current": 28,
               "new_train": 20, "replay_pool": 0, "min_new_examples": 4, "forced": False, "trained_from": "v1",
               "judge": {"held_out_examples": 8, "min_held_out": 4}, "general_replay_answers": "self (v1, 8 of 8)",
               "replayed_general": 6, "train_path": "/c/train.jsonl", "eval_path": "/s/abc/eval.jsonl",
               "train_examples": 26},
    "train": {"base_dir": "/c/base", "variants": [{"name": "lr0.001_r16", "status": "ok", "eval_loss": 1.5}],
              "variants_dir": "/c/variants", "best": "lr0.001_r16"},
    "export": {"variant": "lr0.001_r16", "export": {"gguf_path": "/c/x.gguf"}, "verification": {"passed": True}},
    "gate": {"best_variant": "lr0.001_r16", "best": {"name": "lr0.001_r16"}, "candidate": {"heldout_loss": 1.5},
             "current": {"heldout_loss": 2.0}, "decision": {"promote": True, "reasons": [], "numbers": {},
                                                           "pending": []}},
    "promote": {"version": "v2", "parent": "v1", "registered_now": True, "promoted": True, "promoted_now": True,
                "promoted_at": "2026-01-01T00:00:00Z", "current": "v2", "pruned": [],
                "moved_away": {"action": "rollback", "at": "t", "to": "v1", "reason": "r"}},
    "publish": {"version": "v2", "published": {"target": "local"}},
    "report": {"json": "/r/c.json", "markdown": "/r/c.md", "plots": ["/r/c.versions.png"]},
}


@pytest.mark.parametrize("stage", sorted(OLD_RESULTS))
def test_every_stage_result_reads_and_writes_the_keys_the_untyped_results_had(stage):
    from loop import cycle_results
    from loop.cycle import STAGE_NAMES

    kinds = {k.stage: k for k in vars(cycle_results).values() if isinstance(k, type) and issubclass(k, StageResult)
             and k not in (StageResult, cycle_results.CanaryPending)}
    assert sorted(kinds) == sorted(STAGE_NAMES)  # one result type a stage
    old = OLD_RESULTS[stage]
    typed = kinds[stage].from_dict(old)
    assert typed.to_dict() == old
    assert kinds[stage].from_dict({"a_key_from_a_later_version": 1}).to_dict()["a_key_from_a_later_version"] == 1


def test_a_result_field_left_unset_is_not_written():
    from loop.cycle_results import PromoteResult, PublishResult

    assert PromoteResult(version="v2", parent="v1").to_dict() == {"version": "v2", "parent": "v1",
                                                                 "registered_now": False}
    assert PublishResult(version=None, skipped="this cycle promoted nothing").to_dict() == {
        "version": None, "published": None, "skipped": "this cycle promoted nothing"}


def test_a_cycle_directory_written_before_typed_results_resumes_and_promotes_once(candidate_gguf):
    """An old-format ``state.json`` (text as the old code wrote it, through ``export``) resumed by the
    real cycle: the real gate, promote, publish and report read the old results typed."""
    from loop.config import load_config
    from loop.core.bootstrap import ensure_base_version
    from loop.core.registry import Registry
    from loop.cycle import Cycle

    config = load_config()
    registry = Registry()
    ensure_base_version(config, registry)
    cid = "20260101T000000Z-abcdef"
    cdir = config.home / "cycles" / cid
    (cdir / "export" / "merged").mkdir(parents=True)
    eval_path = cdir / "eval.jsonl"
    eval_path.write_text(json.dumps({"id": "e1", "messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}) + "\n")
    best = {"name": "lr0.001_r16", "status": "ok", "learning_rate": 0.001, "lora_rank": 16, "lora_alpha": 32,
            "eval_loss": 1.5, "eval_loss_start": 2.0, "regression_loss": 1.0, "regression_loss_start": 1.0,
            "adapter_dir": str(cdir / "variants" / "lr0.001_r16" / "adapter")}
    results = {**OLD_RESULTS,
               "pull": {**OLD_RESULTS["pull"], "eval_path": str(eval_path)},
               "decide": {**OLD_RESULTS["decide"], "eval_path": str(eval_path), "train_path": str(cdir / "train.jsonl")},
               "train": {"base_dir": str(cdir / "base"), "variants": [best], "variants_dir": str(cdir / "variants"),
                         "best": best["name"]},
               "export": {"variant": best["name"], "verification": {"passed": True, "reasons": []},
                          "export": {"gguf_path": str(candidate_gguf), "merged_dir": str(cdir / "export" / "merged"),
                                     "quantization": "Q4_1"}}}
    done = ("canary", "push", "pull", "decide", "train", "export")
    old = {"id": cid, "started_at": "2026-01-01T00:00:00Z", "force": False, "outcome": None,
           "current_at_start": "v1", "stages": {n: {"status": "done", "result": results[n], "seconds": 0.1} for n in done}}
    (cdir / "state.json").write_text(json.dumps(old, indent=2, sort_keys=True))

    summary = Cycle(config, progress=False, log=lambda m: None).run()

    assert summary["cycle"] == cid and summary["outcome"] == "promoted", summary
    assert registry.current_id() == "v2" and [v.id for v in registry.list()] == ["v1", "v2"]
    stages = summary["stages"]
    assert stages["gate"]["result"]["decision"]["promote"] is True
    assert stages["promote"]["result"]["version"] == "v2" and stages["promote"]["result"]["parent"] == "v1"
    assert stages["publish"]["result"]["version"] == "v2" and Path(summary["report"]).is_file()
    saved = json.loads((cdir / "state.json").read_text())
    assert {n: saved["stages"][n]["result"] for n in done} == {n: results[n] for n in done}  # untouched
