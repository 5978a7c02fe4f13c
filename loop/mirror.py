"""A durable, append-only mirror of the store, restored on start.

A Hugging Face Space's disk is wiped on every restart; the seed project lost its users' flags
that way. So the app copies every new row of the store (conversations, turns, feedback events,
arena votes) to a durable target and, on start, imports whatever the target holds.

Append-only: each flush writes ONE new segment file (JSON lines) holding the rows added since
the last flush (a rowid watermark per table); an existing segment is never rewritten. Segment
names are ULIDs, so sorting them by name replays them in the order they were written. Restore is
idempotent (``INSERT OR IGNORE`` by primary key), so replaying a segment twice, or into a store
that already holds some of its rows, changes nothing.

Targets:
  * ``LocalDirTarget``: a directory (default: ``<LOOP_HOME>-mirror``, a sibling of the home so
    wiping the home does not wipe the mirror; on a Space, point it at persistent storage such
    as ``/data``). Files appear whole: write to a temporary name, fsync, rename.
  * ``HubDatasetTarget``: a Hugging Face dataset repo through ``huggingface_hub.HfApi``; one
    commit per segment. The token comes from the usual ``HF_TOKEN`` environment variable.

The watermark lives in ``$LOOP_HOME/mirror-state.json``. When the home is wiped, the watermark
goes with it, the (empty) store is refilled from the target, and every row now in the store is
known to be mirrored, so nothing is written twice. Rows the restore brought in are remembered by
id, so a partial store that is topped up by a restore does not send them back either.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ulid import ULID

from loop import paths
from loop.store import Store

log = logging.getLogger(__name__)

FORMAT = 1
SEGMENT_DIR = "segments"
# Parents before children, so that a segment replays without breaking a foreign key.
TABLES: tuple[str, ...] = ("conversations", "turns", "feedback", "arena_votes")


class MirrorError(RuntimeError):
    pass


class Target(Protocol):
    """Where segments are kept. ``write_segment`` must never replace an existing segment."""

    def describe(self) -> str: ...

    def list_segments(self) -> list[str]: ...

    def read_segment(self, name: str) -> bytes: ...

    def write_segment(self, name: str, data: bytes) -> None: ...


class LocalDirTarget:
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

    def write_segment(self, name: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
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


class HubDatasetTarget:
    """A Hugging Face dataset repo; ``api`` is an ``HfApi`` (or a stand-in with the same methods)."""

    def __init__(self, repo_id: str, api: Any | None = None, *, private: bool = True):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.repo_id = repo_id
        self.api = api
        self.private = private
        self._created = False

    def describe(self) -> str:
        return f"hf-dataset:{self.repo_id}"

    def _ensure_repo(self) -> None:
        if not self._created:
            self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
            self._created = True

    def list_segments(self) -> list[str]:
        self._ensure_repo()
        prefix = SEGMENT_DIR + "/"
        files = self.api.list_repo_files(self.repo_id, repo_type="dataset")
        return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and f.endswith(".jsonl"))

    def read_segment(self, name: str) -> bytes:
        local = self.api.hf_hub_download(repo_id=self.repo_id, filename=f"{SEGMENT_DIR}/{name}", repo_type="dataset")
        return Path(local).read_bytes()

    def write_segment(self, name: str, data: bytes) -> None:
        self._ensure_repo()
        self.api.upload_file(
            path_or_fileobj=io.BytesIO(data),
            path_in_repo=f"{SEGMENT_DIR}/{name}",
            repo_id=self.repo_id,
            repo_type="dataset",
            commit_message=f"mirror segment {name}",
        )


@dataclass
class FlushResult:
    segment: str | None
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class RestoreResult:
    segments: int = 0
    seen: dict[str, int] = field(default_factory=dict)  # rows read from the target
    imported: dict[str, int] = field(default_factory=dict)  # rows that were new to the store
    skipped_lines: int = 0  # unreadable lines (a torn write elsewhere): reported, not fatal


def _columns(db, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


class Mirror:
    """Flushes new store rows to ``target`` as segments; restores the store from them."""

    def __init__(self, store: Store, target: Target, state_path: str | Path | None = None):
        self.store = store
        self.target = target
        self.state_path = Path(state_path) if state_path else paths.loop_home() / "mirror-state.json"
        self._lock = threading.Lock()  # one flush at a time: the watermark moves under it
        self._mirrored_ids: dict[str, set[str]] = {t: set() for t in TABLES}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: str | None = None

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
        """Import every segment into the store (idempotent); call before serving."""
        result = RestoreResult(seen={t: 0 for t in TABLES}, imported={t: 0 for t in TABLES})
        db = self.store._conn()
        cols = {t: _columns(db, t) for t in TABLES}
        had_state = self.state_path.is_file()
        with self._lock:
            for name in self.target.list_segments():
                rows_by_table: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
                for line in self.target.read_segment(name).decode("utf-8").splitlines():
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        result.skipped_lines += 1
                        continue
                    table = rec.get("table")
                    if table in rows_by_table and isinstance(rec.get("row"), dict):
                        rows_by_table[table].append(rec["row"])
                db.execute("BEGIN IMMEDIATE")
                try:
                    for table in TABLES:
                        for row in rows_by_table[table]:
                            names = [c for c in cols[table] if c in row]
                            cur = db.execute(
                                f"INSERT OR IGNORE INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                                [row[c] for c in names],
                            )
                            result.seen[table] += 1
                            result.imported[table] += cur.rowcount
                            self._mirrored_ids[table].add(row["id"])
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                result.segments += 1
            if not had_state:
                # No watermark (a fresh or wiped home): rows restored are mirrored already; rows
                # the store held before are found by id on the first flush.
                self._save_state({t: 0 for t in TABLES})
        log.info("mirror restore from %s: %s", self.target.describe(), result)
        return result

    # -- flush -----------------------------------------------------------------------------------

    def flush(self) -> FlushResult:
        """Write the rows added since the last flush as one new segment (none if nothing is new)."""
        with self._lock:
            rowids = self._load_state()
            db = self.store._conn()
            lines: list[str] = []
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
                        lines.append(json.dumps({"table": table, "row": row}, ensure_ascii=False, sort_keys=True))
                        n += 1
                    counts[table] = n
            finally:
                db.execute("COMMIT")
            if not lines:
                if new_rowids != rowids:
                    self._save_state(new_rowids)
                return FlushResult(None, counts)
            name = f"{ULID()}.jsonl"
            header = json.dumps({"table": "_segment", "row": {"format": FORMAT, "counts": counts}}, sort_keys=True)
            self.target.write_segment(name, ("\n".join([header, *lines]) + "\n").encode("utf-8"))
            # The watermark moves only after the segment is durable: a crash in between writes
            # the same rows again next time, which restore ignores, rather than losing them.
            self._save_state(new_rowids)
            for table in TABLES:
                self._mirrored_ids[table].clear()  # below the watermark now; no need to remember
            return FlushResult(name, counts)

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

    def _safe_flush(self) -> FlushResult | None:
        try:
            result = self.flush()
            self.last_error = None
            return result
        except Exception as exc:  # the chat must keep working while the mirror is unreachable
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("mirror flush to %s failed (will retry): %s", self.target.describe(), self.last_error)
            return None

    def stop(self) -> FlushResult | None:
        """Stop the background thread and flush one last time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        return self._safe_flush()


def target_from_config(config: Any, api: Any | None = None) -> Target | None:
    """The target that ``[app] mirror_dir`` / ``mirror_hf_repo`` describe, or None when off."""
    app = config.app
    if app.mirror_hf_repo:
        return HubDatasetTarget(app.mirror_hf_repo, api=api)
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
