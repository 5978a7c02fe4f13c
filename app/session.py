"""One browser session's chat: what the model builds on, what the Chatbot shows, and the map
from a Chatbot message index to the logged turn it shows (the feedback widgets need it).

Kept apart from the Chatbot's own value on purpose: the displayed text carries a version label
and notices, while the history the model sees next must be exactly the answers it gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass
class ShownTurn:
    turn_id: str | None  # None while the answer is still streaming (not logged yet)
    user: str
    answer: str
    version_id: str
    thumbs: str | None = None  # latest thumbs given in this session ("up", "down" or None)
    finish_reason: str = ""


@dataclass
class ChatSession:
    conversation_id: str | None = None
    turns: list[ShownTurn] = field(default_factory=list)
    selected: int | None = None  # the turn the feedback panel is open for
    # Set by "New conversation": a stream still running on this session stops updating the page
    # and, at its end, puts the new session back (an update it sent a moment before may have
    # landed after the page was cleared).
    replaced_by: ChatSession | None = None

    def history(self) -> list[Message]:
        """The finished exchanges, as the model will see them next time."""
        out: list[Message] = []
        for t in self.turns:
            if t.turn_id is not None:
                out += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.answer}]
        return out

    def turn_at(self, message_index: Any) -> int | None:
        """The turn shown by Chatbot message ``message_index`` (assistant messages only)."""
        if isinstance(message_index, (list, tuple)):  # a (row, column) index from a tuple-style chatbot
            message_index = message_index[0]
        if not isinstance(message_index, int) or isinstance(message_index, bool) or message_index < 0:
            return None
        if message_index % 2 == 0:  # a user message: feedback is for answers
            return None
        k = message_index // 2
        return k if k < len(self.turns) else None

    def chat_messages(self) -> list[dict[str, Any]]:
        """The Chatbot's value: user and assistant messages alternating, one pair per turn."""
        out: list[dict[str, Any]] = []
        for t in self.turns:
            out.append({"role": "user", "content": t.user})
            out.append({"role": "assistant", "content": labelled(t)})
        return out

    def feedback_value(self) -> list[str | None]:
        """One entry per assistant message for the Chatbot's thumbs state."""
        return [{"up": "Like", "down": "Dislike"}.get(t.thumbs or "") for t in self.turns]


def labelled(turn: ShownTurn) -> str:
    """The answer with the version that wrote it (and how it ended when that matters)."""
    tag = f"model {turn.version_id}"
    if turn.turn_id is None:
        tag += " · writing…"
    elif turn.finish_reason == "stopped":
        tag += " · stopped"
    elif turn.finish_reason == "length":
        tag += " · cut at the token limit"
    body = turn.answer if turn.answer else ("…" if turn.turn_id is None else "(no answer)")
    return f"{body}\n\n<sub class=\"model-tag\">{tag}</sub>"


def session_from_store(store: Any, conversation_id: str) -> ChatSession | None:
    """Rebuild a session after a page reload from what the store logged (None if unknown)."""
    turns = store.conversation_turns(conversation_id)
    if not turns:
        return None
    session = ChatSession(conversation_id=conversation_id)
    for t in turns:
        user = next((m["content"] for m in reversed(t["messages"]) if m["role"] == "user"), "")
        fb = t.get("feedback") or {}
        session.turns.append(
            ShownTurn(t["id"], user, t["answer"], t["model_version"] or "?", fb.get("thumbs"),
                      (t.get("sampling") or {}).get("finish_reason", ""))
        )
    return session
