"""The fixed probe set: prompts every version is asked the same way.

``probes.jsonl`` (beside this module) holds one JSON object a line: a ``"prompt"`` string or a
``"messages"`` list, optionally with a reference ``"answer"``. Two layers read it: the exporter's
GGUF verification (``trainer.verify``) and the probe runner that compares versions
(``app.probe_runner``, ``python -m loop.versions compare``), so it lives in the core.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loop.core.io import read_jsonl

PROBES_FILE = Path(__file__).with_name("probes.jsonl")

# Used when probes.jsonl is absent (a deployment that left the package data out).
FALLBACK_PROBES: list[str] = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in one sentence what a neural network is.",
    "Write a haiku about autumn.",
    "What is 12 times 7?",
    "How do I reverse a list in Python?",
]


def probes_file() -> Path | None:
    """``probes.jsonl`` beside this module, when it is there."""
    return PROBES_FILE if PROBES_FILE.is_file() else None


def as_messages(item: Any) -> list[dict[str, str]]:
    """A probe ("prompt" string, "messages" list, or a bare string) as chat messages, without any
    reference answer: the model must answer the last user turn itself."""
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if "messages" in item:
        messages = [dict(m) for m in item["messages"]]
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        return messages
    return [{"role": "user", "content": str(item["prompt"])}]


def load_probes(path: str | Path | None = None, limit: int | None = None) -> tuple[list[list[dict[str, str]]], str]:
    """(probes as message lists, where they came from)."""
    source = Path(path) if path else probes_file()
    if source is None:
        items: list[Any] = list(FALLBACK_PROBES)
        origin = "built-in fallback probes"
    else:
        items = read_jsonl(source)
        origin = str(source.name)
    probes = [as_messages(item) for item in items]
    return (probes[:limit] if limit else probes), origin


def last_user_text(messages: list[dict[str, str]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""
