"""A durable, append-only mirror of the store, restored on start.

A Hugging Face Space's disk is wiped on every restart; the seed project lost its users' flags
that way. So the app copies every new row of the store (conversations, turns, feedback events,
arena votes) to a durable target and, on start, imports whatever the target holds.

Append-only: each flush writes the rows added since the last flush (a rowid watermark per table)
as new segment files (JSON lines, at most ``segment_max_rows`` rows each); an existing segment is
never rewritten, except by ``Mirror.forget`` (``python -m loop.store forget``), which rewrites the
segments holding a forgotten turn (on the Hub: one commit, then the repo's history squashed), and
restore leaves out the rows of every turn in the forget ledger (``loop.core.forgotten``). Segment
names start with a ULID, so sorting them by name replays them in the order they were written.
Restore is idempotent (insert, or do nothing when the id is there), so replaying a segment twice,
or into a store that already holds some of its rows, changes nothing.

Restore never stops at a bad part: an unreadable segment (after retries), an unreadable line, a
row without an id, a row the schema refuses, or a child row whose parent is in no segment (an
orphan; tried again after every other segment, in case its parent came later) is skipped, and
``RestoreResult`` names each one; every other row is restored. Nothing is deleted from the target,
so a segment that could not be read is read again by the next restore.

Targets:
  * ``LocalDirTarget``: a directory (default: ``<LOOP_HOME>-mirror``, a sibling of the home so
    wiping the home does not wipe the mirror; on a Space, point it at persistent storage such
    as ``/data``). Files appear whole: write to a temporary name, fsync, link.
  * ``HubDatasetTarget``: a Hugging Face dataset repo through ``huggingface_hub.HfApi``. The Hub
    limits commits per repo and hour (128), so writes are batched: at most one commit per
    ``commit_interval_s`` (``[app] mirror_hub_commit_interval_s``, 300 s), holding every segment
    of that flush (``create_commit`` with one operation per segment); the final flush on shutdown
    is never held back. Rows wait in the store meanwhile, and the watermark moves only after the
    commit. HTTP 429 and 5xx answers are retried with exponential backoff, honouring
    ``Retry-After`` (and the Hub's ``RateLimit`` header); a wait longer than ``RetryPolicy.max_wait_s``
    is not slept through: the flush fails with ``HubBusyError`` and the mirror tries again once
    that time has passed. The store holds raw, unscrubbed chats, so the repo must be private: it
    is created private, and a repo that is not private (checked before every commit) is refused
    with ``PublicRepoError`` before anything is uploaded. The token comes from ``HF_TOKEN``.

The watermark lives in ``$LOOP_HOME/mirror-state.json``. When the home is wiped, the watermark
goes with it, the (empty) store is refilled from the target, and every row now in the store is
known to be mirrored, so nothing is written twice. Rows the restore brought in are remembered by
id, so a partial store that is topped up by a restore does not send them back either.
"""

from loop.core.mirror.mirror import (
                                     FORMAT,
                                     SEGMENT_MAX_ROWS,
                                     TABLES,
                                     FlushResult,
                                     Mirror,
                                     RestoreResult,
                                     SkippedRow,
                                     mirror_from_config,
                                     target_from_config,
)
from loop.core.mirror.targets import (
                                     DEFAULT_HUB_COMMIT_INTERVAL_S,
                                     RETRY_STATUSES,
                                     SEGMENT_DIR,
                                     HubBusyError,
                                     HubDatasetTarget,
                                     LocalDirTarget,
                                     MirrorError,
                                     PublicRepoError,
                                     RetryPolicy,
                                     Target,
                                     call_with_retry,
                                     retry_after_s,
)

__all__ = [
    "DEFAULT_HUB_COMMIT_INTERVAL_S", "FORMAT", "RETRY_STATUSES", "SEGMENT_DIR", "SEGMENT_MAX_ROWS", "TABLES",
    "FlushResult", "HubBusyError", "HubDatasetTarget", "LocalDirTarget", "Mirror", "MirrorError", "PublicRepoError",
    "RestoreResult", "RetryPolicy", "SkippedRow", "Target", "call_with_retry", "mirror_from_config",
    "retry_after_s", "target_from_config",
]
