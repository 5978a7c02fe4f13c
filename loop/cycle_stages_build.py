"""The cycle's middle stages: train the variant grid, export the best one, gate it against the current version.

Each is ``stage(ctx, state) -> <Result>`` (``loop.cycle_pipeline``); the order is ``loop.cycle.STAGES``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from loop.core.io import read_jsonl
from loop.cycle_pipeline import CycleContext
from loop.cycle_results import DecideResult, ExportResult, GateResult, PullResult, TrainResult
from loop.cycle_state import CycleState, StopCycle


def _current_hf_dir(ctx: CycleContext, vid: str | None = None) -> tuple[Path, float | None]:
    """The weights the next version trains from: the current version's merged weights (or ``vid``'s:
    decide's ``trained_from``, the newest untainted ancestor), and the seconds spent deriving them from the
    base GGUF when this cycle had to (a home's first cycle, unless it was set up with them: None otherwise).

    A version with no parent is a base model as shipped, whose weights are the bundled base's. A
    trained version whose merged weights are gone stops the cycle, never falls back to the base:
    a candidate trained from the base and gated against the base's losses labelled as the current
    version's would be promoted on numbers that describe another model."""
    current = ctx.registry.get(vid) if vid else ctx.registry.current()
    if current is not None and current.hf_dir and Path(current.hf_dir).is_dir():
        return Path(current.hf_dir), None
    if current is None or current.parent is None:
        from loop.bootstrap import ensure_hf_base, hf_base_ready

        ready, started = hf_base_ready(ctx.config), time.perf_counter()
        path = Path(ensure_hf_base(ctx.config))
        return path, None if ready else round(time.perf_counter() - started, 1)
    where = f"{current.hf_dir} is gone" if current.hf_dir else "none were recorded"
    raise StopCycle(
        "missing_weights",
        f"the current version {current.id} has no merged weights to train from ({where}); training from the "
        f"base model instead would gate the base's losses as {current.id}'s. Restore that directory, or roll "
        "back to a version whose weights exist (python -m loop.versions rollback --to ID)")


def stage_train(ctx: CycleContext, state: CycleState) -> TrainResult:
    from trainer.refit import refit_variant
    from trainer.variants import best_variant, run_variants

    decided = state.read(DecideResult)
    gate = ctx.config.gate
    base_dir, derived_s = _current_hf_dir(ctx, decided.trained_from)
    train_path, eval_path = Path(decided.train_path), Path(decided.eval_path) if decided.eval_path else None
    # The trainer keeps the best epoch the gate would accept: one set of general-ability rules for both.
    train_config = replace(ctx.config.trainer, regression_tolerance=gate.regression_tolerance,
                           min_general_kept=gate.min_general_kept)
    results = run_variants(
        train_path,
        eval_path,
        base_dir,
        state.dir / "variants",
        train_config,
        # The snapshot's pairs and labels, for the preference objectives of the grid (trainer/preference.py).
        preference_dir=Path(state.read(PullResult).path),
    )
    ok = [r for r in results if r.status == "ok"]
    out = TrainResult(base_dir=str(base_dir), base_derived_s=derived_s, variants=[r.to_dict() for r in results],
                      variants_dir=str(state.dir / "variants"))
    if not ok:
        raise StopCycle("training_failed", "every variant failed: " + "; ".join(
            f"{r['name']}: {r.get('reason') or r.get('error')}" for r in out.variants), out)
    # Only variants the regression gate would accept compete, so the most forgetful variant (often the one
    # that learned most) cannot shadow one that learned and kept general ability; the lowest held-out loss
    # wins (training loss says nothing about generalisation: the seed's mistake). None left: no candidate,
    # never a variant picked by its place in the grid.
    tolerance, min_kept = gate.regression_tolerance, gate.min_general_kept
    best = best_variant(results, regression_tolerance=tolerance, min_general_kept=min_kept)
    if best is None:
        raise StopCycle("no_candidate", "no variant both has a finite held-out loss and kept its regression loss "
                        f"within +{tolerance:.1%} and {min_kept:.0%} of its general answers: "
                        + "; ".join(_variant_note(r) for r in ok), out)
    out.best = best.name
    # The judge has chosen: train the choice again with its held-out wordings too, and serve that when it
    # keeps what the gate asks of general ability (trainer/refit.py). A refused or failed refit changes nothing.
    refit = refit_variant(best, train_path, eval_path, base_dir, state.dir / "refit", train_config)
    out.refit = refit.to_dict()
    ctx.log(f"refit of {best.name}: {refit.status}" + (f" ({refit.reason})" if refit.reason else ""))
    return out


def _variant_note(r) -> str:
    if r.eval_loss is None:
        return f"{r.name}: no held-out loss"
    kept = f", general answers kept {r.general_kept:.0%}" if r.general_kept is not None else ""
    if r.regression_loss is not None and r.regression_loss_start:
        return (f"{r.name}: held-out {r.eval_loss:.4f}, regression "
                f"{(r.regression_loss - r.regression_loss_start) / r.regression_loss_start:+.1%}{kept}")
    return f"{r.name}: held-out {r.eval_loss:.4f}, no regression loss"


def _metric(row: dict[str, Any], *names: str) -> float | None:
    for n in names:
        v = row.get(n)
        if v is None and isinstance(row.get("metrics"), dict):
            v = row["metrics"].get(n)
        if v is not None:
            return float(v)
    return None


def _held_out(state: CycleState) -> list[dict[str, Any]]:
    return read_jsonl(Path(state.read(DecideResult).eval_path), missing_ok=True)


def stage_export(ctx: CycleContext, state: CycleState) -> ExportResult:
    from trainer.export import export_variant

    trained = state.read(TrainResult)
    best = trained.best_row()
    pulled = state.read(PullResult)
    current = ctx.registry.current()
    card_info = {
        "base_model": ctx.config.model.name,
        "parent_version": current.id if current else None,
        "snapshot_hash": pulled.hash,
        "snapshot_counts": pulled.counts,
        "variant": {k: best.get(k) for k in ("name", "learning_rate", "lora_rank", "lora_alpha") if k in best},
        "metrics": {k: best.get(k) for k in ("eval_loss", "regression_loss", "tokens_per_s", "wall_s") if k in best},
    }
    held_out = _held_out(state)
    # export_variant verifies the quantised file itself (probes + this held-out set) and puts the
    # verification into the model card; the gate reads it from here.
    refit = trained.served_refit()
    if refit:
        card_info["refit"] = {k: refit.get(k) for k in ("examples", "regression_loss", "general_kept")}
    adapter = refit["adapter_dir"] if refit else best["adapter_dir"]
    result = export_variant(Path(adapter), Path(trained.base_dir), state.dir / "export",
                            ctx.config.export, card_info, eval_examples=held_out or None)
    verification = result.verification
    vdict = verification.to_dict() if hasattr(verification, "to_dict") else dict(verification or {})
    out = ExportResult(variant=best.get("name"), export=result.to_dict(), verification=vdict)
    if not vdict.get("passed"):
        raise StopCycle("verification_failed",
                        "the exported GGUF failed verification: " + "; ".join(vdict.get("reasons") or []), out)
    return out


def stage_gate(ctx: CycleContext, state: CycleState) -> GateResult:
    from loop.gate import decide
    from trainer.evaluate import eval_loss, load_regression_set

    trained = state.read(TrainResult)
    best = trained.best_row()
    held_out = _held_out(state)
    base_dir = Path(trained.base_dir)
    max_length = ctx.config.trainer.max_length
    # The trainer already measured the starting weights (= the current version) on the same held-out
    # and regression sets with the same settings; measure again only when it did not.
    start_h, start_r = _metric(best, "eval_loss_start"), _metric(best, "regression_loss_start")
    current_metrics = {
        "heldout_loss": start_h if start_h is not None else (
            eval_loss(base_dir, held_out, max_length=max_length) if held_out else None),
        "regression_loss": start_r if start_r is not None else eval_loss(
            base_dir, load_regression_set(ctx.config.trainer), max_length=max_length),
        "version": ctx.registry.current_id(),
        "measured_by": "trainer (starting weights)" if start_h is not None else "gate",
    }
    # A served refit trained on the held-out examples, so its held-out loss would flatter it: the judged
    # variant's stands for generalisation, and forgetting is measured on the weights that are served.
    served = trained.served_refit() or best
    candidate = {
        "heldout_loss": _metric(best, "eval_loss"),
        "regression_loss": _metric(served, "regression_loss"),
        "general_kept": _metric(served, "general_kept"),
        "status": best.get("status"),
        "verification": state.read(ExportResult).verification,
    }
    arena = None
    if ctx.config.gate.use_arena:
        from loop.core.arena import ratings

        arena = ratings(ctx.store.arena_votes())
    decision = decide(candidate, current_metrics, ctx.config.gate, arena=arena, current_id=current_metrics["version"])
    out = GateResult(best_variant=best.get("name"), best=best,
                     candidate={k: v for k, v in candidate.items() if k != "verification"},
                     current=current_metrics, decision=decision.to_dict())
    if not decision.promote:
        raise StopCycle("gate_refused", "the gate kept the current version: " + "; ".join(decision.reasons), out)
    return out
