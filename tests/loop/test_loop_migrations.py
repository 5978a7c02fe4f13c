"""The store's schema is exactly what the migrations say: an edit to a shipped migration fails here."""

import sqlite3

from loop.migrations import MIGRATIONS, migrate
from loop.store import Store

EXPECTED = {
    "conversations": ["id", "created_at", "client"],
    "turns": [
        "id", "conversation_id", "position", "messages", "answer", "model_version", "gguf_sha256", "sampling",
        "latency_s", "ttft_s", "prompt_tokens", "completion_tokens", "logprob_mean", "logprob_min", "created_at",
    ],
    "feedback": ["id", "turn_id", "thumbs", "reasons", "comment", "correction", "source", "created_at"],
    "sync_state": ["target", "turn_id", "content_hash", "status", "attempts", "last_error", "next_attempt_at", "updated_at"],
    "arena_votes": ["id", "prompt", "version_a", "version_b", "answer_a", "answer_b", "winner", "created_at"],
    "_migrations": ["name", "applied_at"],
}


def columns(db, table):
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def test_exact_schema(tmp_path):
    db = sqlite3.connect(tmp_path / "s.db")
    applied = migrate(db)
    assert applied == [m.__name__ for m in MIGRATIONS]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == set(EXPECTED)
    for table, cols in EXPECTED.items():
        assert columns(db, table) == cols, table


def test_migrations_run_once_and_are_numbered(tmp_path):
    db = sqlite3.connect(tmp_path / "s.db")
    migrate(db)
    assert migrate(db) == []
    names = [m.__name__ for m in MIGRATIONS]
    assert names == sorted(names)
    assert all(n.startswith(f"m{i + 1:03d}_") for i, n in enumerate(names))


def test_store_uses_wal(tmp_path):
    store = Store(tmp_path / "store.db")
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
