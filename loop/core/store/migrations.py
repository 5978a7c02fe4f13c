"""Numbered, append-only schema migrations for the store (simonw/llm's migrations.py is the model).

Never edit a migration that has shipped: add a new one. ``tests/loop/test_loop_migrations.py``
checks the exact columns so an accidental edit shows up as a failing test, not as a user's
corrupted database.

Contract: each migration runs once, in its own ``BEGIN IMMEDIATE`` ... ``COMMIT`` together with
its ``_migrations`` row (SQLite DDL is transactional). A process killed inside a migration leaves
the database as it was before that migration, and the next open applies it again. Two processes
opening a fresh database at once are serialised by the write lock that ``BEGIN IMMEDIATE`` takes:
the second re-reads ``_migrations`` under that lock and skips what the first applied.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from loop.core.io import utcnow

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append(fn)
    return fn


def migrate(db: sqlite3.Connection) -> list[str]:
    """Apply every migration not yet applied; return the names applied now.

    ``db`` must have no transaction open. Its ``isolation_level`` is restored on return.
    """
    if db.in_transaction:
        raise RuntimeError("migrate() needs a connection without an open transaction")
    saved = db.isolation_level
    # None: the sqlite3 module must neither open transactions of its own nor commit ours early.
    db.isolation_level = None
    try:
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
        applied = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue  # the common case takes no write lock
            db.execute("BEGIN IMMEDIATE")
            try:
                # Read under the write lock: another process may have applied it since we looked.
                if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone() is None:
                    fn(db)
                    db.execute(
                        "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                        (fn.__name__, utcnow("auto")),
                    )
                    applied.append(fn.__name__)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return applied
    finally:
        db.isolation_level = saved


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            client TEXT
        )"""
    )
    db.execute(
        """
        CREATE TABLE turns (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            position INTEGER NOT NULL,
            messages TEXT NOT NULL,
            answer TEXT NOT NULL,
            model_version TEXT,
            gguf_sha256 TEXT,
            sampling TEXT NOT NULL,
            latency_s REAL,
            ttft_s REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            logprob_mean REAL,
            logprob_min REAL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_turns_conversation ON turns (conversation_id, position)")
    db.execute("CREATE INDEX idx_turns_created ON turns (created_at)")
    db.execute(
        """
        CREATE TABLE feedback (
            id TEXT PRIMARY KEY,
            turn_id TEXT NOT NULL REFERENCES turns(id),
            thumbs TEXT CHECK (thumbs IN ('up', 'down') OR thumbs IS NULL),
            reasons TEXT NOT NULL,
            comment TEXT,
            correction TEXT,
            source TEXT NOT NULL,
            created_at TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_feedback_turn ON feedback (turn_id)")
    db.execute(
        """
        CREATE TABLE sync_state (
            target TEXT NOT NULL,
            turn_id TEXT NOT NULL REFERENCES turns(id),
            content_hash TEXT,
            status TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            next_attempt_at TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (target, turn_id)
        )"""
    )


@migration
def m002_arena_votes(db: sqlite3.Connection) -> None:
    # Blind-arena votes between two promoted versions (the Versions tab).
    db.execute(
        """
        CREATE TABLE arena_votes (
            id TEXT PRIMARY KEY,
            prompt TEXT NOT NULL,
            version_a TEXT NOT NULL,
            version_b TEXT NOT NULL,
            answer_a TEXT NOT NULL,
            answer_b TEXT NOT NULL,
            winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
            created_at TEXT NOT NULL
        )"""
    )
