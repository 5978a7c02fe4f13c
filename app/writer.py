"""Group commit for the app's writes: many users' turns and feedback share one fsync.

The store makes every write its own ``synchronous=FULL`` transaction, so each one waits for an
fsync (1-3 ms on a virtual disk, more when the disk is busy). Fine for one writer; with many
chat users each feedback event would queue behind everyone else's fsync. Here one writer thread
takes whatever is waiting (up to ``max_batch`` writes) and commits it in ONE transaction:

  * feedback: the caller waits until its event is committed (durable) before the user is told
    "saved"; a malformed event is refused before it is queued (``loop.feedback``), and a batch
    item that fails (an unknown turn) is rolled back alone through a SAVEPOINT;
  * turns: queued and the call returns at once with the turn's id, so logging adds microseconds
    to a turn instead of an fsync; the row is durable a moment later (``flush()`` waits for it).
    The queue is first-in first-out, so a turn is always committed before any feedback on it.

The SQL mirrors ``Store.log_turn`` / ``Store.add_feedback_checked`` (same columns, same rules);
``tests/app/test_app_writer.py`` checks that both produce identical rows, so a schema change
that forgets this module fails a test rather than a user.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from loop.feedback import CleanFeedback, clean_feedback
from loop.store import Store, new_id, utcnow

log = logging.getLogger(__name__)


@dataclass
class _Job:
    kind: str  # "conversation" | "turn" | "feedback" | "barrier"
    params: tuple = ()
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


_STOP = _Job("stop")


class StoreWriter:
    """Batches writes to ``store`` on one thread; reads go straight to the store."""

    def __init__(self, store: Store, max_batch: int = 256):
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._closed = False
        self.batches = 0  # commits made (for the benchmark: events per fsync)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:  # reads: latest_feedback, get_turn, ...
        return getattr(self.store, name)

    # -- writes ----------------------------------------------------------------------------------

    def new_conversation(self, client: str | None = None) -> str:
        """Queue a new conversation; returns its id at once (its turns are queued after it)."""
        cid = new_id()
        self._put(_Job("conversation", (cid, utcnow(), client)))
        return cid

    def log_turn(self, *, conversation_id: str, messages: list[dict[str, str]], answer: str, position: int | None = None,
                 model_version: str | None = None, gguf_sha256: str | None = None, sampling: dict | None = None,
                 latency_s: float | None = None, ttft_s: float | None = None, prompt_tokens: int | None = None,
                 completion_tokens: int | None = None, logprob_mean: float | None = None,
                 logprob_min: float | None = None, turn_id: str | None = None, created_at: str | None = None) -> str:
        """Queue a turn; returns its id at once (``flush()`` waits until it is durable)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a list of {'role', 'content'} dicts")
        tid = turn_id or new_id()
        row = (tid, conversation_id, position, json.dumps(messages, ensure_ascii=False), answer, model_version,
               gguf_sha256, json.dumps(sampling or {}, sort_keys=True), latency_s, ttft_s, prompt_tokens,
               completion_tokens, logprob_mean, logprob_min, created_at or utcnow())
        self._put(_Job("turn", row))
        return tid

    def add_feedback_checked(self, turn_id: str, thumbs: str | None = None, reasons: list[str] | None = None,
                             comment: str | None = None, correction: str | None = None,
                             source: str = "app") -> tuple[str, CleanFeedback]:
        """Append a feedback event and wait until it is committed; FeedbackError / KeyError as the store."""
        clean = clean_feedback(thumbs, reasons, comment, correction)  # malformed: refused before queueing
        fid = new_id()
        job = _Job("feedback", (fid, turn_id, clean.thumbs, json.dumps(clean.reasons), clean.comment,
                                clean.correction, source, utcnow()))
        self._put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return fid, clean

    def add_feedback(self, turn_id: str, thumbs: str | None = None, reasons: list[str] | None = None,
                     comment: str | None = None, correction: str | None = None, source: str = "app") -> str:
        return self.add_feedback_checked(turn_id, thumbs, reasons, comment, correction, source)[0]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is committed."""
        if self._closed and not self._thread.is_alive():
            return True
        job = _Job("barrier")
        self._put(job)
        return job.done.wait(timeout)

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _put(self, job: _Job) -> None:
        if self._closed:
            raise RuntimeError("the store writer is closed")
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
            batch = [job for job in batch if job is not _STOP]
            if batch:
                self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        db = self.store._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            for i, job in enumerate(batch):
                if job.kind == "barrier":
                    continue
                db.execute(f"SAVEPOINT w{i}")
                try:
                    insert = {"conversation": self._insert_conversation, "turn": self._insert_turn,
                              "feedback": self._insert_feedback}[job.kind]
                    insert(db, job.params)
                    db.execute(f"RELEASE w{i}")
                except Exception as exc:  # this write alone is undone; the rest of the batch commits
                    db.execute(f"ROLLBACK TO w{i}")
                    db.execute(f"RELEASE w{i}")
                    job.error = exc
                    if job.kind in ("conversation", "turn"):
                        log.error("a %s could not be logged: %s", job.kind, exc)
            db.execute("COMMIT")
            self.batches += 1
        except Exception as exc:  # the commit itself failed (disk full, ...): tell every waiter
            log.error("store write batch failed: %s", exc)
            try:
                db.execute("ROLLBACK")
            except Exception:
                pass
            for job in batch:
                job.error = job.error or exc
        finally:
            for job in batch:
                job.done.set()

    @staticmethod
    def _insert_conversation(db, row: tuple) -> None:
        db.execute("INSERT INTO conversations (id, created_at, client) VALUES (?, ?, ?)", row)

    @staticmethod
    def _insert_turn(db, row: tuple) -> None:
        tid, conversation_id, position = row[0], row[1], row[2]
        if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
            db.execute("INSERT INTO conversations (id, created_at) VALUES (?, ?)", (conversation_id, utcnow()))
        if position is None:
            position = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM turns WHERE conversation_id = ?",
                                  (conversation_id,)).fetchone()[0]
        db.execute(
            """INSERT INTO turns (id, conversation_id, position, messages, answer, model_version, gguf_sha256,
                   sampling, latency_s, ttft_s, prompt_tokens, completion_tokens, logprob_mean, logprob_min, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (tid, conversation_id, position, *row[3:]),
        )

    @staticmethod
    def _insert_feedback(db, row: tuple) -> None:
        if db.execute("SELECT 1 FROM turns WHERE id = ?", (row[1],)).fetchone() is None:
            raise KeyError(f"no turn with id {row[1]!r}")
        db.execute(
            """INSERT INTO feedback (id, turn_id, thumbs, reasons, comment, correction, source, created_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
            row,
        )
