"""The stage machine of a cycle: run an ordered list of stages over a persisted ``CycleState``.

A stage is a plain function ``stage(ctx, state) -> StageResult``: ``ctx`` (``CycleContext``) is what
it may use (config, registry, store, log, force), ``state`` what earlier stages left (read back
typed with ``state.read(PullResult)``). It ends the cycle by raising ``StopCycle`` (with the result
it had), pauses it with ``WaitCycle``, and fails with any other exception.

``Pipeline.run`` is the resume contract, whatever the stages are (``tests/loop/test_loop_pipeline.py``
drives it with fake ones):

* a stage already ``done`` is skipped (a stage marked ``every_run`` runs again on every run), and
  a run stops at a stage already ``stopped``;
* a stage found ``running`` was interrupted (its process died): that counts as a failed attempt;
* a stage that failed ``max_attempts`` times, or that the ``world_changed`` rule refuses, is not
  run again: the cycle is *abandoned*;
* a failure leaves the cycle unfinished (the next run resumes at that stage), a wait too, without
  counting as a failure;
* the last stage closes the cycle (the report): it runs however the cycle ended (done, stopped,
  abandoned), after the outcome is set;
* ``after_stage`` is called once for each stage that finished ``done`` in this run (never for one
  skipped because an earlier run did it: what it does happens once per stage, not once per run).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.config import LoopConfig
from loop.core.io import utcnow
from loop.cycle_state import CycleState, StageResult, StopCycle, WaitCycle


@dataclass
class CycleContext:
    """What every stage may use; one per run of a cycle."""

    config: LoopConfig
    registry: Any  # loop.core.registry.Registry
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    force: bool = False  # --force, or the cycle was started with it
    progress: bool = True  # progress bars in push and pull
    _store: Any = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, config: LoopConfig, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] | None = None) -> CycleContext:
        from loop.core import paths
        from loop.core.registry import Registry

        ctx = cls(config, Registry(paths.registry_dir(config.home)), force=force, progress=progress)
        if log is not None:
            ctx.log = log
        return ctx

    @property
    def home(self) -> Path:
        return self.config.home

    @property
    def store(self):
        """The store, opened on first use (most stages never need it)."""
        if self._store is None:
            from loop.core.store import Store

            self._store = Store.open(self.home)
        return self._store


StageFn = Callable[[CycleContext, CycleState], StageResult | None]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    every_run: bool = False  # run again on every run of the cycle, even once done (the canary)


def _stored(result: StageResult | None) -> dict[str, Any]:
    return result.to_dict() if result is not None else {}


class Pipeline:
    """``stages`` in order, the last one closing the cycle; see the module docstring for the contract."""

    def __init__(
        self,
        stages: tuple[Stage, ...] | list[Stage],
        *,
        max_attempts: int,
        outcome_of: Callable[[CycleState], str],
        world_changed: Callable[[CycleContext, CycleState, str], str | None] | None = None,
        after_stage: Callable[[CycleContext, str, StageResult | None], None] | None = None,
    ):
        names = [s.name for s in stages]
        if not stages or len(set(names)) != len(names):
            raise ValueError(f"a pipeline needs stages with distinct names, not {names}")
        self.stages = tuple(stages)
        self.max_attempts = max_attempts
        self.outcome_of = outcome_of
        self.world_changed = world_changed
        self.after_stage = after_stage

    @property
    def closing(self) -> Stage:
        return self.stages[-1]

    def run(self, ctx: CycleContext, state: CycleState) -> str | None:
        """Run what is left of the cycle; the name of the stage that failed (the cycle stays
        unfinished), else None (finished, abandoned, or waiting: ``state.data`` says which)."""
        state.data.pop("waiting", None)
        for stage in self.stages:
            name = stage.name
            status = state.stage(name).get("status")
            if status == "stopped" and not stage.every_run:
                break
            if status == "done" and not stage.every_run:
                continue
            if stage is self.closing and state.data.get("outcome") is None:
                state.data["outcome"] = self.outcome_of(state)
            if status == "running":  # the process running it died (kill -9, OOM, reboot)
                state.note_failure(name, "interrupted: the process running this stage died")
            why = self.abandon_reason(ctx, state, name)
            if why:
                self._abandon(ctx, state, name, why)
                return None
            entry: dict[str, Any] = {"status": "running", "started_at": utcnow()}
            state.data["stages"][name] = entry
            state.save()
            t0 = time.perf_counter()
            result = None
            try:
                result = stage.run(ctx, state)
                entry.update(status="done", result=_stored(result))
            except StopCycle as stop:
                entry.update(status="stopped", reason=stop.reason, result=_stored(stop.result))
                state.data["outcome"] = stop.outcome
                state.data["reason"] = stop.reason
            except WaitCycle as wait:  # not a failure: the next run retries this stage
                entry.update(status="waiting", reason=wait.reason, result=_stored(wait.result),
                             seconds=round(time.perf_counter() - t0, 3))
                state.data["waiting"] = {"stage": name, "outcome": wait.outcome, "reason": wait.reason}
                state.save()
                ctx.log(f"stage {name}: waiting ({wait.reason})")
                return None
            except Exception as exc:  # the report says what happened; the next run resumes here
                return self._failed(ctx, state, name, entry, exc, t0)
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            entry["ended_at"] = utcnow()
            state.save()
            ctx.log(f"stage {name}: {entry['status']} in {entry['seconds']:.1f}s"
                    + (f" ({entry.get('reason')})" if entry.get("reason") else ""))
            if entry["status"] == "done" and self.after_stage is not None:
                t1 = time.perf_counter()
                self.after_stage(ctx, name, result)
                entry["after_stage_seconds"] = round(time.perf_counter() - t1, 3)
                state.save()
            if entry["status"] == "stopped":
                break
        self._finish(ctx, state)
        return None

    def _failed(self, ctx: CycleContext, state: CycleState, name: str, entry: dict[str, Any], exc: Exception,
                t0: float) -> str | None:
        error = f"{type(exc).__name__}: {exc}"
        entry.update(status="failed", error=error, traceback=traceback.format_exc()[-4000:],
                     seconds=round(time.perf_counter() - t0, 3))
        state.note_failure(name, error)
        state.data["outcome"] = None
        state.data["error"] = error
        state.save()
        why = self.abandon_reason(ctx, state, name)
        if why:
            ctx.log(f"stage {name} failed: {error}")
            self._abandon(ctx, state, name, why)
            return None
        ctx.log(f"stage {name} failed: {error} (run again to resume; attempt "
                f"{state.failures(name)} of {self.max_attempts})")
        return name

    # -- the failure policy ------------------------------------------------------------------------

    def abandon_reason(self, ctx: CycleContext, state: CycleState, name: str) -> str | None:
        """Why the unfinished cycle must be given up before (re)running stage ``name``, or None:
        the stage failed or was killed ``max_attempts`` times (retrying forever would block every
        later cycle), or the ``world_changed`` rule says what the cycle was based on no longer holds."""
        failures = state.failures(name)
        if failures >= self.max_attempts:
            last = next((f["why"] for f in reversed(state.data.get("failure_log") or []) if f["stage"] == name), "?")
            return (f"stage {name} failed or was interrupted {failures} time(s) "
                    f"(cycle.max_stage_attempts = {self.max_attempts}); last: {last}")
        return self.world_changed(ctx, state, name) if self.world_changed is not None else None

    def _abandon(self, ctx: CycleContext, state: CycleState, name: str, why: str) -> None:
        entry = state.data["stages"].setdefault(name, {})
        entry.update(status="abandoned", reason=why)
        state.data["outcome"] = "abandoned"
        state.data["reason"] = why
        state.data["abandoned"] = {"stage": name, "reason": why, "at": utcnow(),
                                   "failures": dict(state.data.get("failures") or {}),
                                   "max_stage_attempts": self.max_attempts}
        state.save()
        ctx.log(f"cycle {state.id} abandoned at stage {name}: {why}")
        self._finish(ctx, state)

    def _finish(self, ctx: CycleContext, state: CycleState) -> None:
        if state.data.get("outcome") is None:
            state.data["outcome"] = self.outcome_of(state)
        closing = self.closing
        if state.stage(closing.name).get("status") != "done":  # a cycle that stopped early still gets it
            t0 = time.perf_counter()
            result = closing.run(ctx, state)
            state.data["stages"][closing.name] = {"status": "done", "result": _stored(result),
                                                  "seconds": round(time.perf_counter() - t0, 3)}
        state.data["ended_at"] = utcnow()
        state.save()
