"""The durable log of every turn and every piece of feedback (SQLite under LOOP_HOME, WAL mode).

Many chat users write at once (Gradio runs handlers on worker threads), so each thread gets its
own connection and every write is one short ``BEGIN IMMEDIATE`` transaction: SQLite serialises
writers, WAL lets readers go on, and ``busy_timeout`` makes a writer wait rather than fail.

The database file is 0600 and its directory 0700 (``loop.core.paths.private_dir``). The schema is
brought up to date on open by ``loop.core.store.migrations``, which is safe against a crash mid-migration
and against several processes opening a fresh home at once.

Batched writes (the app's group-commit writer, replays) go through :meth:`Store.insert`: rows
(``NewConversation``, ``NewTurn``, ``NewFeedback``) in one transaction, with the same SQL and the
same rules as ``log_turn`` and ``add_feedback``.

Forgetting (``python -m loop.store forget``, ``loop.forget``) deletes turns from the store and from
everywhere else they went; the store's part is ``forget_scope``, ``delete_turns`` and ``vacuum``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.feedback import CleanFeedback
from loop.core.io import new_id, utcnow
from loop.core.store.migrations import migrate
from loop.core.store.rows import _INSERTERS, NewFeedback, NewRow, NewTurn, _insert_feedback, _insert_turn, _row


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
    def open(cls, home: Path | None = None) -> Store:
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

    def _transaction(self, work) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT may already have rolled back
                db.execute("ROLLBACK")
            raise

    def insert(self, rows: Sequence[NewRow], *, if_exists: str = "error") -> list[KeyError | None]:
        """Insert conversations, turns and feedback events in order, in ONE transaction (one fsync).

        Returns one entry per row: None when it was inserted, or the ``KeyError`` of a feedback
        event whose turn does not exist; that event alone is undone (a SAVEPOINT) and the rest
        commit. Anything else (disk full, I/O error, a constraint on a turn) rolls the whole
        transaction back and is raised: nothing of ``rows`` is then committed.

        ``if_exists="ignore"`` skips rows whose id is already stored, so replaying rows that may
        have been committed already is idempotent.
        """
        if if_exists not in ("error", "ignore"):
            raise ValueError(f"if_exists must be 'error' or 'ignore', got {if_exists!r}")
        or_ignore = if_exists == "ignore"
        results: list[KeyError | None] = []

        def work(db: sqlite3.Connection) -> None:
            for i, row in enumerate(rows):
                insert = _INSERTERS.get(type(row))
                if insert is None:
                    raise TypeError(f"cannot insert a {type(row).__name__}")
                if not isinstance(row, NewFeedback):
                    insert(db, row, or_ignore)
                    results.append(None)
                    continue
                db.execute(f"SAVEPOINT row{i}")
                try:
                    insert(db, row, or_ignore)
                except KeyError as exc:  # an unknown turn: this event alone is refused
                    db.execute(f"ROLLBACK TO row{i}")
                    results.append(exc)
                else:
                    results.append(None)
                db.execute(f"RELEASE row{i}")

        self._transaction(work)
        return results

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- conversations and turns -------------------------------------------------------------

    def new_conversation(self, client: str | None = None) -> str:
        cid = new_id()
        self._write("INSERT INTO conversations (id, created_at, client) VALUES (?, ?, ?)", (cid, utcnow("microseconds"), client))
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
        row = NewTurn(
            id=turn_id or new_id(), conversation_id=conversation_id, messages=messages, answer=answer,
            created_at=created_at or utcnow("microseconds"), position=position, model_version=model_version,
            gguf_sha256=gguf_sha256, sampling=sampling or {}, latency_s=latency_s, ttft_s=ttft_s,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, logprob_mean=logprob_mean,
            logprob_min=logprob_min,
        )
        self._transaction(lambda db: _insert_turn(db, row, False))
        return row.id

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
        row, clean = NewFeedback.clean(turn_id, thumbs, reasons, comment, correction, source)
        self._transaction(lambda db: _insert_feedback(db, row, False))
        return row.id, clean

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
        now = utcnow("microseconds")
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                """INSERT INTO sync_state (target, turn_id, content_hash, status, attempts, last_error, next_attempt_at,
                                          updated_at)
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
            (vid, prompt, version_a, version_b, answer_a, answer_b, winner, utcnow("microseconds")),
        )
        return vid

    def arena_votes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute("SELECT * FROM arena_votes ORDER BY rowid").fetchall()]

    # -- forgetting (loop/forget.py) ------------------------------------------------------------

    def forget_scope(self, turn_ids: Sequence[str] = (), conversation_ids: Sequence[str] = (),
                     clients: Sequence[str] = ()) -> dict[str, Any]:
        """What forgetting these ids takes, read in one transaction; changes nothing.

        Returns ``{"turns": [...], "conversations": [...], "later_turns": [...], "unknown": [...]}``.
        A turn's text is part of the ``messages`` of every later turn of its conversation (the model
        saw the whole conversation), so each named turn brings those later turns with it
        (``later_turns``). A conversation brings all its turns; a client all its conversations.
        ``unknown`` lists the ids (as given) the store does not hold.
        """
        db = self._conn()
        turns: set[str] = set()
        convs: set[str] = set()
        unknown: list[str] = []
        db.execute("BEGIN")
        try:
            for client in clients:
                rows = db.execute("SELECT id FROM conversations WHERE client = ?", (client,)).fetchall()
                if not rows:
                    unknown.append(f"client:{client}")
                convs |= {r[0] for r in rows}
            for cid in conversation_ids:
                if db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is None:
                    unknown.append(f"conversation:{cid}")
                else:
                    convs.add(cid)
            for cid in convs:
                turns |= {r[0] for r in db.execute("SELECT id FROM turns WHERE conversation_id = ?", (cid,))}
            later: set[str] = set()
            turns_given = list(dict.fromkeys(turn_ids))
            for tid in turns_given:
                row = db.execute("SELECT conversation_id, position FROM turns WHERE id = ?", (tid,)).fetchone()
                if row is None:
                    unknown.append(tid)
                    continue
                turns.add(tid)
                later |= {r[0] for r in db.execute(
                    "SELECT id FROM turns WHERE conversation_id = ? AND position > ?", (row[0], row[1]))}
        finally:
            db.execute("COMMIT")
        later -= turns
        later -= set(turns_given)
        return {"turns": sorted(turns | later), "conversations": sorted(convs), "later_turns": sorted(later),
                "unknown": unknown}

    def forget_texts(self, turn_ids: Sequence[str]) -> list[str]:
        """The texts these turns added: their answers, the messages no earlier turn of the conversation
        had already, and their feedback's comments and corrections (``loop.forget`` scans for them)."""
        db = self._conn()
        out: list[str] = []
        for tid in turn_ids:
            turn = self.get_turn(tid)
            if turn is None:
                continue
            prev = db.execute("SELECT messages FROM turns WHERE conversation_id = ? AND position < ? "
                              "ORDER BY position DESC LIMIT 1", (turn["conversation_id"], turn["position"])).fetchone()
            seen = {m.get("content") for m in json.loads(prev[0])} if prev else set()
            out += [m["content"] for m in turn["messages"] if m.get("content") and m["content"] not in seen]
            out.append(turn["answer"])
            for fb in self.feedback_events(tid):
                out += [t for t in (fb.get("comment"), fb.get("correction")) if t]
        return [t for t in dict.fromkeys(out) if t]

    def delete_turns(self, turn_ids: Sequence[str], conversation_ids: Sequence[str] = ()) -> dict[str, int]:
        """Delete turns with their feedback and outbox rows, and the conversations named or left empty,
        in one transaction. ``secure_delete`` overwrites the freed content; ``vacuum`` then rebuilds
        the file so no page of it is left anywhere."""
        counts = {"turns": 0, "feedback": 0, "sync_state": 0, "conversations": 0}
        ids = list(dict.fromkeys(turn_ids))

        def work(db: sqlite3.Connection) -> None:
            touched: set[str] = set(conversation_ids)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                touched |= {r[0] for r in db.execute(f"SELECT conversation_id FROM turns WHERE id IN ({marks})", chunk)}
                counts["feedback"] += db.execute(f"DELETE FROM feedback WHERE turn_id IN ({marks})", chunk).rowcount
                counts["sync_state"] += db.execute(f"DELETE FROM sync_state WHERE turn_id IN ({marks})", chunk).rowcount
                counts["turns"] += db.execute(f"DELETE FROM turns WHERE id IN ({marks})", chunk).rowcount
            for cid in touched:
                if db.execute("SELECT 1 FROM turns WHERE conversation_id = ? LIMIT 1", (cid,)).fetchone() is None:
                    counts["conversations"] += db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount

        self._conn().execute("PRAGMA secure_delete=ON")  # a pragma cannot change inside a transaction
        self._transaction(work)
        return counts

    def vacuum(self) -> dict[str, Any]:
        """Rebuild the database file (VACUUM) and fold the WAL into it, truncating the WAL to zero bytes.

        ``checkpoint_busy`` is true when another connection's open read kept the WAL from being
        truncated (the app mid-request); run it again when it is."""
        db = self._conn()
        db.execute("VACUUM")
        busy, log_frames, done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        wal = self.path.with_name(self.path.name + "-wal")
        return {"checkpoint_busy": bool(busy), "wal_bytes": wal.stat().st_size if wal.exists() else 0}

    def max_rowids(self) -> dict[str, int]:
        """The highest rowid of each mirrored table (0 when empty): the mirror's watermarks never exceed it."""
        db = self._conn()
        return {t: db.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {t}").fetchone()[0]
                for t in ("conversations", "turns", "feedback", "arena_votes")}

    # -- export --------------------------------------------------------------------------------

    def export_records(self) -> Iterator[dict[str, Any]]:
        """Each turn with its latest feedback and the full list of feedback events."""
        for turn in self.iter_turns():
            turn["feedback_events"] = self.feedback_events(turn["id"])
            yield turn
