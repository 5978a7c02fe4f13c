"""Version ids, the ``Version`` record (``version.json``) and the registry's errors."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.core.errors import LoopError

# The one pattern for version ids. Every Registry method that takes an id checks it, so the CLI,
# the app and the cycle, which all go through those methods, need no check of their own.
VERSION_ID = re.compile(r"v[1-9][0-9]*")


class RegistryError(LoopError, RuntimeError):
    """The registry refuses a change or cannot find what was asked for; the message says why."""


class InvalidVersionIdError(RegistryError, ValueError):
    """A string that is not a version id (a path, a trailing slash, ``..``, an empty string)."""


class RegistryCorruptError(RegistryError):
    """A registry file exists but cannot be read or does not have the expected shape."""


def is_version_id(value: Any) -> bool:
    return isinstance(value, str) and VERSION_ID.fullmatch(value) is not None


def check_version_id(value: Any) -> str:
    """``value`` if it is a version id, else InvalidVersionIdError saying what ids look like."""
    if not is_version_id(value):
        raise InvalidVersionIdError(f"{value!r} is not a version id: ids are v1, v2, ... (a name, not a path)")
    return value



@dataclass
class Version:
    id: str
    parent: str | None
    created_at: str
    base_model: str
    gguf_file: str = "model.gguf"
    gguf_sha256: str = ""
    size_bytes: int = 0
    quantization: str = ""
    variant: dict[str, Any] = field(default_factory=dict)
    snapshot_hash: str | None = None
    snapshot_counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    hf_dir: str | None = None  # merged Hugging Face weights: the next cycle trains from these
    pinned: bool = False
    note: str = ""
    # Trained (directly, or through a parent's weights) on text that was forgotten since: one entry
    # per forget, {"at", "reason", "turn_ids"} (ids only). Empty: nothing known against it.
    tainted: list[dict[str, Any]] = field(default_factory=list)
    path: str = ""  # the version directory (filled on load, not stored)

    @property
    def gguf_path(self) -> Path:
        return Path(self.path) / self.gguf_file

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data
