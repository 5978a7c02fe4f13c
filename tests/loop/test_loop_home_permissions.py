"""$LOOP_HOME is private: the home and every directory in it 0700, every file 0600.

The home holds raw chats (store.db and its -wal/-shm), training data (cycles/*/train.jsonl,
snapshots) and credentials. The operations run in a child process started with the common umask
022, as a user's shell starts the app, so the test proves the project's own umask, not pytest's.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

OPERATIONS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from annotation.snapshot import write_snapshot
    from loop.core import paths
    from loop.config import load_config
    from loop.core.registry import Registry
    from loop.core.store import Store

    config = load_config()  # the way the app, the cycle and the CLIs find their home
    store = Store.open(config.home)
    cid = store.new_conversation()
    tid = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": "my card is 4111"}], answer="ok")
    store.add_feedback(tid, thumbs="down", comment="private")

    gguf = Path(sys.argv[1])
    registry = Registry(paths.registry_dir(config.home))
    vid = registry.register(gguf, base_model="tiny", verification={"passed": True}).id
    registry.promote(vid, reason="test")
    registry.prune(0)

    examples = [{"id": f"e{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]} for i in range(10)]
    write_snapshot(examples, {}, eval_percent=20, home=config.home)

    cycle = config.home / "cycles" / "c1"
    cycle.mkdir(parents=True)
    (cycle / "train.jsonl").write_text(json.dumps(examples[0]) + "\\n")
    reports = paths.reports_dir(config.home)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "c1.md").write_text("# report\\n")
    # While the store is open, so that SQLite's -wal and -shm files exist.
    print(json.dumps({p.relative_to(config.home).as_posix(): os.lstat(p).st_mode & 0o777
                      for p in [config.home, *config.home.rglob("*")]}))
    store.close()
    """
)


def run_operations(home: Path, gguf: Path) -> dict[str, int]:
    """Run OPERATIONS in a child with umask 022; returns the modes it saw under the home, store open."""
    env = dict(os.environ, LOOP_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", OPERATIONS, str(gguf)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def open_to_others(home: Path) -> list[str]:
    found = []
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path.relative_to(home.parent)} {oct(mode)}")
    return found


def test_a_fresh_home_and_everything_written_in_it_is_private_to_its_owner(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    os.chmod(gguf, 0o644)  # linked or copied into the registry: the copy must still be private
    home = tmp_path / "new" / "home"
    seen = run_operations(home, gguf)
    assert {"store.db-wal", "store.db-shm"} <= set(seen)
    assert {path: oct(mode) for path, mode in seen.items() if mode & 0o077} == {}

    written = {p.relative_to(home).as_posix() for p in home.rglob("*")}
    assert {"store.db", "registry/current.json", "registry/history.jsonl", "registry/versions/v1/model.gguf",
            "cycles/c1/train.jsonl", "reports/c1.md"} <= written
    assert any(p.startswith("snapshots/") and p.endswith(".jsonl") for p in written)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert open_to_others(home) == []


def test_an_existing_home_made_with_the_default_umask_is_tightened(tmp_path, loop_home):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    home = tmp_path / "old-home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    db = home / "store.db"
    db.touch()
    os.chmod(db, 0o644)  # a store made before the home was private
    seen = run_operations(home, gguf)
    assert {path: oct(mode) for path, mode in seen.items() if mode & 0o077} == {}
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert open_to_others(home) == []
