"""Where state lives.

Every piece of state is under ``LOOP_HOME`` (default ``./.loop``), the way simonw/llm keeps
everything under ``LLM_USER_PATH``: tests point it at a temp dir and nothing leaks between runs.
Setup-time tools (the Argilla server's own virtualenv, the GGUF converter) are under
``LOOP_TOOLS`` (default ``$LOOP_HOME/tools``) so that many homes can share one installation.

Privacy contract: the home holds raw chats, training data and service credentials, so it is
private to its owner. ``private_dir`` is the one place that enforces this: it adds 0o077 to the
process umask (every file and directory the process creates afterwards has no group or other
bits: files 0600, directories 0700, SQLite's -wal/-shm included) and creates the directory 0700.
``loop_home()`` goes through it, and so do ``Store`` and ``Registry`` for the directories they are
given, so every entry point (app, cycle, CLIs, scheduler) is covered. A home that already exists
with group or other bits is tightened to 0700 when this user owns it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_dir(path: str | os.PathLike, *, tighten: bool = False) -> Path:
    """Create ``path`` (and missing parents) 0700 after making the process umask private.

    ``tighten``: also chmod an existing directory to 0700 when this user owns it (for the home;
    not for arbitrary parents a caller names, which may be shared on purpose).
    """
    old = os.umask(PRIVATE_UMASK)
    os.umask(old | PRIVATE_UMASK)  # keep whatever the user's umask already masked
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if tighten:
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.getuid():
            os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
    return path


def loop_home() -> Path:
    """The directory holding all state; created private (0700) on first use, see the module doc."""
    return private_dir(Path(os.environ.get("LOOP_HOME") or ".loop").expanduser().resolve(), tighten=True)


def tools_dir() -> Path:
    """The directory holding setup-time tools (not created here: setup fills it)."""
    explicit = os.environ.get("LOOP_TOOLS")
    if explicit:
        return Path(explicit).expanduser().resolve()
    return loop_home() / "tools"


def store_path(home: Path | None = None) -> Path:
    return (home or loop_home()) / "store.db"


def registry_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "registry"


def models_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "models"


def snapshots_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "snapshots"


def runs_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "runs"


def reports_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "reports"
