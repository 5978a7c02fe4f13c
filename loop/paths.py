"""Where state lives.

Every piece of state is under ``LOOP_HOME`` (default ``./.loop``), the way simonw/llm keeps
everything under ``LLM_USER_PATH``: tests point it at a temp dir and nothing leaks between runs.
Setup-time tools (the Argilla server's own virtualenv, the GGUF converter) are under
``LOOP_TOOLS`` (default ``$LOOP_HOME/tools``) so that many homes can share one installation.
"""

from __future__ import annotations

import os
from pathlib import Path


def loop_home() -> Path:
    """The directory holding all state; created on first use."""
    home = Path(os.environ.get("LOOP_HOME") or ".loop").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tools_dir() -> Path:
    """The directory holding setup-time tools (not created here: setup fills it)."""
    explicit = os.environ.get("LOOP_TOOLS")
    if explicit:
        return Path(explicit).expanduser().resolve()
    return loop_home() / "tools"


def store_path(home: Path | None = None) -> Path:
    return (home or loop_home()) / "store.db"


def registry_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "registry"


def models_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "models"


def snapshots_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "snapshots"


def runs_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "runs"


def reports_dir(home: Path | None = None) -> Path:
    return (home or loop_home()) / "reports"
