"""The mirror itself: flush new store rows to a target as segments, restore the store from them, and
rewrite them for ``forget`` (``loop.core.mirror`` states the contract)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulid import ULID

from loop.core import paths
from loop.core.config import CoreConfig
from loop.core.forgotten import forgotten_ids
from loop.core.io import atomic_write_text
from loop.core.mirror.targets import HubBusyError, HubDatasetTarget, LocalDirTarget, Target
from loop.core.store import Store

log = logging.getLogger(__name__)

FORMAT = 1
# Parents before children, so that a segment replays without breaking a foreign key.
TABLES: tuple[str, ...] = ("conversations", "turns", "feedback", "arena_votes")
# Bounded segment files: a large backlog (a long outage) becomes several segments in one write.
SEGMENT_MAX_ROWS = 5000


@dataclass
class FlushResult:
    segments: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    # True when rows may be waiting: the target's least interval between writes has not passed.
    deferred: bool = False

    @property
    def segment(self) -> str | None:
        """The last segment written, or None when nothing was."""
        return self.segments[-1] if self.segments else None


@dataclass
class SkippedRow:
    segment: str
    table: str | None
    id: str | None
    reason: str


@dataclass
class RestoreResult:
    segments: int = 0  # segments read and applied
    seen: dict[str, int] = field(default_factory=dict)  # rows read from the target
    imported: dict[str, int] = field(default_factory=dict)  # rows that were new to the store
    skipped_lines: int = 0  # unparseable lines (a torn write elsewhere)
    skipped_rows: list[SkippedRow] = field(default_factory=list)  # rows that could not be restored, and why
    failed_segments: dict[str, str] = field(default_factory=dict)  # segment -> why it could not be read
    forgotten: int = 0  # rows of forgotten turns (loop.core.forgotten) left out on purpose

    @property
    def complete(self) -> bool:
        return not (self.skipped_lines or self.skipped_rows or self.failed_segments)

    def summary(self) -> str:
        text = (f"{self.segments} segment(s) restored, imported {sum(self.imported.values())} new row(s) "
                f"{self.imported} of {sum(self.seen.values())} read")
        if self.complete:
            return text
        parts = [text]
        if self.failed_segments:
            parts.append(f"{len(self.failed_segments)} segment(s) unreadable: "
                         + "; ".join(f"{n} ({why})" for n, why in list(self.failed_segments.items())[:10]))
        if self.skipped_rows:
            parts.append(f"{len(self.skipped_rows)} row(s) skipped: " + "; ".join(
                f"{s.table}/{s.id} in {s.segment} ({s.reason})" for s in self.skipped_rows[:10]))
        if self.skipped_lines:
            parts.append(f"{self.skipped_lines} unreadable line(s)")
        return ", ".join(parts)


def _columns(db, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


class Mirror:
    """Flushes new store rows to ``target`` as segments; restores the store from them.

    ``clock`` (monotonic seconds) times the target's least interval between writes.
    """

    def __init__(self, store: Store, target: Target, state_path: str | Path | None = None, *,
                 segment_max_rows: int = SEGMENT_MAX_ROWS, clock: Callable[[], float] = time.monotonic):
        if segment_max_rows < 1:
            raise ValueError(f"segment_max_rows must be >= 1, got {segment_max_rows}")
        self.store = store
        self.target = target
        self.state_path = Path(state_path) if state_path else paths.loop_home() / "mirror-state.json"
        self.segment_max_rows = segment_max_rows
        self.clock = clock
        self._lock = threading.Lock()  # one flush at a time: the watermark moves under it
        self._mirrored_ids: dict[str, set[str]] = {t: set() for t in TABLES}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_write: float | None = None
        self._not_before: float | None = None  # the Hub asked us to wait until then
        self.writes = 0
        self.last_error: str | None = None
        self.last_restore: RestoreResult | None = None

    # -- watermark -------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, int]:
        try:
            state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {t: 0 for t in TABLES}
        if state.get("target") != self.target.describe():
            return {t: 0 for t in TABLES}  # another target: everything still has to go there
        return {t: int(state.get("rowids", {}).get(t, 0)) for t in TABLES}

    def _save_state(self, rowids: dict[str, int]) -> None:
        atomic_write_text(self.state_path, json.dumps({"target": self.target.describe(), "rowids": rowids}, sort_keys=True))

    # -- restore ---------------------------------------------------------------------------------

    def restore(self) -> RestoreResult:
        """Import every segment into the store (idempotent); call before serving.

        Raises only when the target cannot be listed (or is refused, e.g. a public Hub repo);
        anything wrong inside a segment is skipped, reported in the result, and logged.
        """
        result = RestoreResult(seen={t: 0 for t in TABLES}, imported={t: 0 for t in TABLES})
        db = self.store._conn()
        cols = {t: _columns(db, t) for t in TABLES}
        had_state = self.state_path.is_file()
        forgotten = forgotten_ids(self.state_path.parent)
        with self._lock:
            # Children whose parent is not in the store yet: tried again after every segment.
            orphans: list[tuple[str, str, dict[str, Any]]] = []
            for name in self.target.list_segments():
                try:
                    data = self.target.read_segment(name)
                except Exception as exc:  # one unreadable segment must not keep the others out
                    result.failed_segments[name] = f"{type(exc).__name__}: {exc}"
                    continue
                rows = self._parse_segment(name, data, result)
                if forgotten:  # a segment a failed forget could not rewrite must not bring a turn back
                    kept = [(t, r) for t, r in rows if not _mentions(t, r, forgotten, set())]
                    result.forgotten += len(rows) - len(kept)
                    rows = kept
                db.execute("BEGIN IMMEDIATE")
                try:
                    for table, row in rows:
                        result.seen[table] += 1
                        if self._insert(db, table, row, cols[table], name, result) == "orphan":
                            orphans.append((name, table, row))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                result.segments += 1
            while orphans:
                waiting = len(orphans)
                db.execute("BEGIN IMMEDIATE")
                try:
                    orphans = [(name, table, row) for name, table, row in orphans
                               if self._insert(db, table, row, cols[table], name, result) == "orphan"]
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                if len(orphans) == waiting:  # no parent arrived in this pass: none will
                    result.skipped_rows.extend(
                        SkippedRow(name, table, row["id"], "orphan: its parent row is in no segment and not in the store")
                        for name, table, row in orphans)
                    break
            if not had_state:
                # No watermark (a fresh or wiped home): rows restored are mirrored already; rows
                # the store held before are found by id on the first flush.
                self._save_state({t: 0 for t in TABLES})
        self.last_restore = result
        if result.complete:
            log.info("mirror restore from %s: %s", self.target.describe(), result.summary())
        else:
            log.warning("mirror restore from %s was partial: %s", self.target.describe(), result.summary())
        return result

    @staticmethod
    def _parse_segment(name: str, data: bytes, result: RestoreResult) -> list[tuple[str, dict[str, Any]]]:
        """The segment's rows, parents first; what cannot be a row is counted or reported."""
        by_table: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                result.skipped_lines += 1
                continue
            if not isinstance(rec, dict):
                result.skipped_lines += 1
                continue
            table, row = rec.get("table"), rec.get("row")
            if table == "_segment":
                continue  # the header
            if table not in by_table:
                result.skipped_rows.append(SkippedRow(name, str(table), None, "unknown table"))
                continue
            if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
                result.skipped_rows.append(SkippedRow(name, table, None, "row without an id"))
                continue
            by_table[table].append(row)
        return [(t, row) for t in TABLES for row in by_table[t]]

    def _insert(self, db, table: str, row: dict[str, Any], cols: list[str], segment: str,
                result: RestoreResult) -> str:
        """Insert one row: "ok" (new or already there), "orphan" (its parent is missing) or "skipped"."""
        names = [c for c in cols if c in row]
        try:
            # ON CONFLICT DO NOTHING covers the id only: a row the schema refuses (a NULL in a
            # NOT NULL column, a failed CHECK) raises and is reported instead of vanishing.
            cur = db.execute(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) ON CONFLICT DO NOTHING",
                [row[c] for c in names],
            )
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                return "orphan"
            result.skipped_rows.append(SkippedRow(segment, table, row["id"], str(exc)))
            return "skipped"
        except (sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:  # a value SQLite cannot store
            result.skipped_rows.append(SkippedRow(segment, table, row["id"], f"{type(exc).__name__}: {exc}"))
            return "skipped"
        result.imported[table] += cur.rowcount
        self._mirrored_ids[table].add(row["id"])
        return "ok"

    # -- flush -----------------------------------------------------------------------------------

    def flush(self, *, force: bool = False) -> FlushResult:
        """Write the rows added since the last flush as new segments, in one write (none if nothing
        is new). Unless ``force``, nothing is written before the target's least interval between
        writes has passed, nor before a wait the Hub asked for is over (``deferred``)."""
        with self._lock:
            now = self.clock()
            if not force and (
                (self._not_before is not None and now < self._not_before)
                or (self._last_write is not None and now - self._last_write < self.target.min_write_interval_s)
            ):
                return FlushResult(deferred=True)
            rowids = self._load_state()
            db = self.store._conn()
            lines: list[tuple[str, str]] = []
            counts: dict[str, int] = {}
            new_rowids = dict(rowids)
            # One read transaction: a consistent snapshot, so a feedback row never arrives in a
            # segment before the turn it points at.
            db.execute("BEGIN")
            try:
                for table in TABLES:
                    rows = db.execute(
                        f"SELECT rowid AS _rowid, * FROM {table} WHERE rowid > ? ORDER BY rowid", (rowids[table],)
                    ).fetchall()
                    n = 0
                    for r in rows:
                        row = dict(r)
                        new_rowids[table] = row.pop("_rowid")
                        if row["id"] in self._mirrored_ids[table]:
                            continue
                        lines.append((table, json.dumps({"table": table, "row": row}, ensure_ascii=False, sort_keys=True)))
                        n += 1
                    counts[table] = n
            finally:
                db.execute("COMMIT")
            if not lines:
                if new_rowids != rowids:
                    self._save_state(new_rowids)
                return FlushResult(rows=counts)
            segments = self._segments(lines)
            try:
                self.target.write_segments(segments)
            except HubBusyError as exc:
                if exc.retry_after_s:
                    self._not_before = self.clock() + exc.retry_after_s
                raise
            self._last_write = self.clock()
            self._not_before = None
            self.writes += 1
            # The watermark moves only after the segments are durable: a crash in between writes
            # the same rows again next time, which restore ignores, rather than losing them.
            self._save_state(new_rowids)
            for table in TABLES:
                self._mirrored_ids[table].clear()  # below the watermark now; no need to remember
            return FlushResult([name for name, _ in segments], counts)

    def forget(self, turn_ids: set[str], conversation_ids: set[str]) -> dict[str, Any]:
        """Rewrite every segment holding a row of these turns (the turn, its feedback) or of these
        conversations, in one write to the target; a segment left with no rows is deleted. Then
        lower the watermarks to the store's highest rowids: SQLite hands a deleted highest rowid out
        again, and a new row at or below the watermark would never be mirrored.

        Returns ``{"target", "segments_rewritten", "segments_deleted", "rows_removed"}``."""
        with self._lock:
            changes: dict[str, bytes | None] = {}
            removed = 0
            for name in self.target.list_segments():
                data = self.target.read_segment(name)
                kept, dropped = [], 0
                for line in data.decode("utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        kept.append(line)
                        continue
                    if (isinstance(rec, dict) and isinstance(rec.get("row"), dict)
                            and _mentions(rec.get("table"), rec["row"], turn_ids, conversation_ids)):
                        dropped += 1
                        continue
                    kept.append(line)
                if not dropped:
                    continue
                removed += dropped
                rows = [line for line in kept if '"table": "_segment"' not in line and line.strip()]
                changes[name] = ("\n".join(kept) + "\n").encode("utf-8") if rows else None
            self.target.rewrite_segments(changes)
            state = self._load_state()
            highest = self.store.max_rowids()
            if self.state_path.is_file():
                self._save_state({t: min(state[t], highest.get(t, 0)) for t in TABLES})
        return {"target": self.target.describe(),
                "segments_rewritten": sorted(n for n, d in changes.items() if d is not None),
                "segments_deleted": sorted(n for n, d in changes.items() if d is None), "rows_removed": removed}

    def _segments(self, lines: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
        """Split rows (parents first) into segments named ``<ULID>-<n>.jsonl``: one ULID per flush
        and a running number, so the names sort in the order the rows must be replayed."""
        stem = str(ULID())
        out = []
        for n, start in enumerate(range(0, len(lines), self.segment_max_rows)):
            chunk = lines[start:start + self.segment_max_rows]
            counts = {t: sum(1 for table, _ in chunk if table == t) for t in TABLES}
            header = json.dumps({"table": "_segment", "row": {"format": FORMAT, "counts": counts}}, sort_keys=True)
            out.append((f"{stem}-{n:05d}.jsonl", ("\n".join([header, *(line for _, line in chunk)]) + "\n").encode("utf-8")))
        return out

    # -- background ------------------------------------------------------------------------------

    def start(self, interval_s: float) -> None:
        """Flush every ``interval_s`` seconds on a daemon thread until ``stop()``."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self._safe_flush()

        self._thread = threading.Thread(target=loop, name="store-mirror", daemon=True)
        self._thread.start()

    def _safe_flush(self, *, force: bool = False) -> FlushResult | None:
        try:
            result = self.flush(force=force)
            self.last_error = None
            return result
        except Exception as exc:  # the chat must keep working while the mirror is unreachable
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("mirror flush to %s failed (will retry): %s", self.target.describe(), self.last_error)
            return None

    def stop(self) -> FlushResult | None:
        """Stop the background thread and flush one last time, whatever the interval."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        return self._safe_flush(force=True)


def _mentions(table: Any, row: dict[str, Any], turn_ids: set[str], conversation_ids: set[str]) -> bool:
    """Whether a mirrored row belongs to a forgotten turn or conversation."""
    if table == "turns":
        return row.get("id") in turn_ids or row.get("conversation_id") in conversation_ids
    if table == "feedback":
        return row.get("turn_id") in turn_ids
    if table == "conversations":
        return row.get("id") in conversation_ids
    return False


def target_from_config(config: CoreConfig, api: Any | None = None) -> Target | None:
    """The target that ``[app] mirror_dir`` / ``mirror_hf_repo`` describe, or None when off."""
    app = config.app
    if app.mirror_hf_repo:
        return HubDatasetTarget(app.mirror_hf_repo, api=api, commit_interval_s=app.mirror_hub_commit_interval_s)
    if app.mirror_dir.strip().lower() == "off":
        return None
    if app.mirror_dir:
        return LocalDirTarget(app.mirror_dir)
    home = Path(config.home)
    return LocalDirTarget(home.parent / f"{home.name}-mirror")


def mirror_from_config(config: CoreConfig, store: Store, api: Any | None = None) -> Mirror | None:
    target = target_from_config(config, api=api)
    if target is None:
        return None
    return Mirror(store, target, Path(config.home) / "mirror-state.json")
