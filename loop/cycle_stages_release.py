"""The cycle's last stages: promote the gated candidate (once), publish it, write the report.

Each is ``stage(ctx, state) -> <Result>`` (``loop.cycle_pipeline``); the order is ``loop.cycle.STAGES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loop.cycle_pipeline import CycleContext
from loop.cycle_results import (
    DecideResult,
    ExportResult,
    GateResult,
    PromoteResult,
    PublishResult,
    PullResult,
    ReportResult,
)
from loop.cycle_state import CycleState, StopCycle, WaitCycle, moved_away_from, own_version, promotion_of


def stage_promote(ctx: CycleContext, state: CycleState) -> PromoteResult:
    """Register the candidate once, promote it once, prune; publishing is the next stage.

    The registry is the record (``loop.cycle_state``): the version is found by this cycle's id, and
    a history line that ever made it current means it is never promoted again, so a resume after a
    kill right after ``promote()`` followed by a rollback leaves the rollback standing. With an
    arena criterion pending (``GateDecision.pending``), the registered version waits, not current,
    until ``loop.gate.arena_verdict`` settles it."""
    from loop.core.registry import RegistryError

    registry, config = ctx.registry, ctx.config
    exported = state.read(ExportResult)
    gated = state.read(GateResult)
    pulled = state.read(PullResult)
    decided = state.read(DecideResult)
    # The version whose weights it was trained from (not a tainted current one: loop.forget).
    parent = decided.trained_from or decided.current_version
    version = own_version(registry, state.id)
    registered_now = version is None
    if version is None:
        export = exported.export
        card = Path(export["card_path"]) if export.get("card_path") else None
        version = registry.register(
            export["gguf_path"],
            base_model=config.model.name,
            parent=parent,
            quantization=export.get("quantization", ""),
            variant={**{k: gated.best.get(k) for k in ("name", "learning_rate", "lora_rank", "lora_alpha")},
                     "cycle": state.id},
            snapshot_hash=pulled.hash,
            snapshot_counts=pulled.counts or {},
            metrics={**gated.candidate, "current_at_gate": gated.current},
            verification=exported.verification,
            hf_dir=export.get("merged_dir"),
            extra_files=[p for p in ((card, card.with_name("card.json")) if card else ()) if p.is_file()],
            link=True,
        )
    out = PromoteResult(version=version.id, parent=parent, registered_now=registered_now)
    decision = dict(gated.decision)
    made_current = promotion_of(registry, version.id) or (state.data.get("promotion") or {}).get("history")
    promoted_now = False
    if made_current is None:
        if "arena" in (decision.get("pending") or []):
            decision = _settle_arena(ctx, version.id, parent, decision, out)
        if config.rollout.canary_share > 0:
            return _start_canary(ctx, state, version.id, decision, out)
        registry.promote(version.id, reason=f"cycle {state.id}: gate passed", decision=decision)
        promoted_now = True
        made_current = promotion_of(registry, version.id)
    # Durable before publishing: the report and a resumed run read the promotion from here too.
    state.data["promotion"] = {"version": version.id, "history": made_current}
    state.save()
    moved = moved_away_from(registry, version.id)
    try:
        pruned = registry.prune(config.registry.keep_versions)
    except (OSError, RegistryError) as exc:
        pruned = [f"prune failed: {exc}"]
    out.promoted, out.promoted_now, out.promoted_at = True, promoted_now, (made_current or {}).get("at")
    out.current, out.pruned = registry.current_id(), pruned
    if moved is not None:
        out.moved_away = {k: moved.get(k) for k in ("action", "at", "to", "reason")}
        ctx.log(f"{version.id} was promoted and then {moved.get('action')} to {moved.get('to')}: not promoted again")
    return out


def _start_canary(ctx: CycleContext, state: CycleState, vid: str, decision: dict[str, Any],
                  out: PromoteResult) -> PromoteResult:
    """The gate passed with ``[rollout] canary_share`` set: ``vid`` becomes the canary, once (a
    canary that already ended, rolled back, is never started again by a resumed cycle)."""
    share = ctx.config.rollout.canary_share
    ended = next((e for e in ctx.registry.canary_log() if e.get("version") == vid and e.get("action") != "start"), None)
    if ended is None:
        pointer = ctx.registry.start_canary(vid, share=share, reason=f"cycle {state.id}: gate passed",
                                            decision=decision)
        out.canary_since = pointer["since"]
    else:
        out.canary_ended = {k: ended.get(k) for k in ("action", "at", "reason")}
    out.promoted, out.canary, out.share, out.current = False, vid, share, ctx.registry.current_id()
    return out


def _settle_arena(ctx: CycleContext, vid: str, current_id: str | None, decision: dict[str, Any],
                  out: PromoteResult) -> dict[str, Any]:
    """The arena rule for the registered candidate: the decision to promote with, or WaitCycle/StopCycle."""
    from loop.core.arena import ratings
    from loop.gate import arena_verdict

    table = ratings(ctx.store.arena_votes(), versions=[v for v in (vid, current_id) if v])
    verdict, reason, numbers = arena_verdict(vid, current_id, table, ctx.config.gate)
    out.arena = {"verdict": verdict, "reason": reason, **numbers}
    if verdict == "wait":
        raise WaitCycle("pending_arena", f"{vid} passed the loss gate and is registered, not current, until the "
                        f"arena settles it: {reason}", out)
    if verdict == "refuse":
        raise StopCycle("arena_refused", f"{vid} passed the loss gate but not the arena: {reason}", out)
    return {**decision, "pending": [], "reasons": list(decision.get("reasons") or []) + [reason],
            "numbers": {**(decision.get("numbers") or {}), **numbers}}


def stage_publish(ctx: CycleContext, state: CycleState) -> PublishResult:
    """Publish the version this cycle promoted, while it is still current.

    A ``PublishError`` fails this stage only: the next run retries the upload and never repeats
    the promotion. A version moved away from since (a rollback) is not published: the publish
    target would serve what people took out of service."""
    from loop.publish import publish

    promoted = state.read(PromoteResult)
    vid = promoted.version
    current = ctx.registry.current_id()
    if not vid:
        return PublishResult(version=None, skipped="this cycle promoted nothing")
    if promoted.canary:
        return PublishResult(version=vid, skipped=f"{vid} is a canary: it is published when the canary is promoted")
    if current != vid:
        return PublishResult(version=vid, skipped=f"{vid} is no longer current ({current} is): a version taken out "
                             "of service is not published")
    return PublishResult(version=vid, published=publish(ctx.registry.get(vid), ctx.config, registry=ctx.registry))


def stage_report(ctx: CycleContext, state: CycleState) -> ReportResult:
    from loop.report import write_report

    return ReportResult.from_dict(write_report(ctx, state))
