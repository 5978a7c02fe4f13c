"""``registry/published.jsonl``: what was published where (``loop.publish`` appends; the app's Space builder reads)."""

from __future__ import annotations

import json
from typing import Any

from loop.core.io import atomic_write_text
from loop.core.registry.base import RegistryBase


def record_published(registry: RegistryBase, result: dict[str, Any]) -> None:
    """Append one publish result (written whole: the file is replaced atomically)."""
    log = registry.root / "published.jsonl"
    lines = log.read_text() if log.is_file() else ""
    atomic_write_text(log, lines + json.dumps(result, sort_keys=True) + "\n")


def published(registry: RegistryBase) -> list[dict[str, Any]]:
    """Every publish result, oldest first."""
    log = registry.root / "published.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
