"""The forget ledger: the ids of turns that ``python -m loop.store forget`` removed.

``$LOOP_HOME/forgotten.jsonl`` holds one ``{"turn_id", "at"}`` line per forgotten turn: ids only,
never text. Every path that could bring a forgotten turn back reads it: the mirror's restore
(a segment a failed rewrite left behind), the push (a turn restored into the store by any other
route) and the pull (a record that survived in Argilla, e.g. restored from a backup of its
database). So a forget that was interrupted part way cannot be undone by the next cycle, and a
second ``forget`` of the same ids finishes what the first left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from loop.core import paths
from loop.core.io import read_jsonl

LEDGER = "forgotten.jsonl"


def ledger_path(home: Path | None = None) -> Path:
    return (home or paths.loop_home()) / LEDGER


def forgotten_ids(home: Path | None = None) -> set[str]:
    """Every turn id ever forgotten in this home (empty when nothing was)."""
    # A torn last line from a crash mid-append is skipped; the ids before it still count.
    rows = read_jsonl(ledger_path(home), missing_ok=True, skip_torn=True)
    return {row["turn_id"] for row in rows if isinstance(row, dict) and isinstance(row.get("turn_id"), str)}


def record_forgotten(turn_ids: Iterable[str], at: str, home: Path | None = None) -> None:
    """Append ids not in the ledger yet, fsynced: written before anything is deleted."""
    known = forgotten_ids(home)
    new = sorted(set(turn_ids) - known)
    if not new:
        return
    path = ledger_path(home)
    with open(path, "ab+") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write("".join(json.dumps({"turn_id": t, "at": at}) + "\n" for t in new).encode())
        fh.flush()
        os.fsync(fh.fileno())
