"""The durable log of every turn and every piece of feedback (SQLite under LOOP_HOME, WAL mode).

Many chat users write at once (Gradio runs handlers on worker threads), so each thread gets its
own connection and every write is one short ``BEGIN IMMEDIATE`` transaction: SQLite serialises
writers, WAL lets readers go on, and ``busy_timeout`` makes a writer wait rather than fail.

The database file is 0600 and its directory 0700 (``loop.paths.private_dir``). The schema is
brought up to date on open by ``loop.migrations``, which is safe against a crash mid-migration
and against several processes opening a fresh home at once.

``python -m loop.store export`` prints every turn with its feedback as JSON lines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ulid import ULID

from loop import paths
from loop.feedback import CleanFeedback, clean_feedback
from loop.migrations import migrate

_JSON_COLUMNS = ("messages", "sampling", "reasons")


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def new_id() -> str:
    """A ULID: sortable by creation time, unique without coordination."""
    return str(ULID())


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for col in _JSON_COLUMNS:
        if col in out and out[col] is not None:
            out[col] = json.loads(out[col])
    return out


class Store:
    """Conversations, turns, feedback events and annotation sync state."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        paths.private_dir(self.path.parent)
        st = self.path.stat() if self.path.exists() else None
        if st is not None and st.st_mode & 0o077 and st.st_uid == os.getuid():
            # The store holds raw, unscrubbed chats. SQLite gives -wal and -shm the database
            # file's mode, so tightening this one file covers all three.
            os.chmod(self.path, 0o600)
        self._local = threading.local()
        db = self._conn()
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)

    @classmethod
    def open(cls, home: Path | None = None) -> "Store":
        return cls(paths.store_path(home))

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: we issue BEGIN ourselves, so writes are IMMEDIATE transactions.
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("PRAGMA foreign_keys=ON")
            # FULL: a feedback event acknowledged to the user survives a power cut, not only a crash.
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def _write(self, sql: str, params: tuple) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- conversations and turns -------------------------------------------------------------

    def new_conversation(self, client: str | None = None) -> str:
        cid = new_id()
        self._write("INSERT INTO conversations (id, created_at, client) VALUES (?, ?, ?)", (cid, utcnow(), client))
        return cid

    def log_turn(
        self,
        *,
        conversation_id: str,
        messages: list[dict[str, str]],
        answer: str,
        position: int | None = None,
        model_version: str | None = None,
        gguf_sha256: str | None = None,
        sampling: dict[str, Any] | None = None,
        latency_s: float | None = None,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        logprob_mean: float | None = None,
        logprob_min: float | None = None,
        turn_id: str | None = None,
        created_at: str | None = None,
    ) -> str:
        """Record one model answer and the exact messages it saw; returns the turn id."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a list of {'role', 'content'} dicts")
        tid = turn_id or new_id()
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                db.execute("INSERT INTO conversations (id, created_at) VALUES (?, ?)", (conversation_id, utcnow()))
            if position is None:
                position = db.execute(
                    "SELECT COALESCE(MAX(position) + 1, 0) FROM turns WHERE conversation_id = ?", (conversation_id,)
                ).fetchone()[0]
            db.execute(
                """INSERT INTO turns (id, conversation_id, position, messages, answer, model_version, gguf_sha256,
                       sampling, latency_s, ttft_s, prompt_tokens, completion_tokens, logprob_mean, logprob_min, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    tid, conversation_id, position, json.dumps(messages, ensure_ascii=False), answer,
                    model_version, gguf_sha256, json.dumps(sampling or {}, sort_keys=True), latency_s, ttft_s,
                    prompt_tokens, completion_tokens, logprob_mean, logprob_min, created_at or utcnow(),
                ),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return tid

    def get_turn(self, turn_id: str) -> dict[str, Any] | None:
        turn = _row(self._conn().execute("SELECT * FROM turns WHERE id = ?", (turn_id,)).fetchone())
        if turn is not None:
            self._attach_feedback([turn])
        return turn

    def iter_turns(self, since_rowid: int = 0, batch: int = 500) -> Iterator[dict[str, Any]]:
        """Every turn, oldest first, each with its latest feedback and its event count."""
        last = since_rowid
        while True:
            rows = self._conn().execute(
                "SELECT rowid AS _rowid, * FROM turns WHERE rowid > ? ORDER BY rowid LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            turns = [_row(r) for r in rows]
            self._attach_feedback(turns)
            for t in turns:
                last = t.pop("_rowid")
                yield t

    def count_turns(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM turns").fetchone()[0]

    def conversation_turns(self, conversation_id: str) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT * FROM turns WHERE conversation_id = ? ORDER BY position", (conversation_id,)
        ).fetchall()
        turns = [_row(r) for r in rows]
        self._attach_feedback(turns)
        return turns

    # -- feedback ----------------------------------------------------------------------------

    def add_feedback(
        self,
        turn_id: str,
        thumbs: str | None = None,
        reasons: list[str] | None = None,
        comment: str | None = None,
        correction: str | None = None,
        source: str = "app",
    ) -> str:
        """Append a feedback event (the latest one counts); raises FeedbackError if malformed."""
        fid, _ = self.add_feedback_checked(turn_id, thumbs, reasons, comment, correction, source)
        return fid

    def add_feedback_checked(
        self,
        turn_id: str,
        thumbs: str | None = None,
        reasons: list[str] | None = None,
        comment: str | None = None,
        correction: str | None = None,
        source: str = "app",
    ) -> tuple[str, CleanFeedback]:
        """Like add_feedback, also returning the cleaned event (its notes say what was cleaned)."""
        clean = clean_feedback(thumbs, reasons, comment, correction)
        fid = new_id()
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM turns WHERE id = ?", (turn_id,)).fetchone() is None:
                raise KeyError(f"no turn with id {turn_id!r}")
            db.execute(
                """INSERT INTO feedback (id, turn_id, thumbs, reasons, comment, correction, source, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (fid, turn_id, clean.thumbs, json.dumps(clean.reasons), clean.comment, clean.correction, source, utcnow()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return fid, clean

    def feedback_events(self, turn_id: str) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM feedback WHERE turn_id = ? ORDER BY rowid", (turn_id,)).fetchall()
        return [_row(r) for r in rows]

    def latest_feedback(self, turn_id: str) -> dict[str, Any] | None:
        return _row(
            self._conn().execute(
                "SELECT * FROM feedback WHERE turn_id = ? ORDER BY rowid DESC LIMIT 1", (turn_id,)
            ).fetchone()
        )

    def count_feedback(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def _attach_feedback(self, turns: list[dict[str, Any]]) -> None:
        if not turns:
            return
        ids = [t["id"] for t in turns]
        marks = ",".join("?" * len(ids))
        # The latest event per turn is the one with the highest rowid (insertion order; ULIDs
        # made in the same millisecond are not guaranteed to sort by insertion).
        rows = self._conn().execute(
            f"""SELECT f.*, c.n AS _count FROM feedback f
                JOIN (SELECT turn_id, MAX(rowid) AS last, COUNT(*) AS n FROM feedback
                      WHERE turn_id IN ({marks}) GROUP BY turn_id) c
                  ON f.rowid = c.last""",
            ids,
        ).fetchall()
        latest = {}
        for r in rows:
            fb = _row(r)
            count = fb.pop("_count")
            latest[fb["turn_id"]] = (fb, count)
        for t in turns:
            fb, count = latest.get(t["id"], (None, 0))
            t["feedback"] = fb
            t["feedback_count"] = count

    # -- sync state (the annotation outbox) --------------------------------------------------

    def sync_state(self, target: str) -> dict[str, dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM sync_state WHERE target = ?", (target,)).fetchall()
        return {r["turn_id"]: {k: r[k] for k in r.keys() if k not in ("target", "turn_id")} for r in rows}

    def sync_mark(
        self,
        target: str,
        turn_id: str,
        *,
        content_hash: str | None,
        status: str,
        error: str | None = None,
        next_attempt_at: str | None = None,
    ) -> None:
        """Record the outcome of sending a turn to ``target``: attempts grow on failure, reset on success."""
        self.sync_mark_many(target, [{"turn_id": turn_id, "content_hash": content_hash, "status": status,
                                      "error": error, "next_attempt_at": next_attempt_at}])

    def sync_mark_many(self, target: str, items: list[dict[str, Any]]) -> None:
        """``sync_mark`` for many turns in ONE transaction (one fsync instead of one per record).

        Each item: ``{"turn_id", "content_hash", "status", "error"?, "next_attempt_at"?}``.
        """
        for item in items:
            if item["status"] not in ("pending", "sent", "failed"):
                raise ValueError(f"status must be pending, sent or failed, got {item['status']!r}")
        now = utcnow()
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                """INSERT INTO sync_state (target, turn_id, content_hash, status, attempts, last_error, next_attempt_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (target, turn_id) DO UPDATE SET
                       content_hash = excluded.content_hash,
                       status = excluded.status,
                       attempts = CASE WHEN excluded.status = 'failed' THEN sync_state.attempts + 1 ELSE 0 END,
                       last_error = excluded.last_error,
                       next_attempt_at = excluded.next_attempt_at,
                       updated_at = excluded.updated_at""",
                [
                    (target, i["turn_id"], i.get("content_hash"), i["status"], 1 if i["status"] == "failed" else 0,
                     i.get("error"), i.get("next_attempt_at"), now)
                    for i in items
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- arena votes ---------------------------------------------------------------------------

    def add_arena_vote(self, prompt: str, version_a: str, version_b: str, answer_a: str, answer_b: str, winner: str) -> str:
        if winner not in ("a", "b", "tie"):
            raise ValueError(f"winner must be 'a', 'b' or 'tie', got {winner!r}")
        vid = new_id()
        self._write(
            """INSERT INTO arena_votes (id, prompt, version_a, version_b, answer_a, answer_b, winner, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            (vid, prompt, version_a, version_b, answer_a, answer_b, winner, utcnow()),
        )
        return vid

    def arena_votes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute("SELECT * FROM arena_votes ORDER BY rowid").fetchall()]

    # -- export --------------------------------------------------------------------------------

    def export_records(self) -> Iterator[dict[str, Any]]:
        """Each turn with its latest feedback and the full list of feedback events."""
        for turn in self.iter_turns():
            turn["feedback_events"] = self.feedback_events(turn["id"])
            yield turn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.store", description="The turn and feedback log.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="print every turn with its feedback as JSON lines")
    sub.add_parser("stats", help="print counts")
    args = parser.parse_args(argv)
    store = Store.open()
    if args.command == "export":
        for record in store.export_records():
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif args.command == "stats":
        print(json.dumps({"turns": store.count_turns(), "feedback_events": store.count_feedback(), "path": str(store.path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
