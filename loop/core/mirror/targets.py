"""Where the mirror keeps its segments: a local directory or a private Hugging Face dataset repo, and how
Hub calls are retried (``loop.core.mirror`` states the contract)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from loop.core import paths
from loop.core.errors import LoopError
from loop.core.io import fsync_path

log = logging.getLogger(__name__)

SEGMENT_DIR = "segments"
# Five minutes: 12 commits an hour, a tenth of the Hub's 128 per repo and hour.
DEFAULT_HUB_COMMIT_INTERVAL_S = 300.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class MirrorError(LoopError, RuntimeError):
    """The mirror's target refused or failed a read or a write."""


class PublicRepoError(MirrorError):
    """The Hub repo is not private; the mirror holds raw chats and uploads nothing to it."""


class HubBusyError(MirrorError):
    """The Hub kept answering 429/5xx; ``retry_after_s`` is how long it asked us to wait, if it said."""

    def __init__(self, message: str, *, status: int | None, retry_after_s: float | None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class Target(Protocol):
    """Where segments are kept. Writing must never replace an existing segment; only ``rewrite_segments``
    (``Mirror.forget``) replaces or deletes one."""

    # The least time between two writes (0: write on every flush).
    min_write_interval_s: float

    def describe(self) -> str: ...

    def list_segments(self) -> list[str]: ...

    def read_segment(self, name: str) -> bytes: ...

    def write_segments(self, segments: list[tuple[str, bytes]]) -> None: ...

    def rewrite_segments(self, changes: dict[str, bytes | None]) -> None: ...


class LocalDirTarget:
    min_write_interval_s = 0.0

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

    def write_segments(self, segments: list[tuple[str, bytes]]) -> None:
        for name, data in segments:
            self.write_segment(name, data)

    def rewrite_segments(self, changes: dict[str, bytes | None]) -> None:
        """Replace segments' bytes (None: delete the segment). Only ``forget`` rewrites a segment."""
        for name, data in changes.items():
            final = self.dir / name
            if data is None:
                final.unlink(missing_ok=True)
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        if changes and self.dir.is_dir():
            fsync_path(self.dir)

    def write_segment(self, name: str, data: bytes) -> None:
        # The segments hold raw chats: the folder is the owner's alone, like the home.
        paths.private_dir(self.dir)
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
        fsync_path(self.dir)


# -- talking to the Hub ----------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """How Hub calls are retried on 429 and 5xx answers."""

    attempts: int = 5
    base_wait_s: float = 1.0  # doubled per attempt when the Hub names no wait
    max_wait_s: float = 60.0  # a longer requested wait is not slept through (HubBusyError)
    sleep: Callable[[float], None] = time.sleep


def _http_status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def retry_after_s(exc: BaseException) -> float | None:
    """The wait an HTTP error asks for: ``Retry-After`` (seconds or a date), else the Hub's
    ``RateLimit`` header when no requests remain; None when it asks for none."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    if value:
        value = str(value).strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
    try:
        from huggingface_hub.utils import parse_ratelimit_headers
    except ImportError:
        return None
    info = parse_ratelimit_headers(headers)
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    return None


def call_with_retry(what: str, fn: Callable[[], T], policy: RetryPolicy) -> T:
    """``fn()``, retried on HTTP 429/5xx with backoff that honours the server's requested wait."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            status = _http_status(exc)
            if status not in RETRY_STATUSES:
                raise
            asked = retry_after_s(exc)
            if asked is not None and asked > policy.max_wait_s:
                raise HubBusyError(f"{what}: HTTP {status}, the Hub asks to wait {asked:.0f} s",
                                   status=status, retry_after_s=asked) from exc
            if attempt >= policy.attempts:
                raise HubBusyError(f"{what}: HTTP {status} on all {attempt} attempts",
                                   status=status, retry_after_s=asked) from exc
            wait = asked if asked is not None else min(policy.base_wait_s * 2 ** (attempt - 1), policy.max_wait_s)
            log.warning("%s: HTTP %s, retry %d/%d in %.1f s", what, status, attempt, policy.attempts - 1, wait)
            policy.sleep(wait)


class HubDatasetTarget:
    """A private Hugging Face dataset repo; ``api`` is an ``HfApi`` (tests pass a fake of it)."""

    def __init__(self, repo_id: str, api: Any | None = None, *,
                 commit_interval_s: float = DEFAULT_HUB_COMMIT_INTERVAL_S, retry: RetryPolicy | None = None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self.repo_id = repo_id
        self.api = api
        self.min_write_interval_s = commit_interval_s
        self.retry = retry or RetryPolicy()
        self._created = False
        self._checked_private = False

    def describe(self) -> str:
        return f"hf-dataset:{self.repo_id}"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_retry(f"{self.describe()} {what}", fn, self.retry)

    def _ensure_private_repo(self, *, recheck: bool) -> None:
        if not self._created:
            # Created private; exist_ok leaves an existing repo's visibility as it is, hence the check.
            self._call("create_repo", lambda: self.api.create_repo(self.repo_id, repo_type="dataset", private=True,
                                                                   exist_ok=True))
            self._created = True
        if recheck or not self._checked_private:
            info = self._call("repo_info", lambda: self.api.repo_info(self.repo_id, repo_type="dataset"))
            if getattr(info, "private", None) is not True:
                raise PublicRepoError(
                    f"the Hugging Face dataset repo {self.repo_id} is not private; the mirror holds raw, unscrubbed "
                    "chats and uploads nothing to it. Make it private (HfApi().update_repo_settings("
                    f"{self.repo_id!r}, repo_type='dataset', private=True)) or set [app] mirror_hf_repo to another repo"
                )
            self._checked_private = True

    def list_segments(self) -> list[str]:
        self._ensure_private_repo(recheck=False)
        prefix = SEGMENT_DIR + "/"
        files = self._call("list_repo_files", lambda: self.api.list_repo_files(self.repo_id, repo_type="dataset"))
        return sorted(f[len(prefix):] for f in files if f.startswith(prefix) and f.endswith(".jsonl"))

    def read_segment(self, name: str) -> bytes:
        local = self._call(f"download {name}", lambda: self.api.hf_hub_download(
            repo_id=self.repo_id, filename=f"{SEGMENT_DIR}/{name}", repo_type="dataset"))
        return Path(local).read_bytes()

    def write_segments(self, segments: list[tuple[str, bytes]]) -> None:
        """One commit holding every segment; refused unless the repo is private right now."""
        from huggingface_hub import CommitOperationAdd

        self._ensure_private_repo(recheck=True)
        names = [name for name, _ in segments]
        message = f"mirror {len(names)} segment(s): {names[0]}" + (f" .. {names[-1]}" if len(names) > 1 else "")

        def commit() -> Any:
            # Fresh operations on every attempt: create_commit mutates the ones it is given.
            ops = [CommitOperationAdd(path_in_repo=f"{SEGMENT_DIR}/{name}", path_or_fileobj=data)
                   for name, data in segments]
            return self.api.create_commit(self.repo_id, operations=ops, commit_message=message, repo_type="dataset")

        self._call("create_commit", commit)

    def rewrite_segments(self, changes: dict[str, bytes | None]) -> None:
        """One commit replacing (or deleting, for None) segments, then the repo's history squashed
        to that one state: a Hub repo keeps every old commit's files, and a forgotten turn must not
        stay readable at an older revision. Only ``forget`` rewrites a segment."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        if not changes:
            return
        self._ensure_private_repo(recheck=True)

        def commit() -> Any:
            ops = [CommitOperationDelete(path_in_repo=f"{SEGMENT_DIR}/{name}") if data is None else
                   CommitOperationAdd(path_in_repo=f"{SEGMENT_DIR}/{name}", path_or_fileobj=data)
                   for name, data in changes.items()]
            return self.api.create_commit(self.repo_id, operations=ops, repo_type="dataset",
                                          commit_message=f"forget: rewrite {len(ops)} segment(s)")

        self._call("create_commit", commit)
        self._call("super_squash_history", lambda: self.api.super_squash_history(
            repo_id=self.repo_id, repo_type="dataset", commit_message="mirror (history squashed by forget)"))
