"""A durable, append-only mirror of the store, restored on start.

A Hugging Face Space's disk is wiped on every restart; the seed project lost its users' flags
that way. So the app copies every new row of the store (conversations, turns, feedback events,
arena votes) to a durable target and, on start, imports whatever the target holds.

Append-only: each flush writes the rows added since the last flush (a rowid watermark per table)
as new segment files (JSON lines, at most ``segment_max_rows`` rows each); an existing segment is
never rewritten, except by ``Mirror.forget`` (``python -m loop.store forget``), which rewrites the
segments holding a forgotten turn (on the Hub: one commit, then the repo's history squashed), and
restore leaves out the rows of every turn in the forget ledger (``loop.forgotten``). Segment names start with a ULID, so sorting them by name replays them in the
order they were written. Restore is idempotent (insert, or do nothing when the id is there), so
replaying a segment twice, or into a store that already holds some of its rows, changes nothing.

Restore never stops at a bad part: an unreadable segment (after retries), an unreadable line, a
row without an id, a row the schema refuses, or a child row whose parent is in no segment (an
orphan; tried again after every other segment, in case its parent came later) is skipped, and
``RestoreResult`` names each one; every other row is restored. Nothing is deleted from the target,
so a segment that could not be read is read again by the next restore.

Targets:
  * ``LocalDirTarget``: a directory (default: ``<LOOP_HOME>-mirror``, a sibling of the home so
    wiping the home does not wipe the mirror; on a Space, point it at persistent storage such
    as ``/data``). Files appear whole: write to a temporary name, fsync, link.
  * ``HubDatasetTarget``: a Hugging Face dataset repo through ``huggingface_hub.HfApi``. The Hub
    limits commits per repo and hour (128), so writes are batched: at most one commit per
    ``commit_interval_s`` (``[app] mirror_hub_commit_interval_s``, 300 s), holding every segment
    of that flush (``create_commit`` with one operation per segment); the final flush on shutdown
    is never held back. Rows wait in the store meanwhile, and the watermark moves only after the
    commit. HTTP 429 and 5xx answers are retried with exponential backoff, honouring
    ``Retry-After`` (and the Hub's ``RateLimit`` header); a wait longer than ``RetryPolicy.max_wait_s``
    is not slept through: the flush fails with ``HubBusyError`` and the mirror tries again once
    that time has passed. The store holds raw, unscrubbed chats, so the repo must be private: it
    is created private, and a repo that is not private (checked before every commit) is refused
    with ``PublicRepoError`` before anything is uploaded. The token comes from ``HF_TOKEN``.

The watermark lives in ``$LOOP_HOME/mirror-state.json``. When the home is wiped, the watermark
goes with it, the (empty) store is refilled from the target, and every row now in the store is
known to be mirrored, so nothing is written twice. Rows the restore brought in are remembered by
id, so a partial store that is topped up by a restore does not send them back either.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ulid import ULID

from loop import paths
from loop.store import Store

log = logging.getLogger(__name__)

FORMAT = 1
SEGMENT_DIR = "segments"
# Parents before children, so that a segment replays without breaking a foreign key.
TABLES: tuple[str, ...] = ("conversations", "turns", "feedback", "arena_votes")
# Bounded segment files: a large backlog (a long outage) becomes several segments in one write.
SEGMENT_MAX_ROWS = 5000
# Five minutes: 12 commits an hour, a tenth of the Hub's 128 per repo and hour.
DEFAULT_HUB_COMMIT_INTERVAL_S = 300.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class MirrorError(RuntimeError):
    pass


class PublicRepoError(MirrorError):
    """The Hub repo is not private; the mirror holds raw chats and uploads nothing to it."""


class HubBusyError(MirrorError):
    """The Hub kept answering 429/5xx; ``retry_after_s`` is how long it asked us to wait, if it said."""

    def __init__(self, message: str, *, status: int | None, retry_after_s: float | None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Target(Protocol):
    """Where segments are kept. Writing must never replace an existing segment."""

    # The least time between two writes (0: write on every flush).
    min_write_interval_s: float

    def describe(self) -> str: ...

    def list_segments(self) -> list[str]: ...

    def read_segment(self, name: str) -> bytes: ...

    def write_segments(self, segments: list[tuple[str, bytes]]) -> None: ...


class LocalDirTarget:
    min_write_interval_s = 0.0

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.dir = self.root / SEGMENT_DIR

    def describe(self) -> str:
        return f"dir:{self.root}"

    def list_segments(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.suffix == ".jsonl" and not p.name.startswith("."))

    def read_segment(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def write_segments(self, segments: list[tuple[str, bytes]]) -> None:
        for name, data in segments:
            self.write_segment(name, data)

    def rewrite_segments(self, changes: dict[str, bytes | None]) -> None:
        """Replace segments' bytes (None: delete the segment). Only ``forget`` rewrites a segment."""
        for name, data in changes.items():
            final = self.dir / name
            if data is None:
                final.unlink(missing_ok=True)
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        if changes and self.dir.is_dir():
            dirfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

    def write_segment(self, name: str, data: bytes) -> None:
        # The segments hold raw chats: the folder is the owner's alone, like the home.
        paths.private_dir(self.dir)
        final = self.dir / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            # link, not rename: link fails if the name exists, so a segment is never replaced.
            os.link(tmp, final)
        finally:
            os.unlink(tmp)
        dirfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


# -- talking to the Hub ----------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """How Hub calls are retried on 429 and 5xx answers."""

    attempts: int = 5
    base_wait_s: float = 1.0  # doubled per attempt when the Hub names no wait
    max_wait_s: float = 60.0  # a longer requested wait is not slept through (HubBusyError)
    sleep: Callable[[float], None] = time.sleep


def _http_status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def retry_after_s(exc: BaseException) -> float | None:
    """The wait an HTTP error asks for: ``Retry-After`` (seconds or a date), else the Hub's
    ``RateLimit`` header when no requests remain; None when it asks for none."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value:
        value = str(value).strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    try:
        from huggingface_hub.utils import parse_ratelimit_headers
    except ImportError:
        return None
    info = parse_ratelimit_headers(headers)
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    return None


def call_with_retry(what: str, fn: Callable[[], T], policy: RetryPolicy) -> T:
    """``fn()``, retried on HTTP 429/5xx with backoff that honours the server's requested wait."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            status = _http_status(exc)
            if status not in RETRY_STATUSES:
                raise
            asked = retry_after_s(exc)
            if asked is not None and asked > policy.max_wait_s:
                raise HubBusyError(f"{what}: HTTP {status}, the Hub asks to wait {asked:.0f} s",
                                   status=status, retry_after_s=asked) from exc
            if attempt >= policy.attempts:
                raise HubBusyError(f"{what}: HTTP {status} on all {attempt} attempts",
                                   status=status, retry_after_s=asked) from exc
            wait = asked if asked is not None else min(policy.base_wait_s * 2 ** (attempt - 1), policy.max_wait_s)
            log.warning("%s: HTTP %s, retry %d/%d in %.1f s", what, status, attempt, policy.attempts - 1, wait)
            policy.sleep(wait)


class HubDatasetTarget:
    """A private Hugging Face dataset repo; ``api`` is an ``HfApi`` (tests pass a fake of it)."""

    def __init__(self, repo_id: str, api: Any | None = None, *,
                 commit_interval_s: float = DEFAULT_HUB_COMMIT_INTERVAL_S, retry: RetryPolicy | None = None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.repo_id = repo_id
        self.api = api
        self.min_write_interval_s = commit_interval_s
        self.retry = retry or RetryPolicy()
        self._created = False
        self._checked_private = False

    def describe(self) -> str:
        return f"hf-dataset:{self.repo_id}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retry(f"{self.describe()} {what}", fn, self.retry)

    def _ensure_private_repo(self, *, recheck: bool) -> None:
        if not self._created:
            # Created private; exist_ok leaves an existing repo's visibility as it is, hence the check.
            self._call("create_repo", lambda: self.api.create_repo(self.repo_id, repo_type="dataset", private=True,
                                                                   exist_ok=True))
            self._created = True
        if recheck or not self._checked_private:
            info = self._call("repo_info", lambda: self.api.repo_info(self.repo_id, repo_type="dataset"))
            if getattr(info, "private", None) is not True:
                raise PublicRepoError(
                    f"the Hugging Face dataset repo {self.repo_id} is not private; the mirror holds raw, unscrubbed "
                    "chats and uploads nothing to it. Make it private (HfApi().update_repo_settings("
                    f"{self.repo_id!r}, repo_type='dataset', private=True)) or set [app] mirror_hf_repo to another repo"
                )
            self._checked_private = True

    def list_segments(self) -> list[str]:
        self._ensure_private_repo(recheck=False)
        prefix = SEGMENT_DIR + "/"
        files = self._call("list_repo_files", lambda: self.api.list_repo_files(self.repo_id, repo_type="dataset"))
        return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and f.endswith(".jsonl"))

    def read_segment(self, name: str) -> bytes:
        local = self._call(f"download {name}", lambda: self.api.hf_hub_download(
            repo_id=self.repo_id, filename=f"{SEGMENT_DIR}/{name}", repo_type="dataset"))
        return Path(local).read_bytes()

    def write_segments(self, segments: list[tuple[str, bytes]]) -> None:
        """One commit holding every segment; refused unless the repo is private right now."""
        from huggingface_hub import CommitOperationAdd

        self._ensure_private_repo(recheck=True)
        names = [name for name, _ in segments]
        message = f"mirror {len(names)} segment(s): {names[0]}" + (f" .. {names[-1]}" if len(names) > 1 else "")

        def commit() -> Any:
            # Fresh operations on every attempt: create_commit mutates the ones it is given.
            ops = [CommitOperationAdd(path_in_repo=f"{SEGMENT_DIR}/{name}", path_or_fileobj=data)
                   for name, data in segments]
            return self.api.create_commit(self.repo_id, operations=ops, commit_message=message, repo_type="dataset")

        self._call("create_commit", commit)

    def rewrite_segments(self, changes: dict[str, bytes | None]) -> None:
        """One commit replacing (or deleting, for None) segments, then the repo's history squashed
        to that one state: a Hub repo keeps every old commit's files, and a forgotten turn must not
        stay readable at an older revision. Only ``forget`` rewrites a segment."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        if not changes:
            return
        self._ensure_private_repo(recheck=True)

        def commit() -> Any:
            ops = [CommitOperationDelete(path_in_repo=f"{SEGMENT_DIR}/{name}") if data is None else
                   CommitOperationAdd(path_in_repo=f"{SEGMENT_DIR}/{name}", path_or_fileobj=data)
                   for name, data in changes.items()]
            return self.api.create_commit(self.repo_id, operations=ops, repo_type="dataset",
                                          commit_message=f"forget: rewrite {len(ops)} segment(s)")

        self._call("create_commit", commit)
        self._call("super_squash_history", lambda: self.api.super_squash_history(
            repo_id=self.repo_id, repo_type="dataset", commit_message="mirror (history squashed by forget)"))


# -- the mirror ------------------------------------------------------------------------------------


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
    forgotten: int = 0  # rows of forgotten turns (loop.forgotten) left out on purpose

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
        from loop.registry import atomic_write_text

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
        from loop.forgotten import forgotten_ids

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
            row_id = row.get("id") if isinstance(row, dict) else None
            if not isinstance(row_id, str) or not row_id:
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


def target_from_config(config: Any, api: Any | None = None) -> Target | None:
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


def mirror_from_config(config: Any, store: Store, api: Any | None = None) -> Mirror | None:
    target = target_from_config(config, api=api)
    if target is None:
        return None
    return Mirror(store, target, Path(config.home) / "mirror-state.json")
