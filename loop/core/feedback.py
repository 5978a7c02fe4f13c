"""Validation and cleaning of feedback events before they reach the store.

Malformed feedback is rejected (with a message saying why) or cleaned (with a note saying what
changed); either way the turn it refers to is never touched.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from loop.core.errors import LoopError
from loop.core.reasons import ALL_REASONS

MAX_COMMENT_CHARS = 4000
MAX_CORRECTION_CHARS = 16000

# C0/C1 control characters except tab and newline: they break terminals, CSV exports and
# Argilla's UI, and nobody types them on purpose.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class FeedbackError(LoopError, ValueError):
    """Feedback that cannot be accepted; the message says what to fix."""


@dataclass
class CleanFeedback:
    thumbs: str | None
    reasons: list[str]
    comment: str | None
    correction: str | None
    notes: list[str] = field(default_factory=list)


def _clean_text(value: str | None, name: str, limit: int, notes: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise FeedbackError(f"{name} must be text, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value)
    stripped = _CONTROL.sub("", text)
    if stripped != text:
        notes.append(f"removed {len(text) - len(stripped)} control character(s) from the {name}")
    stripped = stripped.strip()
    if len(stripped) > limit:
        raise FeedbackError(f"{name} is {len(stripped)} characters; the limit is {limit}")
    return stripped or None


def clean_feedback(
    thumbs: str | None,
    reasons: list[str] | tuple[str, ...] | None,
    comment: str | None,
    correction: str | None,
) -> CleanFeedback:
    """Return the cleaned event, or raise FeedbackError naming every problem at once."""
    notes: list[str] = []
    problems: list[str] = []
    if thumbs not in (None, "up", "down"):
        problems.append(f"thumbs must be 'up', 'down' or empty, got {thumbs!r}")
    reasons = list(reasons or [])
    unknown = [r for r in reasons if r not in ALL_REASONS]
    if unknown:
        problems.append(f"unknown reason(s) {unknown}; known: {', '.join(ALL_REASONS)}")
    seen: list[str] = []
    for r in reasons:
        if r not in seen:
            seen.append(r)
    if len(seen) != len(reasons):
        notes.append("dropped duplicate reasons")
    clean_comment = clean_correction = None
    try:
        clean_comment = _clean_text(comment, "comment", MAX_COMMENT_CHARS, notes)
    except FeedbackError as exc:
        problems.append(str(exc))
    try:
        clean_correction = _clean_text(correction, "corrected answer", MAX_CORRECTION_CHARS, notes)
    except FeedbackError as exc:
        problems.append(str(exc))
    if problems:
        raise FeedbackError("; ".join(problems))
    if thumbs is None and not seen and clean_comment is None and clean_correction is None:
        raise FeedbackError("empty feedback: give thumbs, a reason, a comment or a corrected answer")
    return CleanFeedback(thumbs, seen, clean_comment, clean_correction, notes)
