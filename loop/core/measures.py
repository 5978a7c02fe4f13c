"""The fixed measures' cache in each ``version.json``, and how it is read.

Every version, the base v1 included, is measured on the same fixed sets from its served GGUF (the
conductor's ``loop.version_measures`` takes and caches the measures; docs/registry.md). The cache is
``Version.metrics["measures"]``, one entry per measure::

    {"value": 0.417, "set": "regression_set.jsonl", "set_hash": "<sha256 of the set's content>",
     "gguf_sha256": "<the file measured>", "method": {"version": 1, ...}, "n": 32,
     "measured_at": "...", "seconds": 19.2, "copied_from": "v1" (when taken from the same bytes), ...}

This module only reads it: the app's Versions tab and ``python -m loop.versions compare`` show the
same numbers by the same rules, and nothing here loads a model. The rules:

* an entry counts for a version only while its ``gguf_sha256`` is the version's (else: missing);
* values are compared only on one set and method: the conductor compares against the sets as they
  are now; the app, which has no sets, against the set of the newest entry (the measurer always
  takes the set as it is now), and an entry of another set is *stale*: missing until measured again;
* missing is None, never 0.

The canary's thumbs-down rate comes from ``canary.jsonl`` (the canary arm's numbers when its canary
was decided) and a cycle's held-out loss only as its gate compared it (``gate_comparison``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from loop.core import metrics
from loop.core.registry import Version

KEY = "measures"
NAMES = ("regression_loss", "general_right", "probe_pass_rate")
LABELS = {"regression_loss": "regression loss", "general_right": "general answers right",
          "probe_pass_rate": "probe pass rate", "canary_thumbs_down_rate": "canary thumbs-down rate",
          "arena_rating": "arena rating"}


def entry(version: Version, name: str) -> dict[str, Any] | None:
    """The cached entry of measure ``name`` for this version's GGUF (None when absent or of another file)."""
    cached = ((version.metrics or {}).get(KEY) or {}).get(name)
    if not isinstance(cached, dict) or cached.get("gguf_sha256") != version.gguf_sha256:
        return None
    return cached


def number(cached: Mapping[str, Any] | None) -> float | None:
    """An entry's value when it is a number (a set with nothing to score caches None)."""
    value = (cached or {}).get("value")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shown(versions: Iterable[Version]) -> dict[str, dict[str, Any]]:
    """Per measure: ``values`` (one per version, in order; None when missing or stale), ``stale`` (ids
    whose entry is of another set or method) and ``set`` ({"set", "hash"} of the one shown, or None)."""
    versions = list(versions)
    out: dict[str, dict[str, Any]] = {}
    for name in NAMES:
        entries = [entry(v, name) for v in versions]
        present = [e for e in entries if e is not None and number(e) is not None]
        newest = max(present, key=lambda e: str(e.get("measured_at") or "")) if present else None
        key = (newest.get("set_hash"), newest.get("method")) if newest else None

        def same(e: dict[str, Any] | None, key: Any = key) -> bool:
            return e is not None and number(e) is not None and (e.get("set_hash"), e.get("method")) == key

        out[name] = {"values": [number(e) if same(e) else None for e in entries],
                     "stale": [v.id for v, e in zip(versions, entries) if number(e) is not None and not same(e)],
                     "set": {"set": newest.get("set"), "hash": newest.get("set_hash")} if newest else None}
    return out


def canary_outcomes(canary_log: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per version whose canary was decided: its arm's ``rate``, ``rated`` and ``down`` then (the last
    canary when a version was one twice); a canary ended without numbers (unservable) has none."""
    out: dict[str, dict[str, Any]] = {}
    for e in canary_log:
        arm = (e.get("decision") or {}).get("canary") or {}
        if e.get("action") in ("promoted", "rolled_back") and arm.get("rated") and arm.get("rate") is not None:
            out[str(e.get("version"))] = {"rate": float(arm["rate"]), "rated": arm["rated"], "down": arm.get("down"),
                                          "outcome": e.get("action")}
    return out


def gate_comparison(version: Version) -> str | None:
    """The held-out loss of the cycle that made ``version``, as its gate compared it with the version it
    replaced on that cycle's held-out set; None for a version no cycle made (the base)."""
    recorded = version.metrics or {}
    candidate, current = metrics.heldout_loss(recorded), recorded.get("current_at_gate") or {}
    if candidate is None:
        return None
    theirs = metrics.heldout_loss(current)
    if theirs is None:
        return f"held-out {candidate:.4f}, no gate comparison recorded"
    return f"candidate {candidate:.4f} vs current {current.get('version') or '?'} {theirs:.4f}"


def format_value(name: str, value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    spec = ".4f" if name == "regression_loss" else ".0f" if name == "arena_rating" else ".1%"
    return format(value, ("+" if sign else "") + spec)
