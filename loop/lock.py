"""One cycle at a time, with a lock a crashed cycle cannot leave held.

``flock`` locks belong to the open file description: when the process holding it dies (kill -9,
OOM, power loss of the container) the kernel releases it, so there is no stale lock to clean up
and no pid-file guessing. The file's content (pid, start time) only tells a waiting user who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from loop.core.errors import LoopError
from loop.core.io import utcnow


class LockHeld(LoopError, RuntimeError):
    """Another cycle is running; the message names it."""


class CycleLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> dict | None:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def acquire(self) -> CycleLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder() or {}
            raise LockHeld(
                f"another cycle is running (pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); "
                "it holds the lock until it ends or dies"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": utcnow("auto")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CycleLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
