"""Skips that cannot hide a failure.

Outside CI a test whose part is not installed (the Argilla server's virtualenv, Playwright, torch,
an extra) skips with the command that installs it. Under CI (the ``CI`` environment variable set to
anything but empty, ``0``, ``false`` or ``no``, as CI services set it) the same test FAILS: CI runs
``make test``, whose setup installs every part, so a missing one there is a broken setup or pin,
never a reason to report green.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip (fail under CI) the calling test, or the whole module when called at import time."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing part fails the run instead of skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_skip(name: str) -> ModuleType:
    """``pytest.importorskip`` that fails under CI instead of skipping."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"{name} cannot be imported ({exc}); `make setup` installs it")
        raise  # not reached: skip_or_fail always raises
