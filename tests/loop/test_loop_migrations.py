"""The store's schema is exactly what the migrations say: an edit to a shipped migration fails here.

Migrations are also crash- and race-safe through ``Store``: real child processes are SIGKILLed at
chosen statements inside a migration (the child wraps the migration's connection so the kill lands
exactly there), and several processes open one fresh store at once.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loop.core.store import Store
from loop.core.store.migrations import MIGRATIONS, migrate

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
REPO = Path(__file__).resolve().parents[2]


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


# -- crash and concurrency safety, through Store, with real processes ------------------------------

# A child process that opens a Store at argv[1]. With argv[2] = "name:n", the migration `name` runs
# through a connection proxy that, after its n-th statement, creates argv[3] (so the parent knows the
# child is inside the migration) and then sleeps argv[4] seconds: long enough to be SIGKILLed there,
# or short enough that a second process arrives while the first is mid-migration.
CHILD = textwrap.dedent(
    """
    import functools, pathlib, sys, time
    from loop.core.store import migrations
    from loop.core.store import Store

    path, point, flag, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if point:
        name, after = point.split(":")

        class Pausing:
            def __init__(self, db):
                self.db, self.n = db, 0

            def execute(self, *args):
                out = self.db.execute(*args)
                self.n += 1
                if self.n == int(after):
                    pathlib.Path(flag).touch()
                    time.sleep(pause)
                return out

        def hooked(fn):
            @functools.wraps(fn)
            def run(db):
                return fn(Pausing(db))
            return run

        migrations.MIGRATIONS[:] = [hooked(m) if m.__name__ == name else m for m in migrations.MIGRATIONS]
    Store(path).close()
    """
)


def start_child(db_path: Path, point: str = "", flag: Path | None = None, pause: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(db_path), point, str(flag or ""), str(pause)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited before the pause point: {proc.communicate()}")
        assert time.monotonic() < deadline, "child never reached the pause point"
        time.sleep(0.01)


def assert_complete_schema(db_path: Path) -> None:
    db = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == set(EXPECTED)
        for table, cols in EXPECTED.items():
            assert columns(db, table) == cols, table
        rows = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY name")]
        assert rows == [m.__name__ for m in MIGRATIONS], "each migration recorded exactly once"
    finally:
        db.close()


@pytest.mark.parametrize("point", [
    "m001_initial:1",  # after the first CREATE TABLE
    "m001_initial:7",  # after every statement of m001, before its _migrations row
    "m002_arena_votes:1",  # m001 committed, m002's table created
])
def test_a_kill_inside_a_migration_leaves_a_store_that_the_next_open_completes(tmp_path, point):
    db_path, flag = tmp_path / "home" / "store.db", tmp_path / "inside"
    proc = start_child(db_path, point, flag, pause=120)
    try:
        wait_for(flag, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    store = Store(db_path)  # the next open applies what the killed process left unfinished
    cid = store.new_conversation()
    store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": "hi"}], answer="hello")
    assert store.count_turns() == 1
    store.close()
    assert_complete_schema(db_path)


def test_a_process_opening_a_fresh_store_while_another_is_mid_migration_waits_and_succeeds(tmp_path):
    db_path, flag = tmp_path / "home" / "store.db", tmp_path / "inside"
    first = start_child(db_path, "m001_initial:3", flag, pause=1.5)  # the app, say, still creating tables
    wait_for(flag, first)
    second = start_child(db_path)  # a cycle opening the same fresh home meanwhile
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert_complete_schema(db_path)
    Store(db_path).close()


def test_many_processes_opening_one_fresh_store_at_once_all_succeed(tmp_path):
    db_path = tmp_path / "home" / "store.db"
    procs = [start_child(db_path) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert_complete_schema(db_path)
