"""Small I/O helpers every layer shares: times, ids, hashes, crash-safe writes and JSON lines.

One of each, so that two parts of the loop never disagree on how a time is written or when a
write counts as done.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from ulid import ULID


def utcnow(timespec: str = "seconds") -> str:
    """The current UTC time in ISO 8601. The store writes ``microseconds`` (turns made in the same
    second must still sort by time); the registry and reports write ``seconds``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec=timespec)


def new_id() -> str:
    """A ULID: sortable by creation time, unique without coordination."""
    return str(ULID())


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks (GGUFs are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a directory by path (a directory: so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file, whole."""
    # pid + thread: the app writes from Gradio worker threads, which must not share a temp file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_jsonl(path: str | os.PathLike[str], *, missing_ok: bool = False,
               skip_torn: bool = False) -> list[dict[str, Any]]:
    """Every JSON object of a JSON-lines file, blank lines skipped. A file that is not there raises
    FileNotFoundError, or gives ``[]`` with ``missing_ok``. With ``skip_torn``, a line that is not JSON
    is skipped instead of raising: an append-only log's torn last line from a crash mid-append.

    Lines are split by the file's line endings only, never at U+2028 and the like (``str.splitlines``
    would cut a record whose text holds one: ``json.dumps(..., ensure_ascii=False)`` writes them raw).
    """
    if missing_ok and not Path(path).is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_torn:
                    raise
    return out
