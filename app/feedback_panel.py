"""Feedback on an answer, richer than thumbs (Open WebUI is the anchor).

A thumb click is recorded at once (the least a user gives is never lost) and opens a panel for
the rest: reasons for that direction, a comment, and "suggest a better answer" (an editable copy
of the answer). Sending the panel appends a new event; the latest event counts, so feedback can
be changed at any time. Malformed feedback is rejected or cleaned by ``loop.core.feedback`` and the
user is told which; the turn's own log is never touched.

Pure functions over a ChatSession and a Store, so they are tested without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.session import ChatSession
from loop.core.feedback import FeedbackError
from loop.core.reasons import LABELS, REASONS_DOWN, REASONS_UP

THUMB_CHOICES = [("Good answer", "up"), ("Bad answer", "down")]


def reason_choices(thumbs: str | None) -> list[tuple[str, str]]:
    reasons = REASONS_UP if thumbs == "up" else REASONS_DOWN if thumbs == "down" else REASONS_DOWN + REASONS_UP
    return [(LABELS[r], r) for r in reasons]


def thumbs_from_like(liked: Any) -> str | None:
    """Gradio's LikeData.liked: True (Like), False (Dislike), "" (the thumb was un-selected)."""
    if liked is True:
        return "up"
    if liked is False:
        return "down"
    return None


@dataclass
class Panel:
    """What the feedback panel shows; ``notice`` is for the user whether or not it opens."""

    visible: bool = False
    turn: int | None = None
    title: str = ""
    thumbs: str | None = None
    reasons: list[str] = field(default_factory=list)
    comment: str = ""
    correction: str = ""
    notice: str = ""
    ok: bool = True


def on_like(session: ChatSession, store: Any, message_index: Any, liked: Any) -> Panel:
    """A thumb was clicked on Chatbot message ``message_index``: record it and open the panel."""
    k = session.turn_at(message_index)
    if k is None:
        return Panel(notice="Feedback is for the model's answers.", ok=False)
    turn = session.turns[k]
    if turn.turn_id is None:
        return Panel(notice="Wait for the answer to finish before rating it.", ok=False)
    if not turn.turn_id:  # "": the answer finished but could not be saved
        return Panel(notice="This answer could not be saved, so it cannot take feedback.", ok=False)
    thumbs = thumbs_from_like(liked)
    notice = ""
    if thumbs is not None:
        try:
            store.add_feedback_checked(turn.turn_id, thumbs=thumbs)
        except (FeedbackError, KeyError) as exc:
            return Panel(notice=f"Feedback not saved: {exc}", ok=False)
        turn.thumbs = thumbs
        notice = f"Saved thumbs-{thumbs} for answer {k + 1}. Add details below if you like."
    else:
        notice = "Thumb removed here; your earlier feedback stands until you send new feedback."
    session.selected = k
    latest = store.latest_feedback(turn.turn_id) or {}
    allowed = {r for _, r in reason_choices(thumbs)}
    return Panel(
        visible=True,
        turn=k,
        title=f"**Feedback on answer {k + 1}** (model {turn.version_id})",
        thumbs=thumbs,
        reasons=[r for r in latest.get("reasons") or [] if r in allowed],
        comment=latest.get("comment") or "",
        correction=latest.get("correction") or turn.answer,  # "suggest a better answer": start from it
        notice=notice,
    )


def submit(
    session: ChatSession,
    store: Any,
    thumbs: str | None,
    reasons: list[str] | None,
    comment: str | None,
    correction: str | None,
) -> Panel:
    """Append the panel's feedback as a new event on the selected turn."""
    k = session.selected
    if k is None or k >= len(session.turns) or not session.turns[k].turn_id:
        return Panel(notice="Pick an answer to give feedback on (click its thumbs up or down).", ok=False)
    turn = session.turns[k]
    thumbs = thumbs or None
    notes: list[str] = []
    reasons = list(reasons or [])
    if thumbs is not None:
        allowed = {r for _, r in reason_choices(thumbs)}
        mismatched = [r for r in reasons if r not in allowed]
        if mismatched:
            reasons = [r for r in reasons if r in allowed]
            notes.append(f"dropped reason(s) that do not fit a thumbs-{thumbs}: {', '.join(mismatched)}")
    # The correction box starts as a copy of the answer: unchanged, it is not a correction.
    if correction is not None and correction.strip() == turn.answer.strip():
        correction = None
    try:
        _, clean = store.add_feedback_checked(turn.turn_id, thumbs, reasons, comment or None, correction or None)
    except FeedbackError as exc:
        return Panel(visible=True, turn=k, thumbs=thumbs, reasons=reasons, comment=comment or "",
                     correction=correction or turn.answer, notice=f"Feedback not saved: {exc}", ok=False)
    except KeyError as exc:
        return Panel(notice=f"Feedback not saved: {exc}", ok=False)
    turn.thumbs = clean.thumbs
    notes += clean.notes
    notice = f"Feedback on answer {k + 1} saved."
    if notes:
        notice += " Cleaned: " + "; ".join(notes) + "."
    session.selected = None
    return Panel(visible=False, notice=notice)
