"""The result of each cycle stage: one dataclass a stage, stored in ``state.json`` by ``to_dict()``.

The keys are the ones the stages wrote when results were plain dicts, so a cycle directory written
then resumes now (``StageResult.from_dict`` defaults what is missing and keeps what it does not
name). A later stage reads an earlier one's result with ``state.read(PullResult)``.

Lists and maps that another part owns the shape of (the trainer's variant rows, the exporter's
report, the gate's decision, the push report's tier counts) stay plain dicts inside these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loop.cycle_state import StageResult, omitted_when_none


@dataclass(kw_only=True)
class CanaryResult(StageResult):
    """``loop.rollout.check_canary``'s answer (its verdict kept in ``extra``), and the publish of a
    canary it promoted."""

    stage = "canary"
    canary: str | None = None
    action: str | None = omitted_when_none()  # "promoted", "rolled_back" or "running"
    reason: str | None = omitted_when_none()
    published: dict[str, Any] | None = omitted_when_none()
    publish_error: str | None = omitted_when_none()


@dataclass(kw_only=True)
class PushResult(StageResult):
    """``annotation.push.PushReport.as_dict()``: the counts named here, the rest in ``extra``."""

    stage = "push"
    sent: int = 0
    created: int = 0
    updated: int = 0
    failed: int = 0


@dataclass(kw_only=True)
class PullResult(StageResult):
    """The hashed snapshot ``annotation.pull`` wrote."""

    stage = "pull"
    path: str | None = None
    hash: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    train_path: str | None = None
    eval_path: str | None = None


@dataclass(kw_only=True)
class CanaryPending(StageResult):
    """``decide``'s result when it stops because a canary is still being judged."""

    stage = "decide"
    canary: str | None = None


@dataclass(kw_only=True)
class DecideResult(StageResult):
    """What the cycle trains on, from which version, and why it goes on (or stops)."""

    stage = "decide"
    current_version: str | None = None
    curated_train: int = 0
    curated_eval: int = 0
    new_since_current: int = 0
    new_train: int = 0
    replay_pool: int = 0
    min_new_examples: int = 0
    forced: bool = False
    trained_from: str | None = None  # the newest untainted ancestor of current_version (loop.forget)
    judge: dict[str, Any] = field(default_factory=dict)
    retrain: str | None = omitted_when_none()
    general_replay_answers: str | None = omitted_when_none()
    replayed_general: int | None = omitted_when_none()
    train_path: str | None = omitted_when_none()
    eval_path: str | None = omitted_when_none()
    train_examples: int | None = omitted_when_none()


@dataclass(kw_only=True)
class TrainResult(StageResult):
    """Every variant's row (``trainer.variants.VariantResult.to_dict()``) and the one chosen."""

    stage = "train"
    base_dir: str | None = None
    # Seconds this stage spent deriving the trainer's weights from the base GGUF (once per home; absent when
    # they were there already: loop.bootstrap.hf_base_ready).
    base_derived_s: float | None = omitted_when_none()
    variants: list[dict[str, Any]] = field(default_factory=list)
    variants_dir: str | None = None
    best: str | None = omitted_when_none()
    # The chosen variant trained again with the held-out wordings (trainer.refit.Refit.to_dict()).
    refit: dict[str, Any] | None = omitted_when_none()

    def best_row(self) -> dict[str, Any]:
        """The row of the variant the stage chose."""
        return next(r for r in self.variants if r["name"] == self.best)

    def served_refit(self) -> dict[str, Any] | None:
        """The refit when it is what the cycle serves (status "used"), else None: the judged adapter is."""
        return self.refit if (self.refit or {}).get("status") == "used" else None


@dataclass(kw_only=True)
class ExportResult(StageResult):
    """The best variant merged, converted, quantised and verified (``trainer.export``)."""

    stage = "export"
    variant: str | None = None
    export: dict[str, Any] = field(default_factory=dict)  # trainer.export's report: gguf_path, merged_dir, ...
    verification: dict[str, Any] = field(default_factory=dict)  # {"passed": bool, "reasons": [...], ...}


@dataclass(kw_only=True)
class GateResult(StageResult):
    """The candidate against the current version and the gate's decision (``loop.gate``)."""

    stage = "gate"
    best_variant: str | None = None
    best: dict[str, Any] = field(default_factory=dict)  # the chosen variant's row
    candidate: dict[str, Any] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)  # loop.gate.GateDecision.to_dict()


@dataclass(kw_only=True)
class PromoteResult(StageResult):
    """The version this cycle registered, and whether it was made current or the canary."""

    stage = "promote"
    version: str | None = None
    parent: str | None = None
    registered_now: bool = False
    promoted: bool | None = omitted_when_none()
    promoted_now: bool | None = omitted_when_none()
    promoted_at: str | None = omitted_when_none()
    current: str | None = omitted_when_none()
    pruned: list[str] | None = omitted_when_none()
    moved_away: dict[str, Any] | None = omitted_when_none()  # promoted, then rolled back (or replaced)
    arena: dict[str, Any] | None = omitted_when_none()  # the arena's verdict, with gate.use_arena
    canary: str | None = omitted_when_none()  # with rollout.canary_share > 0
    share: float | None = omitted_when_none()
    canary_since: str | None = omitted_when_none()
    canary_ended: dict[str, Any] | None = omitted_when_none()


@dataclass(kw_only=True)
class PublishResult(StageResult):
    stage = "publish"
    version: str | None = None
    published: dict[str, Any] | None = None
    skipped: str | None = omitted_when_none()


@dataclass(kw_only=True)
class ReportResult(StageResult):
    stage = "report"
    json: str | None = None
    markdown: str | None = None
    plots: list[str] = field(default_factory=list)
