"""The rows a store holds, as written (``NewConversation``, ``NewTurn``, ``NewFeedback``), their JSON-lines
form, and the SQL that inserts each: ``Store.insert`` batches them, ``log_turn`` and ``add_feedback`` write
one, always through these same functions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, overload

from loop.core.feedback import CleanFeedback, clean_feedback
from loop.core.io import new_id, utcnow

_JSON_COLUMNS = ("messages", "sampling", "reasons")


@overload
def _row(row: sqlite3.Row) -> dict[str, Any]: ...
@overload
def _row(row: None) -> None: ...
def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    """A stored row as a dict, its JSON columns decoded; None stays None."""
    if row is None:
        return None
    out = dict(row)
    for col in _JSON_COLUMNS:
        if col in out and out[col] is not None:
            out[col] = json.loads(out[col])
    return out


@dataclass(frozen=True)
class NewConversation:
    """A conversation row for :meth:`Store.insert`."""

    id: str
    created_at: str
    client: str | None = None


@dataclass(frozen=True)
class NewTurn:
    """A turn row for :meth:`Store.insert`; ``position`` None means "next in its conversation".

    A conversation that does not exist yet is created with the turn (same rule as ``log_turn``).
    """

    id: str
    conversation_id: str
    messages: list[dict[str, str]]
    answer: str
    created_at: str
    position: int | None = None
    model_version: str | None = None
    gguf_sha256: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprob_mean: float | None = None
    logprob_min: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in self.messages
        ):
            raise ValueError("messages must be a list of {'role', 'content'} dicts")


@dataclass(frozen=True)
class NewFeedback:
    """A feedback event for :meth:`Store.insert`, already cleaned (``NewFeedback.clean``)."""

    id: str
    turn_id: str
    thumbs: str | None
    reasons: list[str]
    comment: str | None
    correction: str | None
    source: str
    created_at: str

    @classmethod
    def clean(cls, turn_id: str, thumbs: str | None = None, reasons: list[str] | None = None,
              comment: str | None = None, correction: str | None = None, source: str = "app",
              ) -> tuple[NewFeedback, CleanFeedback]:
        """Validate and clean (``loop.core.feedback``; FeedbackError when malformed) into a new event."""
        clean = clean_feedback(thumbs, reasons, comment, correction)
        row = cls(new_id(), turn_id, clean.thumbs, clean.reasons, clean.comment, clean.correction, source, utcnow("microseconds"))
        return row, clean


NewRow = NewConversation | NewTurn | NewFeedback
ROW_TYPES: dict[str, type] = {"conversation": NewConversation, "turn": NewTurn, "feedback": NewFeedback}


def row_to_json(row: NewRow) -> dict[str, Any]:
    """``{"kind": ..., **fields}``: the form a row takes in a JSON-lines file (``row_from_json``)."""
    kind = next(k for k, t in ROW_TYPES.items() if isinstance(row, t))
    return {"kind": kind, **asdict(row)}


def row_from_json(data: dict[str, Any]) -> NewRow:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in ROW_TYPES:
        raise ValueError(f"unknown row kind {kind!r}")
    return ROW_TYPES[kind](**data)


def _insert_conversation(db: sqlite3.Connection, row: NewConversation, or_ignore: bool) -> None:
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    db.execute(f"{verb} INTO conversations (id, created_at, client) VALUES (?, ?, ?)", (row.id, row.created_at, row.client))


def _insert_turn(db: sqlite3.Connection, row: NewTurn, or_ignore: bool) -> None:
    if or_ignore and db.execute("SELECT 1 FROM turns WHERE id = ?", (row.id,)).fetchone() is not None:
        return
    if db.execute("SELECT 1 FROM conversations WHERE id = ?", (row.conversation_id,)).fetchone() is None:
        db.execute("INSERT INTO conversations (id, created_at) VALUES (?, ?)", (row.conversation_id, utcnow("microseconds")))
    position = row.position
    if position is None:
        position = db.execute(
            "SELECT COALESCE(MAX(position) + 1, 0) FROM turns WHERE conversation_id = ?", (row.conversation_id,)
        ).fetchone()[0]
    db.execute(
        """INSERT INTO turns (id, conversation_id, position, messages, answer, model_version, gguf_sha256,
               sampling, latency_s, ttft_s, prompt_tokens, completion_tokens, logprob_mean, logprob_min, created_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            row.id, row.conversation_id, position, json.dumps(row.messages, ensure_ascii=False), row.answer,
            row.model_version, row.gguf_sha256, json.dumps(row.sampling or {}, sort_keys=True), row.latency_s,
            row.ttft_s, row.prompt_tokens, row.completion_tokens, row.logprob_mean, row.logprob_min, row.created_at,
        ),
    )


def _insert_feedback(db: sqlite3.Connection, row: NewFeedback, or_ignore: bool) -> None:
    if db.execute("SELECT 1 FROM turns WHERE id = ?", (row.turn_id,)).fetchone() is None:
        raise KeyError(f"no turn with id {row.turn_id!r}")
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    db.execute(
        f"""{verb} INTO feedback (id, turn_id, thumbs, reasons, comment, correction, source, created_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (row.id, row.turn_id, row.thumbs, json.dumps(row.reasons), row.comment, row.correction, row.source,
         row.created_at),
    )


_INSERTERS: dict[type, Callable[[sqlite3.Connection, Any, bool], None]] = {
    NewConversation: _insert_conversation, NewTurn: _insert_turn, NewFeedback: _insert_feedback,
}
