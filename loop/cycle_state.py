"""The persisted state of one cycle, and the signal a stage uses to end the cycle early."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from loop.registry import atomic_write_text
from loop.store import new_id


class StopCycle(Exception):
    """A stage decided the cycle ends here (not an error): the reason goes in the report."""

    def __init__(self, outcome: str, reason: str):
        self.outcome = outcome
        self.reason = reason
        super().__init__(reason)


class CycleState:
    """What a cycle has done so far, persisted after every stage."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def new(cls, root: Path, force: bool) -> "CycleState":
        cid = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + new_id()[-6:].lower()
        path = root / cid / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"id": cid, "started_at": _now(), "force": force, "stages": {}, "outcome": None})
        state.save()
        return state

    @classmethod
    def unfinished(cls, root: Path) -> "CycleState | None":
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
        return self.stage(name).get("result", {})

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True, default=str))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
