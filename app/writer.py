"""Group commit for the app's writes: many users' turns and feedback share one fsync, and nothing
acknowledged to a user is lost.

The store makes every write its own ``synchronous=FULL`` transaction, so each one waits for an
fsync (1-3 ms on a virtual disk, more when the disk is busy). With many chat users each write
would queue behind everyone else's fsync. Here one writer thread takes whatever is waiting (up to
``max_batch`` rows) and commits it through ``Store.insert`` in ONE transaction.

Contract:

  * **Acknowledged means durable.** ``log_turn`` and ``add_feedback_checked`` return an id only
    once the row is committed to the store, or, when the store keeps failing, appended and
    fsynced to the fallback file (below). A caller that gets an id can rely on the row surviving
    a SIGKILL or a power cut. ``submit_turn`` queues without waiting, for callers that wait later.
  * **A failed batch is retried, never dropped.** A transaction that fails (disk full, I/O
    error, a lock held past SQLite's busy timeout) is retried after each of ``retry_delays``.
    When every retry fails, the batch's conversations and turns are appended to the fallback
    file (``store.db.fallback.jsonl`` beside the store, JSON lines, fsynced), the error is kept
    in ``health()`` and logged, and the next ``StoreWriter`` on that store replays the file
    first (idempotently, by id) and removes it. Feedback on a turn that is in the fallback file
    goes there too, after its turn. Other feedback in a failed batch is refused with
    ``WriteFailed`` (the user is told it was not saved; nothing acknowledged is lost).
  * **A feedback event on an unknown turn** fails alone with ``KeyError``; the rest of its batch
    commits. Malformed feedback is refused (``FeedbackError``) before it is queued.
  * **Every wait has a timeout** (``wait_timeout``, or the call's ``timeout``): past it the caller
    gets ``WriteTimeout``, which says the write is still queued and may yet be saved.
  * **close() is race-free**: it takes the same lock as every enqueue, so a write is either
    queued before the stop marker (and committed) or refused with ``WriterClosed``.
  * The queue is first-in first-out, so a turn is always written before any feedback on it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.core.errors import LoopError
from loop.core.feedback import CleanFeedback
from loop.core.io import new_id, utcnow
from loop.core.store import NewConversation, NewFeedback, NewRow, NewTurn, Store, row_from_json, row_to_json

log = logging.getLogger(__name__)

DEFAULT_RETRY_DELAYS = (0.05, 0.25, 1.0, 3.0)


class WriterClosed(LoopError, RuntimeError):
    """The writer is closed (the app is shutting down); the write was not queued."""


class WriteFailed(LoopError, RuntimeError):
    """The write could not be made durable anywhere; it was not saved."""


class WriteTimeout(LoopError, TimeoutError):
    """The write was not confirmed within the timeout; it is still queued and may yet be saved."""


@dataclass
class _Job:
    row: NewRow | None  # None: a barrier (flush) or the stop marker
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    where: str = ""  # "store" or "fallback" once durable


_STOP = _Job(None)


def fallback_path_for(store: Store) -> Path:
    return store.path.with_name(store.path.name + ".fallback.jsonl")


class StoreWriter:
    """Batches writes to ``store`` on one thread; reads go straight to the store."""

    def __init__(self, store: Store, max_batch: int = 256, *, fallback_path: str | Path | None = None,
                 retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS, wait_timeout: float = 30.0):
        self.store = store
        self.max_batch = max_batch
        self.fallback_path = Path(fallback_path) if fallback_path else fallback_path_for(store)
        self.retry_delays = tuple(retry_delays)
        self.wait_timeout = wait_timeout
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._lock = threading.Lock()  # one lock for "is it closed?" + enqueue, and for close()
        self._closed = False
        self.batches = 0  # commits made (for the benchmark: events per fsync)
        self.failures = 0  # failed transaction attempts
        self.last_error: str | None = None
        self._fallback_turns: set[str] = set()  # turns in the fallback file, not (yet) in the store
        self.fallback_rows = 0
        self.replay_fallback()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # reads: latest_feedback, get_turn, ...
        return getattr(self.store, name)

    def health(self) -> dict[str, Any]:
        """What went wrong, if anything: the last store error and the rows waiting in the fallback file."""
        return {"error": self.last_error, "fallback_rows": self.fallback_rows,
                "fallback_path": str(self.fallback_path) if self.fallback_rows else None,
                "queued": self._queue.qsize(), "running": self._thread.is_alive()}

    # -- writes ----------------------------------------------------------------------------------

    def new_conversation(self, client: str | None = None) -> str:
        """Queue a new conversation; returns its id at once (a turn creates it anyway if needed)."""
        row = NewConversation(new_id(), utcnow("microseconds"), client)
        self._put(_Job(row))
        return row.id

    def submit_turn(self, *, conversation_id: str, messages: list[dict[str, str]], answer: str,
                    position: int | None = None, model_version: str | None = None, gguf_sha256: str | None = None,
                    sampling: dict | None = None, latency_s: float | None = None, ttft_s: float | None = None,
                    prompt_tokens: int | None = None, completion_tokens: int | None = None,
                    logprob_mean: float | None = None, logprob_min: float | None = None,
                    turn_id: str | None = None, created_at: str | None = None) -> PendingWrite:
        """Queue a turn without waiting; ``.wait()`` on the result returns its id once durable."""
        row = NewTurn(id=turn_id or new_id(), conversation_id=conversation_id, messages=messages, answer=answer,
                      created_at=created_at or utcnow("microseconds"), position=position, model_version=model_version,
                      gguf_sha256=gguf_sha256, sampling=sampling or {}, latency_s=latency_s, ttft_s=ttft_s,
                      prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, logprob_mean=logprob_mean,
                      logprob_min=logprob_min)  # malformed messages: ValueError here, before queueing
        job = _Job(row)
        self._put(job)
        return PendingWrite(self, job)

    def log_turn(self, *, timeout: float | None = None, **turn: Any) -> str:
        """Write a turn and return its id once it is durable (store or fallback file).

        Raises WriteTimeout, WriteFailed or WriterClosed; the arguments are ``submit_turn``'s.
        """
        return self.submit_turn(**turn).wait(timeout)

    def add_feedback_checked(self, turn_id: str, thumbs: str | None = None, reasons: list[str] | None = None,
                             comment: str | None = None, correction: str | None = None, source: str = "app",
                             timeout: float | None = None) -> tuple[str, CleanFeedback]:
        """Append a feedback event and return ``(id, cleaned)`` once it is durable.

        FeedbackError (malformed, before queueing), KeyError (no such turn), WriteFailed,
        WriteTimeout, WriterClosed.
        """
        row, clean = NewFeedback.clean(turn_id, thumbs, reasons, comment, correction, source)
        job = _Job(row)
        self._put(job)
        return PendingWrite(self, job).wait(timeout), clean

    def add_feedback(self, turn_id: str, thumbs: str | None = None, reasons: list[str] | None = None,
                     comment: str | None = None, correction: str | None = None, source: str = "app",
                     timeout: float | None = None) -> str:
        return self.add_feedback_checked(turn_id, thumbs, reasons, comment, correction, source, timeout)[0]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is durable; False if ``timeout`` passed first."""
        timeout = self.wait_timeout if timeout is None else timeout
        job = _Job(None)
        try:
            self._put(job)
        except WriterClosed:  # closed: everything queued before the stop marker is handled before it exits
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return job.done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then stop the thread; later writes raise WriterClosed."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(self.wait_timeout if timeout is None else timeout)
        if self._thread.is_alive():
            log.error("the store writer did not finish within its timeout; %d writes still queued",
                      self._queue.qsize())

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise WriterClosed("the store writer is closed (the app is shutting down): this write was not saved")
            if not self._thread.is_alive():
                raise WriteFailed("the store writer has stopped: this write was not saved")
            self._queue.put(job)

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(job is _STOP for job in batch)
            jobs = [job for job in batch if job.row is not None]
            try:
                if jobs:
                    self._write(jobs)
            except BaseException as exc:  # a bug here must not kill the thread or leave waiters hanging
                log.exception("store writer: unexpected error")
                for job in jobs:
                    if not job.where and job.error is None:
                        job.error = WriteFailed(f"not saved: {exc}")
            finally:
                for job in batch:
                    job.done.set()
            if stop:
                return

    def _write(self, jobs: list[_Job]) -> None:
        attempt = 0
        while True:
            try:
                results = self.store.insert([job.row for job in jobs])
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if attempt >= len(self.retry_delays):
                    log.error("store write failed %d times (%s); %d rows go to the fallback file %s",
                              attempt + 1, exc, len(jobs), self.fallback_path)
                    self._to_fallback(jobs, exc)
                    return
                log.warning("store write failed (%s); retry %d of %d in %.2f s", exc, attempt + 1,
                            len(self.retry_delays), self.retry_delays[attempt])
                time.sleep(self.retry_delays[attempt])
                attempt += 1
                continue
            self.batches += 1
            diverted = []
            for job, error in zip(jobs, results):
                if error is None:
                    job.where = "store"
                elif isinstance(job.row, NewFeedback) and job.row.turn_id in self._fallback_turns:
                    diverted.append(job)  # its turn waits in the fallback file: the event goes after it
                else:
                    job.error = error
            if diverted:
                self._to_fallback(diverted, None)
            return

    def _to_fallback(self, jobs: list[_Job], cause: BaseException | None) -> None:
        keep: list[_Job] = []
        turns = set(self._fallback_turns)
        for job in jobs:
            row = job.row
            if isinstance(row, NewTurn):
                turns.add(row.id)
            if isinstance(row, NewFeedback) and row.turn_id not in turns:
                # Its turn may be in the store; we cannot check while the store fails. Not acknowledged.
                job.error = WriteFailed(f"feedback not saved: the store failed ({cause}); please try again")
                continue
            keep.append(job)
        if not keep:
            return
        try:
            self._append_fallback([job.row for job in keep])
        except OSError as exc:
            log.critical("rows could not be saved anywhere (store: %s; fallback file %s: %s)",
                         cause, self.fallback_path, exc)
            self.last_error = f"store and fallback file both failed: {exc}"
            for job in keep:
                job.error = WriteFailed(f"not saved: the store and its fallback file both failed ({exc})")
            return
        self._fallback_turns = turns
        self.fallback_rows += len(keep)
        for job in keep:
            job.where = "fallback"

    def _append_fallback(self, rows: list[NewRow]) -> None:
        data = "".join(json.dumps(row_to_json(row), ensure_ascii=False) + "\n" for row in rows).encode()
        new = not self.fallback_path.exists()
        fd = os.open(self.fallback_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the file's directory entry must survive a power cut too
            dfd = os.open(self.fallback_path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # -- replay ----------------------------------------------------------------------------------

    def replay_fallback(self) -> dict[str, int]:
        """Write the fallback file's rows into the store (idempotent by id) and remove the file.

        Called on start, before any new write. A torn last line (a crash mid-append: never
        acknowledged) is skipped. Feedback whose turn is nowhere is kept aside in
        ``<fallback>.rejected.jsonl`` and reported. If the store still fails, the file stays and
        the error is in ``health()``.
        """
        path = self.fallback_path
        if not path.exists():
            return {"replayed": 0}
        rows: list[NewRow] = []
        torn = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(row_from_json(json.loads(line)))
            except (ValueError, TypeError) as exc:
                torn += 1
                log.warning("fallback file %s: skipping an unreadable line (%s)", path, exc)
        try:
            results = self.store.insert(rows, if_exists="ignore")
        except Exception as exc:
            self.last_error = f"replaying {path.name} failed: {type(exc).__name__}: {exc}"
            self._fallback_turns = {r.id for r in rows if isinstance(r, NewTurn)}
            self.fallback_rows = len(rows)
            log.error("cannot replay %d rows from %s yet: %s", len(rows), path, exc)
            return {"replayed": 0, "pending": len(rows), "torn": torn}
        rejected = [row for row, error in zip(rows, results) if error is not None]
        if rejected:
            with open(path.with_suffix(".rejected.jsonl"), "a", encoding="utf-8") as out:
                for row in rejected:
                    out.write(json.dumps(row_to_json(row), ensure_ascii=False) + "\n")
            log.error("%d feedback events in %s refer to unknown turns; kept in %s", len(rejected), path,
                      path.with_suffix(".rejected.jsonl"))
        os.unlink(path)
        log.warning("replayed %d rows from %s into the store", len(rows) - len(rejected), path)
        return {"replayed": len(rows) - len(rejected), "rejected": len(rejected), "torn": torn}


class PendingWrite:
    """A queued write; ``wait()`` returns the row's id once it is durable."""

    def __init__(self, writer: StoreWriter, job: _Job):
        self._writer, self._job = writer, job

    @property
    def id(self) -> str:
        return self._job.row.id

    def wait(self, timeout: float | None = None) -> str:
        timeout = self._writer.wait_timeout if timeout is None else timeout
        if not self._job.done.wait(timeout):
            raise WriteTimeout(f"not confirmed saved within {timeout:g} s (the store is slow or locked); "
                               "the write is still queued")
        if self._job.error is not None:
            raise self._job.error
        return self._job.row.id
