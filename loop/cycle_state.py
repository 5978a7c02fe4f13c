"""The persisted state of one cycle, the base of every stage's result, the signals a stage uses to
end or pause it, and what the registry says this cycle did (the version it registered, the
promotion that made it current).

A stage's result is a dataclass (``loop.cycle_results``) stored in ``state.json`` as the plain
dict ``to_dict()`` writes and read back with ``from_dict()``; keys a result type does not name are
kept as they were, so a state file written by an older cycle resumes unchanged.

The registry is the truth about promotion, not ``state.json``: a process killed between
``Registry.promote`` and the next state save has promoted, and its history line says so.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from loop.core.errors import LoopError
from loop.core.io import atomic_write_text, new_id, utcnow


def omitted_when_none(**kwargs: Any) -> Any:
    """A result field written only when it holds something (the key an older cycle also left out)."""
    return field(default=None, metadata={"omit_none": True}, **kwargs)


R = TypeVar("R", bound="StageResult")


@dataclass(kw_only=True)
class StageResult:
    """What one stage did, persisted as ``state.json``'s ``stages.<stage>.result``.

    ``to_dict()`` writes one key per field (a field made with ``omitted_when_none`` only when set);
    ``from_dict()`` reads them back, every field defaulted, and keeps the keys it does not name in
    ``extra`` so that writing it again loses nothing."""

    stage: ClassVar[str] = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.metadata.get("omit_none")):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any] | None) -> R:
        rest = dict(data or {})
        known = {f.name: rest.pop(f.name) for f in fields(cls) if f.name != "extra" and f.name in rest}
        return cls(**known, extra=rest)


class StopCycle(LoopError):
    """A stage decided the cycle ends here (not an error): the reason goes in the report, and
    ``result`` (what the stage found before it stopped) in the stage's entry."""

    def __init__(self, outcome: str, reason: str, result: StageResult | None = None):
        self.outcome = outcome
        self.reason = reason
        self.result = result
        super().__init__(reason)


class WaitCycle(LoopError):
    """A stage cannot finish yet and is not failing (a candidate waiting for arena games): the cycle
    stays unfinished, the stage is retried by the next run, and nothing counts as a failure."""

    def __init__(self, outcome: str, reason: str, result: StageResult | None = None):
        self.outcome = outcome
        self.reason = reason
        self.result = result
        super().__init__(reason)


class CycleState:
    """What a cycle has done so far, persisted after every stage."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def new(cls, root: Path, force: bool) -> CycleState:
        cid = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + new_id()[-6:].lower()
        path = root / cid / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"id": cid, "started_at": utcnow(), "force": force, "stages": {}, "outcome": None})
        state.save()
        return state

    @classmethod
    def unfinished(cls, root: Path) -> CycleState | None:
        if not root.is_dir():
            return None
        for d in sorted(root.iterdir(), reverse=True):
            f = d / "state.json"
            if f.is_file():
                data = json.loads(f.read_text())
                return cls(f, data) if data.get("outcome") is None else None
        return None

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def dir(self) -> Path:
        return self.path.parent

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def result(self, name: str) -> dict[str, Any]:
        """A stage's result as stored (a plain dict; ``{}`` before it ran)."""
        return self.stage(name).get("result", {})

    def read(self, kind: type[R]) -> R:
        """The result of stage ``kind.stage`` as its type (every field defaulted before it ran)."""
        return kind.from_dict(self.result(kind.stage))

    def failures(self, name: str) -> int:
        return int((self.data.get("failures") or {}).get(name, 0))

    def note_failure(self, name: str, why: str) -> int:
        """Count one failed or interrupted attempt of a stage (persisted by the next save)."""
        failures = self.data.setdefault("failures", {})
        failures[name] = int(failures.get(name, 0)) + 1
        self.data.setdefault("failure_log", []).append({"stage": name, "at": utcnow(), "why": why[:2000]})
        return failures[name]

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True, default=str))


def own_version(registry, cycle_id: str):
    """The version this cycle registered (``variant.cycle``), or None: found in the registry, so a
    cycle killed between ``register`` and its next state save still finds it."""
    return next((v for v in registry.list() if (v.variant or {}).get("cycle") == cycle_id), None)


def promotion_of(registry, vid: str) -> dict[str, Any] | None:
    """The first history line that made ``vid`` current (a promotion, its recovered line, or a person
    pointing ``current`` at it by hand), else None: once there is one, no cycle promotes ``vid`` again."""
    registry.reconcile()  # a pointer written just before a kill gets its history line first
    return next((h for h in registry.history() if h.get("to") == vid), None)


def moved_away_from(registry, vid: str) -> dict[str, Any] | None:
    """The latest history line that made another version current while ``vid`` was (a rollback, or
    another promotion), when ``vid`` is not current now; else None."""
    if registry.current_id() == vid:
        return None
    return next((h for h in reversed(registry.history()) if h.get("from") == vid), None)
