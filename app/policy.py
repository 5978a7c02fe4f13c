"""What the app accepts from a user, and what it does with a conversation too long for the model.

The policy, stated once (docs/app.md repeats it for users):
  * an empty (or whitespace-only) message is refused with a notice and never reaches the model;
  * a message longer than ``[app] max_message_chars`` is refused with a notice saying the limit;
  * control characters other than newline and tab are removed (they are never typed on purpose
    and they break exports);
  * the system prompt goes through the same policy (empty means none; over ``max_message_chars``
    it is refused before any model work, so a huge one cannot hold the model lock for everyone);
  * when the conversation no longer fits the model's context together with room for the answer,
    the OLDEST turns are left out of what the model sees (never the system prompt, never the new
    message) and the user is told how many; if the new message alone cannot fit, it is refused.

Kept free of Gradio and llama.cpp so that it is tested without either: token counting is a
function passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loop.core.errors import LoopError

Message = dict[str, str]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# An answer shorter than this is useless; the context must leave at least this much room.
MIN_ANSWER_TOKENS = 16


class InputRejected(LoopError, ValueError):
    """A message the app will not send to the model; ``str(exc)`` is the notice for the user."""


def clean_message(text: str | None, max_chars: int) -> str:
    """The message as it will be sent, or InputRejected saying why it will not be."""
    if text is None or not isinstance(text, str):
        raise InputRejected("Type a message first: an empty message is not sent to the model.")
    cleaned = _CONTROL.sub("", text).strip()
    if not cleaned:
        raise InputRejected("Type a message first: an empty message is not sent to the model.")
    if len(cleaned) > max_chars:
        raise InputRejected(
            f"That message is {len(cleaned):,} characters; the limit is {max_chars:,}. "
            "Shorten it (or split it over several messages)."
        )
    return cleaned


def clean_system_prompt(text: str | None, max_chars: int) -> str:
    """The system prompt as it will be sent ("" for none), or InputRejected saying why it will not be."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InputRejected("The system prompt must be text.")
    cleaned = _CONTROL.sub("", text).strip()
    if len(cleaned) > max_chars:
        raise InputRejected(
            f"The system prompt is {len(cleaned):,} characters; the limit is {max_chars:,}. "
            "Shorten it in Settings."
        )
    return cleaned


def history_pairs(history: Sequence[Message]) -> list[tuple[Message, Message]]:
    """Group a user/assistant history into (user, assistant) pairs, ignoring any unpaired tail."""
    pairs = []
    i = 0
    while i + 1 < len(history):
        u, a = history[i], history[i + 1]
        if u.get("role") == "user" and a.get("role") == "assistant":
            pairs.append((u, a))
            i += 2
        else:
            i += 1  # skip anything out of step rather than feeding the model a broken history
    return pairs


@dataclass
class FittedPrompt:
    messages: list[Message]  # exactly what the model will see
    prompt_tokens: int
    dropped_turns: int  # oldest user/assistant pairs left out
    max_tokens: int  # room left for the answer (may be less than asked when the context is tight)


def fit_history(
    system_prompt: str | None,
    history: Sequence[Message],
    user_message: str,
    count_tokens: Callable[[list[Message]], int],
    n_ctx: int,
    max_tokens: int,
) -> FittedPrompt:
    """Drop the oldest turns until the prompt plus ``max_tokens`` fits ``n_ctx``.

    If nothing is left to drop and the prompt still leaves no room for ``max_tokens``, the answer
    budget shrinks down to MIN_ANSWER_TOKENS; below that the message is refused.
    """
    head = [{"role": "system", "content": system_prompt}] if system_prompt and system_prompt.strip() else []
    tail = [{"role": "user", "content": user_message}]
    pairs = history_pairs(history)
    dropped = 0
    while True:
        body = [m for pair in pairs[dropped:] for m in pair]
        messages = head + body + tail
        n = count_tokens(messages)
        if n + max_tokens <= n_ctx:
            return FittedPrompt(messages, n, dropped, max_tokens)
        if dropped < len(pairs):
            dropped += 1
            continue
        room = n_ctx - n
        if room >= MIN_ANSWER_TOKENS:
            return FittedPrompt(messages, n, dropped, room)
        raise InputRejected(
            f"That message is too long for the model: with the system prompt it takes {n:,} tokens and the "
            f"model's context holds {n_ctx:,} (leaving room for an answer). Shorten it."
        )


def dropped_notice(dropped: int, n_ctx: int) -> str:
    return (
        f"The conversation is longer than the model's context ({n_ctx:,} tokens): the oldest "
        f"{dropped} exchange{'s' if dropped != 1 else ''} {'were' if dropped != 1 else 'was'} left out of what "
        "the model saw for this answer."
    )
