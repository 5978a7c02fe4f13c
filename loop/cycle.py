"""``python -m loop.cycle``: one pass of the loop, resumable stage by stage.

Stages, in order (each records what it did, how long it took, and why it stopped the cycle
when it did):

    push      new turns and feedback -> Argilla (annotation.push)
    pull      submitted records -> a hashed snapshot (annotation.pull)
    decide    enough curated examples since the current version? (cycle.min_new_examples, or --force)
    train     the LoRA variant grid on the snapshot + replay (trainer.variants)
    export    the best variant (held-out loss): merge, GGUF, quantise, verify the quantised file
    gate      that candidate vs the current version on the same held-out and regression sets,
              its GGUF verification included (loop.gate)
    promote   register + atomic promotion + publish (loop.registry, loop.publish)
    report    JSON + markdown with plots under $LOOP_HOME/reports

The state of a cycle lives in ``$LOOP_HOME/cycles/<id>/state.json`` and is written after every
stage; a cycle killed anywhere is resumed by the next invocation, which skips finished stages
(no variant retrained, no second promotion). Only one cycle runs at a time (``loop.lock``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from loop import paths
from loop.config import Config, load_config
from loop.lock import CycleLock, LockHeld
from loop.registry import Registry
from loop.cycle_state import CycleState, StopCycle, _now

STAGES = ("push", "pull", "decide", "train", "export", "gate", "promote", "report")


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
            from loop.store import Store

            self._store = Store.open(self.home)
        return self._store

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        with CycleLock(self.home / "cycle.lock"):
            from loop.bootstrap import ensure_base_version

            ensure_base_version(self.config, self.registry)
            root = self.home / "cycles"
            state = CycleState.unfinished(root)
            if state is not None:
                self.log(f"resuming unfinished cycle {state.id}")
                state.data["resumed"] = state.data.get("resumed", 0) + 1
            else:
                state = CycleState.new(root, self.force)
            force = self.force or state.data.get("force", False)
            for name in STAGES:
                done = state.stage(name)
                if done.get("status") in ("done", "stopped"):
                    if done.get("status") == "stopped":
                        break
                    continue
                if name == "report" and state.data.get("outcome") is None:
                    state.data["outcome"] = "promoted" if state.result("promote").get("promoted") else "not_promoted"
                entry = {"status": "running", "started_at": _now()}
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
                except Exception as exc:  # the report says what happened; the next run resumes here
                    entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                                 traceback=traceback.format_exc()[-4000:])
                    entry["seconds"] = round(time.perf_counter() - t0, 3)
                    state.data["outcome"] = None
                    state.data["error"] = entry["error"]
                    state.save()
                    self.log(f"stage {name} failed: {entry['error']} (run again to resume)")
                    return self._summary(state, failed_stage=name)
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                entry["ended_at"] = _now()
                state.save()
                self.log(f"stage {name}: {entry['status']} in {entry['seconds']:.1f}s"
                         + (f" ({entry.get('reason')})" if entry.get("reason") else ""))
                if entry["status"] == "stopped":
                    break
            if state.data.get("outcome") is None:
                state.data["outcome"] = "promoted" if state.result("promote").get("promoted") else "not_promoted"
            if state.stage("report").get("status") != "done":
                # A cycle that stopped early still gets its report.
                t0 = time.perf_counter()
                result = self.stage_report(state, force)
                state.data["stages"]["report"] = {"status": "done", "result": result, "seconds": round(time.perf_counter() - t0, 3)}
            state.data["ended_at"] = _now()
            state.save()
            return self._summary(state)

    def _summary(self, state: CycleState, failed_stage: str | None = None) -> dict[str, Any]:
        stages = {
            name: {k: v for k, v in s.items() if k not in ("traceback",)}
            for name, s in state.data["stages"].items()
        }
        return {
            "cycle": state.id,
            "outcome": "failed" if failed_stage else state.data.get("outcome"),
            "reason": state.data.get("reason") or state.data.get("error"),
            "failed_stage": failed_stage,
            "current_version": self.registry.current_id(),
            "stages": stages,
            "report": state.result("report").get("markdown"),
        }

    # The stages live in loop/cycle_stages.py to keep this module about orchestration.
    from loop.cycle_stages import (  # noqa: E402
        stage_decide,
        stage_export,
        stage_gate,
        stage_promote,
        stage_pull,
        stage_push,
        stage_report,
        stage_train,
    )


def run_cycle(config: Config | None = None, *, force: bool = False) -> dict[str, Any]:
    return Cycle(config or load_config(), force=force).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.cycle", description="Run one pass of the feedback loop.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--force", action="store_true", help="train even with fewer than cycle.min_new_examples")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (one line) on stdout")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except Exception as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        summary = Cycle(config, force=args.force).run()
    except LockHeld as exc:
        print(str(exc), file=sys.stderr)
        if args.json:
            print(json.dumps({"outcome": "locked", "reason": str(exc)}))
        return 3
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(f"cycle {summary['cycle']}: {summary['outcome']}" + (f" — {summary['reason']}" if summary.get("reason") else ""))
        for name, s in summary["stages"].items():
            print(f"  {name:8s} {s.get('status', '?'):8s} {s.get('seconds', 0):8.1f}s  {s.get('reason') or s.get('error') or ''}")
        print(f"current version: {summary['current_version']}")
        if summary.get("report"):
            print(f"report: {summary['report']}")
    return 1 if summary["outcome"] == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
