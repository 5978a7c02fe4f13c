"""The promotion gate: may a trained candidate replace the current version?

All of these must hold (each failure is one reason in the decision):
  1. the candidate is usable: its status is not "failed" and its GGUF verification passed
     (the gate is on the quantised file, since quality lost in conversion is a known trap);
  2. both were scored on the same held-out set (when both carry ``heldout_hash``);
  3. held-out loss: ``current - candidate >= gate.min_improvement`` and strictly > 0;
  4. regression loss (general ability): ``(candidate - current) / current <= gate.regression_tolerance``,
     and, when the candidate carries ``general_kept`` (trainer/general_kept.py), it is at least
     ``gate.min_general_kept``;
  5. optionally (``gate.use_arena``): the candidate has at least ``gate.arena_min_games`` arena games
     and a rating not below the current version's.

The arena rule and registration: a candidate has no arena games before it is registered (the
arena only pits registered versions), so the cycle's gate cannot apply rule 5 to a fresh
candidate. ``decide`` given a candidate without a ``version`` therefore judges rules 1-4 and puts
``"arena"`` in ``GateDecision.pending``: the cycle registers the candidate and holds it, not
current, as *pending arena* (``arena_verdict`` with its id): promoted once it has
``arena_min_games`` games and a rating not below the current version's, refused once it has the
games and a lower rating, and waiting in between. ``decide`` given the candidate's id applies
rule 5 at once (too few games is then a refusal).

Metric names (in ``Version.metrics`` and in the dicts given to ``decide``):
  ``heldout_loss`` (aliases ``held_out_loss``, ``eval_loss``), ``regression_loss``, ``heldout_hash``;
  candidate extras: ``status``, ``verification`` ({"passed": bool, "reasons": [...]}) or
  ``verification_passed``, and ``version`` (registry id, used to look up arena ratings).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# The gate's rules read metrics through these names (loop.core.metrics, which the app's plots share).
from loop.core.metrics import HELDOUT_KEYS, REGRESSION_KEYS, heldout_loss, metric, regression_loss  # noqa: F401


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    # Criteria that can only be judged after registration (``"arena"``): ``promote`` then means
    # "passes everything judged so far", and the cycle holds the version until these are settled.
    pending: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for people: the verdict, then why."""
        head = ("PROMOTE" + (f" once {', '.join(self.pending)} is settled" if self.pending else "")
                if self.promote else "KEEP CURRENT")
        return "\n".join([head] + [f"  - {r}" for r in self.reasons])


def verification_passed(candidate: Mapping[str, Any]) -> bool | None:
    """True/False when the candidate says, None when it carries no verification at all."""
    ver = candidate.get("verification")
    if isinstance(ver, Mapping) and "passed" in ver:
        return bool(ver["passed"])
    if isinstance(ver, bool):
        return ver
    if "verification_passed" in candidate:
        return bool(candidate["verification_passed"])
    return None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def decide(
    candidate_metrics: Mapping[str, Any],
    current_metrics: Mapping[str, Any] | None,
    gate: Any,
    arena: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    candidate_id: str | None = None,
    current_id: str | None = None,
) -> GateDecision:
    """Decide whether the candidate replaces the current version; every failed rule is a reason.

    ``gate`` is a ``GateConfig``; ``arena`` is ``loop.arena.ratings(...)`` (needed when
    ``gate.use_arena``). Ids for the arena default to the metrics' ``version`` keys.
    """
    current_metrics = current_metrics or {}
    refusals: list[str] = []
    passes: list[str] = []
    cand_h, cur_h = heldout_loss(candidate_metrics), heldout_loss(current_metrics)
    cand_r, cur_r = regression_loss(candidate_metrics), regression_loss(current_metrics)
    numbers: dict[str, Any] = {
        "candidate_heldout_loss": cand_h,
        "current_heldout_loss": cur_h,
        "heldout_improvement": None,
        "min_improvement": gate.min_improvement,
        "candidate_regression_loss": cand_r,
        "current_regression_loss": cur_r,
        "regression_rel_change": None,
        "regression_tolerance": gate.regression_tolerance,
        "verification_passed": verification_passed(candidate_metrics),
        "status": candidate_metrics.get("status"),
        "use_arena": bool(gate.use_arena),
    }

    # 1. usable at all
    status = candidate_metrics.get("status")
    if status == "failed":
        why = candidate_metrics.get("error") or candidate_metrics.get("reason") or "no reason recorded"
        refusals.append(f"candidate status is failed: {why}")
    ver = numbers["verification_passed"]
    if ver is not True:
        detail = candidate_metrics.get("verification") if isinstance(candidate_metrics.get("verification"), Mapping) else {}
        why = "; ".join(detail.get("reasons", [])) if detail else ""
        refusals.append("GGUF verification " + ("failed" if ver is False else "missing")
                        + (f": {why}" if why else ""))
    else:
        passes.append("GGUF verification passed")

    # 2. same held-out set
    cand_set, cur_set = candidate_metrics.get("heldout_hash"), current_metrics.get("heldout_hash")
    if cand_set and cur_set and cand_set != cur_set:
        refusals.append(f"held-out sets differ (candidate {cand_set}, current {cur_set}): losses are not comparable")

    # 3. held-out loss
    if not _finite(cand_h):
        refusals.append(f"candidate has no finite held-out loss ({cand_h})")
    elif not _finite(cur_h):
        refusals.append(f"current version has no finite held-out loss on this set ({cur_h}); evaluate it first")
    else:
        improvement = cur_h - cand_h
        numbers["heldout_improvement"] = improvement
        if improvement > 0 and improvement >= gate.min_improvement:
            passes.append(f"held-out loss {cand_h:.4f} vs {cur_h:.4f}: better by {improvement:.4f} "
                          f"(needed {gate.min_improvement:g})")
        else:
            refusals.append(f"held-out loss {cand_h:.4f} vs {cur_h:.4f}: improvement {improvement:.4f} "
                            f"is not above the margin {gate.min_improvement:g}")

    # 4. regression loss
    if not _finite(cand_r):
        refusals.append(f"candidate has no finite regression loss ({cand_r})")
    elif not _finite(cur_r) or cur_r <= 0:
        refusals.append(f"current version has no usable regression loss ({cur_r}); evaluate it first")
    else:
        rel = (cand_r - cur_r) / cur_r
        numbers["regression_rel_change"] = rel
        if rel <= gate.regression_tolerance:
            passes.append(f"regression loss {cand_r:.4f} vs {cur_r:.4f}: {rel:+.1%} "
                          f"(tolerance +{gate.regression_tolerance:.1%})")
        else:
            refusals.append(f"regression loss {cand_r:.4f} vs {cur_r:.4f}: worse by {rel:+.1%}, "
                            f"beyond the tolerance +{gate.regression_tolerance:.1%}")

    kept = metric(candidate_metrics, ("general_kept",))
    numbers.update(candidate_general_kept=kept, min_general_kept=getattr(gate, "min_general_kept", None))
    if kept is not None and getattr(gate, "min_general_kept", None) is not None:
        if kept >= gate.min_general_kept:
            passes.append(f"general answers kept: {kept:.0%} (needed {gate.min_general_kept:.0%})")
        else:
            refusals.append(f"general answers kept: {kept:.0%}, below {gate.min_general_kept:.0%}: the candidate "
                            "no longer gives general answers the current version gave right")

    # 5. arena (optional)
    pending: list[str] = []
    if gate.use_arena:
        cand_id = candidate_id or candidate_metrics.get("version")
        cur_id = current_id or current_metrics.get("version")
        if not cand_id:
            # Not registered yet, so it cannot have played: judged after registration (see above).
            pending.append("arena")
            numbers.update(arena_min_games=getattr(gate, "arena_min_games", 0))
            passes.append(f"arena: judged once the candidate is registered (it needs "
                          f"{getattr(gate, 'arena_min_games', 0)} games and a rating not below the current version's)")
        else:
            verdict, reason, arena_numbers = arena_verdict(cand_id, cur_id, arena, gate)
            numbers.update(arena_numbers)
            (passes if verdict == "pass" else refusals).append(reason)

    promote = not refusals
    return GateDecision(promote=promote, reasons=passes if promote else refusals + passes, numbers=numbers,
                        pending=pending if promote else [])


def arena_verdict(
    candidate_id: str | None,
    current_id: str | None,
    arena: Mapping[str, Mapping[str, Any]] | None,
    gate: Any,
) -> tuple[str, str, dict[str, Any]]:
    """Rule 5 for a registered candidate: ``("pass" | "wait" | "refuse", reason, numbers)``.

    "wait": fewer than ``gate.arena_min_games`` games (more votes can still settle it);
    "refuse": enough games and a rating below the current version's, or nothing to compare with.
    """
    min_games = getattr(gate, "arena_min_games", 0)
    if arena is None or not candidate_id or not current_id:
        return "refuse", "arena criterion is on but no ratings (or version ids) were given", {}
    cand_a = arena.get(candidate_id) or {"rating": None, "games": 0}
    cur_a = arena.get(current_id) or {"rating": None, "games": 0}
    numbers = {"candidate_rating": cand_a["rating"], "current_rating": cur_a["rating"],
               "candidate_games": cand_a["games"], "arena_min_games": min_games}
    if cand_a["games"] < min_games:
        return "wait", f"arena: {candidate_id} has {cand_a['games']} games, needs {min_games}", numbers
    if cand_a["rating"] is None or (cur_a["rating"] is not None and cand_a["rating"] < cur_a["rating"]):
        return "refuse", f"arena: {candidate_id} rated {cand_a['rating']} below {current_id} at {cur_a['rating']}", numbers
    return "pass", f"arena: {candidate_id} rated {cand_a['rating']} vs {current_id} at {cur_a['rating']}", numbers
