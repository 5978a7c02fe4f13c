"""``python -m loop.cycle``: one pass of the loop, resumable stage by stage.

Stages, in order (each records what it did, how long it took, and why it stopped the cycle
when it did):

    canary    settle the live canary, if any: promote, roll back or keep it (loop.rollout); run
              again on every resume; while one is undecided, decide stops the cycle
    push      new turns and feedback -> Argilla (annotation.push)
    pull      submitted records -> a hashed snapshot (annotation.pull)
    decide    enough curated examples since the current version? (cycle.min_new_examples, or --force)
    train     the LoRA variant grid on the snapshot + replay (trainer.variants)
              then the chosen variant refit with its held-out wordings (trainer.refit)
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

The shape: each stage is a plain function ``stage(ctx, state) -> <Result>`` (``loop.cycle_stages``,
``loop.cycle_stages_build``, ``loop.cycle_stages_release``), listed once, in order, in ``STAGES``;
``ctx`` is the ``CycleContext`` (config, registry, store, log, force); each result is a dataclass of
``loop.cycle_results`` stored in the state file; ``loop.cycle_pipeline.Pipeline`` runs the list
(resume, skip, attempts, abandon, stop, wait), and this module adds the cycle's own rules: the
world-changed rule of the failure policy, the outcome, and the fixed measures after a promotion.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from loop.config import LoopConfig, load_config
from loop.core.errors import LoopError, error_exit
from loop.cycle_pipeline import CycleContext, Pipeline, Stage
from loop.cycle_results import DecideResult, PromoteResult, ReportResult
from loop.cycle_stages import stage_canary, stage_decide, stage_pull, stage_push
from loop.cycle_stages_build import stage_export, stage_gate, stage_train
from loop.cycle_stages_release import stage_promote, stage_publish, stage_report
from loop.cycle_state import CycleState, StageResult, own_version, promotion_of
from loop.lock import CycleLock, LockHeld

STAGES: tuple[Stage, ...] = (
    Stage("canary", stage_canary, every_run=True),  # a bad canary is rolled back even while Argilla is down
    Stage("push", stage_push),
    Stage("pull", stage_pull),
    Stage("decide", stage_decide),
    Stage("train", stage_train),
    Stage("export", stage_export),
    Stage("gate", stage_gate),
    Stage("promote", stage_promote),
    Stage("publish", stage_publish),
    Stage("report", stage_report),  # the last stage closes the cycle: it runs however the cycle ended
)
STAGE_NAMES = tuple(s.name for s in STAGES)
# Stages the world-changed rule never stops: they act on what is, not on what decide based the cycle on.
_ANY_CURRENT = ("canary", "publish", "report")


class Cycle:
    def __init__(self, config: LoopConfig, *, force: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.config = config
        self.force = force
        self.ctx = CycleContext.create(config, force=force, progress=progress, log=log)
        self.registry = self.ctx.registry

    def pipeline(self) -> Pipeline:
        return Pipeline(STAGES, max_attempts=self.config.cycle.max_stage_attempts, outcome_of=_outcome,
                        world_changed=world_changed, after_stage=_after_stage)

    def run(self) -> dict[str, Any]:
        with CycleLock(self.config.home / "cycle.lock"):
            from loop.core.bootstrap import ensure_base_version

            ensure_base_version(self.config, self.registry)
            root = self.config.home / "cycles"
            state = CycleState.unfinished(root)
            if state is not None:
                self.ctx.log(f"resuming unfinished cycle {state.id}")
                state.data["resumed"] = state.data.get("resumed", 0) + 1
            else:
                state = CycleState.new(root, self.force)
                state.data["current_at_start"] = self.registry.current_id()
            self.ctx.force = self.force or bool(state.data.get("force", False))
            failed_stage = self.pipeline().run(self.ctx, state)
            return self._summary(state, failed_stage)

    def _summary(self, state: CycleState, failed_stage: str | None = None) -> dict[str, Any]:
        stages = {
            name: {k: v for k, v in s.items() if k not in ("traceback",)}
            for name, s in state.data["stages"].items()
        }
        waiting = state.data.get("waiting") or {}
        return {
            "cycle": state.id,
            "outcome": "failed" if failed_stage else (state.data.get("outcome") or waiting.get("outcome")),
            "reason": state.data.get("reason") or waiting.get("reason") or state.data.get("error"),
            "failed_stage": failed_stage,
            "current_version": self.registry.current_id(),
            "stages": stages,
            "report": state.read(ReportResult).markdown,
        }


def world_changed(ctx: CycleContext, state: CycleState, name: str) -> str | None:
    """The failure policy's second rule: the current version is no longer the one ``decide`` based the
    cycle on (a rollback or another promotion meanwhile), and this cycle has not promoted. Its training
    base, its gate comparison and its new version's parent would all be wrong."""
    basis = state.read(DecideResult).current_version
    if name in _ANY_CURRENT or not basis:
        return None
    registry = ctx.registry
    own = own_version(registry, state.id)
    if own is not None and promotion_of(registry, own.id) is not None:
        return None  # this cycle promoted: later changes of current are people's decisions, not a changed world
    now = registry.current_id()
    if now == basis:
        return None
    change = next((h for h in reversed(registry.history()) if h.get("to") == now), {})
    how = f" ({change.get('action')} at {change.get('at')}: {change.get('reason')})" if change else ""
    return (f"the current version changed from {basis} to {now} since this cycle decided to train{how}: "
            f"its training base, gate comparison and parent no longer hold; the next cycle starts from {now}")


def _after_stage(ctx: CycleContext, name: str, result: StageResult | None) -> None:
    if name == "promote" and isinstance(result, PromoteResult) and ctx.config.cycle.measure_versions:
        # The new version and its parent on the fixed sets (Versions tab); never fails the cycle.
        from loop.version_measures import after_promotion

        after_promotion(ctx, result.to_dict())


def _outcome(state: CycleState) -> str:
    promoted = state.read(PromoteResult)
    return "promoted" if promoted.promoted else "canary" if promoted.canary else "not_promoted"


def run_cycle(config: LoopConfig | None = None, *, force: bool = False) -> dict[str, Any]:
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
