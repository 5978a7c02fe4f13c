"""``python -m loop.cycle``: one pass of the loop, resumable stage by stage.

Stages, in order (each records what it did, how long it took, and why it stopped the cycle
when it did):

    canary    settle the live canary, if any: promote, roll back or keep it (loop.rollout); run
              again on every resume; while one is undecided, decide stops the cycle
    push      new turns and feedback -> Argilla (annotation.push)
    pull      submitted records -> a hashed snapshot (annotation.pull)
    decide    enough curated examples since the current version? (cycle.min_new_examples, or --force)
    train     the LoRA variant grid on the snapshot + replay (trainer.variants)
    export    the best variant (held-out loss): merge, GGUF, quantise, verify the quantised file
    gate      that candidate vs the current version on the same held-out and regression sets,
              its GGUF verification included (loop.gate)
    promote   register (once), then promote (once), then prune (loop.core.registry); with
              gate.use_arena the registered candidate waits here for its arena games; with
              rollout.canary_share > 0 it becomes the canary instead (outcome "canary"); then the
              new version and its parent get the fixed measures they miss (loop.version_measures;
              a failure there is logged and never fails the cycle)
    publish   the promoted version to its publish target (loop.publish), if it is still current
    report    JSON + markdown with plots under $LOOP_HOME/reports

The state of a cycle lives in ``$LOOP_HOME/cycles/<id>/state.json`` and is written after every
stage; a cycle killed anywhere is resumed by the next invocation, which skips finished stages
(no variant retrained). Only one cycle runs at a time (``loop.lock``).

Promote once: the version a cycle registered is found in the registry by the cycle's id, and
whether it was promoted is read from the registry's history, not from ``state.json``; so a kill
between ``register`` and ``promote``, or right after ``promote``, registers nothing twice and
promotes once, and a version that was promoted and then rolled back is never promoted again.
Publishing is a stage of its own: a failed upload is retried without touching the promotion.

Failure policy (an unfinished cycle is not resumed forever): the cycle is *abandoned* (outcome
``abandoned``, the reason and the failure counts in its report; the next run starts a new cycle)
  * once one stage has failed or been killed ``cycle.max_stage_attempts`` times, or
  * when the current version is no longer the one ``decide`` based the cycle on (a rollback or
    another promotion while it was unfinished) and the cycle has not promoted yet.
A stage that waits (a candidate pending arena games) is not failing: it is retried by each run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from loop.config import Config, load_config
from loop.core import paths
from loop.core.errors import LoopError, error_exit
from loop.core.io import utcnow
from loop.core.registry import Registry
from loop.cycle_state import CycleState, StopCycle, WaitCycle, own_version, promotion_of
from loop.lock import CycleLock, LockHeld

STAGES = ("canary", "push", "pull", "decide", "train", "export", "gate", "promote", "publish", "report")


class Cycle:
    def __init__(self, config: Config, *, force: bool = False, progress: bool = True, log: Callable[[str], None] | None = None):
        self.config = config
        self.force = force
        self.progress = progress
        self.home = config.home
        self.registry = Registry(paths.registry_dir(self.home))
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from loop.core.store import Store

            self._store = Store.open(self.home)
        return self._store

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with CycleLock(self.home / "cycle.lock"):
            from loop.core.bootstrap import ensure_base_version

            ensure_base_version(self.config, self.registry)
            root = self.home / "cycles"
            state = CycleState.unfinished(root)
            if state is not None:
                self.log(f"resuming unfinished cycle {state.id}")
                state.data["resumed"] = state.data.get("resumed", 0) + 1
            else:
                state = CycleState.new(root, self.force)
                state.data["current_at_start"] = self.registry.current_id()
            state.data.pop("waiting", None)
            force = self.force or state.data.get("force", False)
            for name in STAGES:
                done = state.stage(name)
                if done.get("status") in ("done", "stopped") and name != "canary":  # a canary is checked on every run
                    if done.get("status") == "stopped":
                        break
                    continue
                if name == "report" and state.data.get("outcome") is None:
                    state.data["outcome"] = _outcome(state)
                if done.get("status") == "running":  # the process running it died (kill -9, OOM, reboot)
                    state.note_failure(name, "interrupted: the process running this stage died")
                why = self._abandon_reason(state, name)
                if why:
                    return self._abandon(state, name, why, force)
                entry = {"status": "running", "started_at": utcnow()}
                state.data["stages"][name] = entry
                state.save()
                t0 = time.perf_counter()
                try:
                    result = getattr(self, f"stage_{name}")(state, force)
                    entry.update(status="done", result=result or {})
                except StopCycle as stop:
                    entry.update(status="stopped", reason=stop.reason, result=getattr(stop, "result", {}))
                    state.data["outcome"] = stop.outcome
                    state.data["reason"] = stop.reason
                except WaitCycle as wait:  # not a failure: the next run retries this stage
                    entry.update(status="waiting", reason=wait.reason, result=wait.result,
                                 seconds=round(time.perf_counter() - t0, 3))
                    state.data["waiting"] = {"stage": name, "outcome": wait.outcome, "reason": wait.reason}
                    state.save()
                    self.log(f"stage {name}: waiting ({wait.reason})")
                    return self._summary(state)
                except Exception as exc:  # the report says what happened; the next run resumes here
                    error = f"{type(exc).__name__}: {exc}"
                    entry.update(status="failed", error=error, traceback=traceback.format_exc()[-4000:])
                    entry["seconds"] = round(time.perf_counter() - t0, 3)
                    state.note_failure(name, error)
                    state.data["outcome"] = None
                    state.data["error"] = error
                    state.save()
                    why = self._abandon_reason(state, name)
                    if why:
                        self.log(f"stage {name} failed: {error}")
                        return self._abandon(state, name, why, force)
                    self.log(f"stage {name} failed: {error} (run again to resume; attempt "
                             f"{state.failures(name)} of {self.config.cycle.max_stage_attempts})")
                    return self._summary(state, failed_stage=name)
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                entry["ended_at"] = utcnow()
                state.save()
                self.log(f"stage {name}: {entry['status']} in {entry['seconds']:.1f}s"
                         + (f" ({entry.get('reason')})" if entry.get("reason") else ""))
                if name == "promote" and entry["status"] == "done" and self.config.cycle.measure_versions:
                    # The new version and its parent on the fixed sets (Versions tab); never fails the cycle.
                    from loop.version_measures import after_promotion

                    after_promotion(self, entry["result"])
                if entry["status"] == "stopped":
                    break
            return self._finish(state, force)

    def _finish(self, state: CycleState, force: bool) -> dict[str, Any]:
        if state.data.get("outcome") is None:
            state.data["outcome"] = _outcome(state)
        if state.stage("report").get("status") != "done":
            # A cycle that stopped early still gets its report.
            t0 = time.perf_counter()
            result = self.stage_report(state, force)
            state.data["stages"]["report"] = {"status": "done", "result": result, "seconds": round(time.perf_counter() - t0, 3)}
        state.data["ended_at"] = utcnow()
        state.save()
        return self._summary(state)

    # -- the failure policy ------------------------------------------------------------------------

    def _abandon_reason(self, state: CycleState, name: str) -> str | None:
        """Why the unfinished cycle must be given up before (re)running stage ``name``, or None.

        1. One stage failed or was killed ``cycle.max_stage_attempts`` times: retrying forever would
           block every later cycle.
        2. The world changed under it: the current version is no longer the one ``decide`` based the
           cycle on (a rollback or another promotion meanwhile), and this cycle has not promoted.
           Its training base, its gate comparison and its new version's parent would all be wrong.
        """
        limit = self.config.cycle.max_stage_attempts
        failures = state.failures(name)
        if failures >= limit:
            last = next((f["why"] for f in reversed(state.data.get("failure_log") or []) if f["stage"] == name), "?")
            return (f"stage {name} failed or was interrupted {failures} time(s) (cycle.max_stage_attempts = {limit}); "
                    f"last: {last}")
        basis = state.result("decide").get("current_version")
        if name in ("canary", "publish", "report") or not basis:
            return None
        own = own_version(self.registry, state.id)
        if own is not None and promotion_of(self.registry, own.id) is not None:
            return None  # this cycle promoted: later changes of current are people's decisions, not a changed world
        now = self.registry.current_id()
        if now != basis:
            change = next((h for h in reversed(self.registry.history()) if h.get("to") == now), {})
            how = f" ({change.get('action')} at {change.get('at')}: {change.get('reason')})" if change else ""
            return (f"the current version changed from {basis} to {now} since this cycle decided to train{how}: "
                    f"its training base, gate comparison and parent no longer hold; the next cycle starts from {now}")
        return None

    def _abandon(self, state: CycleState, name: str, why: str, force: bool) -> dict[str, Any]:
        entry = state.data["stages"].setdefault(name, {})
        entry.update(status="abandoned", reason=why)
        state.data["outcome"] = "abandoned"
        state.data["reason"] = why
        state.data["abandoned"] = {"stage": name, "reason": why, "at": utcnow(),
                                   "failures": dict(state.data.get("failures") or {}),
                                   "max_stage_attempts": self.config.cycle.max_stage_attempts}
        state.save()
        self.log(f"cycle {state.id} abandoned at stage {name}: {why}")
        return self._finish(state, force)

    def _summary(self, state: CycleState, failed_stage: str | None = None) -> dict[str, Any]:
        stages = {
            name: {k: v for k, v in s.items() if k not in ("traceback",)}
            for name, s in state.data["stages"].items()
        }
        return {
            "cycle": state.id,
            "outcome": "failed" if failed_stage else (
                state.data.get("outcome") or (state.data.get("waiting") or {}).get("outcome")),
            "reason": (state.data.get("reason") or (state.data.get("waiting") or {}).get("reason")
                       or state.data.get("error")),
            "failed_stage": failed_stage,
            "current_version": self.registry.current_id(),
            "stages": stages,
            "report": state.result("report").get("markdown"),
        }

    # The stages live in loop/cycle_stages.py to keep this module about orchestration.
    from loop.cycle_stages import (  # noqa: E402
        stage_canary,
        stage_decide,
        stage_export,
        stage_gate,
        stage_promote,
        stage_publish,
        stage_pull,
        stage_push,
        stage_report,
        stage_train,
    )


def _outcome(state: CycleState) -> str:
    promoted = state.result("promote")
    return "promoted" if promoted.get("promoted") else "canary" if promoted.get("canary") else "not_promoted"


def run_cycle(config: Config | None = None, *, force: bool = False) -> dict[str, Any]:
    return Cycle(config or load_config(), force=force).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.cycle", description="Run one pass of the feedback loop.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--force", action="store_true", help="train even with fewer than cycle.min_new_examples")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (one line) on stdout")
    args = parser.parse_args(argv)
    try:
        summary = Cycle(load_config(args.config), force=args.force).run()
    except LockHeld as exc:
        print(str(exc), file=sys.stderr)
        if args.json:
            print(json.dumps({"outcome": "locked", "reason": str(exc)}))
        return 3
    except LoopError as exc:  # a bad config (exit 2), no base model, a damaged registry
        return error_exit(exc)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"cycle {summary['cycle']}: {summary['outcome']}" + (f" — {summary['reason']}" if summary.get("reason") else ""))
        for name, s in summary["stages"].items():
            print(f"  {name:8s} {s.get('status', '?'):8s} {s.get('seconds', 0):8.1f}s  {s.get('reason') or s.get('error') or ''}")
        print(f"current version: {summary['current_version']}")
        if summary.get("report"):
            print(f"report: {summary['report']}")
    return 1 if summary["outcome"] in ("failed", "abandoned") else 0


if __name__ == "__main__":
    raise SystemExit(main())
