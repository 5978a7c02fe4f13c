"""Canary rollout: the statistic that compares a canary with the current version, and the decision.

With ``[rollout] canary_share`` > 0 a candidate that passed the gate becomes the registry's
*canary* (``Registry.start_canary``) instead of ``current``; the app serves it to that share of new
conversations (``loop.core.registry.canary_arm``) and every turn is tagged with the version that wrote
it. ``loop.rollout.check_canary`` (the cycle's first stage) reads the users' thumbs from the store
through ``status`` here and promotes the canary, rolls it back, or leaves it running. This module
only reads: the app's Versions tab shows the same numbers the cycle decides on.

The rule (docs/rollout.md has the measured error rates, ``benchmarks/canary_sim.py`` measures them):

* The data: every turn since the canary started (``since``) written by the canary or by the
  current version, whose latest feedback event has a thumb. Its thumbs-down rate is ``p``.
* Each arm's ``p`` gets a Beta(1, 1) prior, so its posterior is Beta(1 + downs, 1 + ups).
* ``p_worse = P(p_canary > p_current)`` and ``p_ok = P(p_canary < p_current + margin)`` are
  computed exactly on a grid (no sampling: the same data always gives the same decision).
* Never before both arms have ``min_rated_turns`` rated turns. Then, at each check:
  ``p_worse > rollback_threshold`` rolls back, else ``p_ok > promote_threshold`` promotes
  (non-inferiority: a canary no worse than ``margin`` is kept), else it keeps running.
* At the deadline (``deadline_hours`` after ``since``) an undecided canary gets ``on_deadline``
  (default ``rollback``: keep the current version).
* A canary that cannot be served (its GGUF missing or changed, its version gone) is rolled back
  at once, with the reason in the canary log.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from loop.core.io import sha256_file
from loop.core.registry import RegistryBase, RegistryError

GRID = 4000  # grid points on [0, 1]: probabilities to about 1e-4, a few ms per check


@dataclass
class Arm:
    """One version's rated turns since the canary started."""

    version: str
    rated: int = 0
    down: int = 0

    @property
    def up(self) -> int:
        return self.rated - self.down

    @property
    def rate(self) -> float | None:
        return self.down / self.rated if self.rated else None

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Credible interval of the thumbs-down rate (Beta(1 + down, 1 + up)): equal-tailed, except
        one-sided when every rating went one way (so an observed 0 or 1 lies inside it)."""
        import numpy as np

        _, mass = _posterior(self.down, self.up)
        edges, cdf = np.arange(GRID + 1) / GRID, np.concatenate(([0.0], np.cumsum(mass)))
        if self.rated and self.down == 0:
            return 0.0, float(np.interp(level, cdf, edges))
        if self.rated and self.up == 0:
            return float(np.interp(1 - level, cdf, edges)), 1.0
        tail = (1 - level) / 2
        return float(np.interp(tail, cdf, edges)), float(np.interp(1 - tail, cdf, edges))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {**asdict(self), "up": self.up, "rate": self.rate, "interval": [lo, hi]}


@functools.lru_cache(maxsize=1)
def _grid():
    import numpy as np

    x = (np.arange(GRID) + 0.5) / GRID
    return x, np.log(x), np.log1p(-x)


def _posterior(down: int, up: int):
    """Grid (bin centres) and probability mass of Beta(1 + down, 1 + up)."""
    import numpy as np

    x, log_x, log_1mx = _grid()
    logp = down * log_x + up * log_1mx
    logp -= logp.max()
    mass = np.exp(logp)
    return x, mass / mass.sum()


def prob_canary_worse(canary: Arm, current: Arm, margin: float = 0.0) -> float:
    """P(p_canary > p_current + margin) under independent Beta(1 + down, 1 + up) posteriors."""
    import numpy as np

    x, mc = _posterior(canary.down, canary.up)
    _, mb = _posterior(current.down, current.up)
    # The canary's CDF at the bin edges, interpolated at x + margin: linear within a bin, so a
    # tie (the same bin) counts half, as it would for the continuous posteriors.
    edges = np.arange(GRID + 1) / GRID
    cdf_c = np.concatenate(([0.0], np.cumsum(mc)))
    worse = np.sum(mb * (1.0 - np.interp(x + margin, edges, cdf_c)))
    return float(min(1.0, max(0.0, worse)))


@dataclass
class Verdict:
    """What one check found: ``decision`` is promote, rollback or continue, with the reason."""

    decision: str
    reason: str
    canary: Arm
    current: Arm
    p_worse: float | None = None
    p_ok: float | None = None
    expired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason, "canary": self.canary.to_dict(),
                "current": self.current.to_dict(), "p_worse": self.p_worse, "p_ok": self.p_ok,
                "expired": self.expired}


def decide(canary: Arm, current: Arm, rules: Any, *, expired: bool = False) -> Verdict:
    """The rule in the module docstring; ``rules`` is a ``loop.config.RolloutConfig``."""
    need = rules.min_rated_turns
    if canary.rated < need or current.rated < need:
        why = (f"{canary.rated} rated canary turn(s) and {current.rated} rated current turn(s); "
               f"deciding needs {need} in each")
        if expired:
            return Verdict(rules.on_deadline, f"deadline reached undecided ({why}): {rules.on_deadline} by default",
                           canary, current, expired=True)
        return Verdict("continue", why, canary, current)
    p_worse = prob_canary_worse(canary, current)
    p_ok = 1.0 - prob_canary_worse(canary, current, rules.margin) if p_worse <= rules.rollback_threshold else None
    rates = (f"thumbs-down {canary.down}/{canary.rated} on {canary.version} vs "
             f"{current.down}/{current.rated} on {current.version}")
    if p_worse > rules.rollback_threshold:
        return Verdict("rollback", f"P(canary worse) = {p_worse:.3f} > {rules.rollback_threshold} ({rates})",
                       canary, current, p_worse, p_ok, expired)
    if p_ok > rules.promote_threshold:
        return Verdict("promote", f"P(canary no worse than current + {rules.margin}) = {p_ok:.3f} > "
                       f"{rules.promote_threshold} ({rates})", canary, current, p_worse, p_ok, expired)
    if expired:
        return Verdict(rules.on_deadline, f"deadline reached undecided (P(worse) = {p_worse:.3f}, "
                       f"P(no worse) = {p_ok:.3f}; {rates}): {rules.on_deadline} by default",
                       canary, current, p_worse, p_ok, True)
    return Verdict("continue", f"undecided: P(worse) = {p_worse:.3f}, P(no worse) = {p_ok:.3f} ({rates})",
                   canary, current, p_worse, p_ok)


# -- the store's side --------------------------------------------------------------------------------

_RATED_SQL = """
    SELECT t.model_version AS version, f.thumbs AS thumbs, t.created_at AS at
    FROM turns t JOIN feedback f
      ON f.rowid = (SELECT MAX(rowid) FROM feedback WHERE turn_id = t.id)
    WHERE t.created_at >= ? AND t.model_version IN (?, ?) AND f.thumbs IS NOT NULL
    ORDER BY t.created_at"""


def _store_time(iso: str) -> str:
    """The store's timestamp format (UTC, microseconds) for an ISO time, so strings compare."""
    return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).isoformat(timespec="microseconds")


def rated_turns(store: Any, canary: str, current: str, since: str) -> list[dict[str, Any]]:
    """(version, thumbs, at) of every rated turn of either version since ``since``, oldest first.
    The latest feedback event of a turn counts; a thumb taken back (latest event without one) does not."""
    rows = store._conn().execute(_RATED_SQL, (_store_time(since), canary, current)).fetchall()
    return [{"version": r["version"], "thumbs": r["thumbs"], "at": r["at"]} for r in rows]


def arms(rows: list[dict[str, Any]], canary: str, current: str) -> tuple[Arm, Arm]:
    a, b = Arm(canary), Arm(current)
    for r in rows:
        arm = a if r["version"] == canary else b
        arm.rated += 1
        arm.down += r["thumbs"] == "down"
    return a, b


def timeline(rows: list[dict[str, Any]], canary: str, current: str, points: int = 30) -> list[dict[str, Any]]:
    """Cumulative rate and 95% interval of each arm at up to ``points`` moments (for the plot)."""
    if not rows:
        return []
    step = max(1, math.ceil(len(rows) / points))
    cuts = sorted(set(list(range(step, len(rows), step)) + [len(rows)]))
    out = []
    for n in cuts:
        a, b = arms(rows[:n], canary, current)
        at = rows[n - 1]["at"]
        for arm in (a, b):
            if arm.rated:
                lo, hi = arm.interval()
                out.append({"at": at, "version": arm.version, "rated": arm.rated, "rate": arm.rate,
                            "low": lo, "high": hi})
    return out


# -- the check ---------------------------------------------------------------------------------------

def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def status(registry: RegistryBase, store: Any, rules: Any, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The live canary, its arms and what the rule says now (nothing is changed); ``{"canary": None}``
    when none runs (with the last one's log line, if any)."""
    pointer = registry.canary_pointer()
    if pointer is None:
        ended = registry.canary_log()
        return {"canary": None, "last": ended[-1] if ended else None}
    vid, current = pointer["version"], registry.current_id()
    since = pointer["since"]
    deadline = dt.datetime.fromisoformat(since) + dt.timedelta(hours=rules.deadline_hours)
    rows = rated_turns(store, vid, current or "", since)
    a, b = arms(rows, vid, current or "")
    verdict = decide(a, b, rules, expired=(now or _now()) >= deadline)
    return {"canary": vid, "current": current, "since": since, "share": pointer.get("share"),
            "baseline": pointer.get("baseline"), "deadline": deadline.isoformat(timespec="seconds"),
            "min_rated_turns": rules.min_rated_turns, "margin": rules.margin, "verdict": verdict.to_dict(),
            "pointer": pointer}


def unservable(registry: RegistryBase, vid: str) -> str | None:
    """Why the canary ``vid`` cannot be served (version gone, GGUF missing or changed), else None."""
    try:
        version = registry.get(vid)
    except RegistryError as exc:
        return str(exc)
    if not version.gguf_path.is_file():
        return f"version {vid} has no GGUF file at {version.gguf_path}"
    if version.gguf_sha256 and sha256_file(version.gguf_path) != version.gguf_sha256:
        return f"version {vid}: GGUF sha256 does not match version.json (file changed on disk)"
    return None
