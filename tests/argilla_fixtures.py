"""Fixtures for tests that need a real Argilla server (imported by tests/conftest.py for every package).

`argilla_stack` (session scope) starts ONE local Argilla stack for the whole test session, in a temporary
LOOP_HOME and on free ports, and yields an `annotation.server.StackInfo`:

    info.api_url            e.g. "http://127.0.0.1:41237"
    info.api_key            the owner's API key (also in info.home / "argilla" / "api_key")
    info.home               the temporary LOOP_HOME (a Path)
    info.workspace          "feedback" (already created)
    info.owner_username / info.owner_password
    info.reviewer_username / info.reviewer_password / info.reviewer_api_key   (role annotator, in `feedback`)

    def test_push(argilla_stack):
        client = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)

The stack is shared: give datasets unique names (e.g. with uuid4) and delete what you create if it matters.
It is stopped after the session. ARGILLA_API_URL/ARGILLA_API_KEY are ignored here: tests always use the local stack.
The only reason it skips is a missing argilla-server virtualenv ($LOOP_TOOLS/argilla-venv, made by
`python -m annotation.install`), and under CI (``CI`` set, see tests/skips.py) even that FAILS: CI's setup
installs the stack, so a missing one is a broken setup, not a reason to report green. Any other failure to
start is a test error with the failing part's log tail.

`new_stack_config(**overrides)` (a fixture returning a factory) gives a StackConfig on fresh free ports using the
installed virtualenv, for tests that run a stack of their own; `stack_home` is an empty LOOP_HOME for such a stack
(whatever runs in it is stopped when the test ends).
The UI helper `login(page, url, username, password)` lives in test_annotation_ui.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from skips import skip_or_fail

from annotation.config import StackConfig
from annotation.install import is_installed
from annotation.server import start_stack, stop_stack

REPO_ROOT = Path(__file__).resolve().parents[1]
# Captured before any test changes LOOP_HOME: the venv is a setup-time tool shared by every test home.
TOOLS_DIR = Path(os.environ["LOOP_TOOLS"]).absolute() if os.environ.get("LOOP_TOOLS") else REPO_ROOT / ".loop" / "tools"
ARGILLA_VENV = TOOLS_DIR / "argilla-venv"


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (all bound at once so they cannot repeat)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def stack_config(**overrides) -> StackConfig:
    """A StackConfig on free ports using the installed argilla venv; skips the test when it is not installed
    (fails it under CI)."""
    if not is_installed(ARGILLA_VENV):
        skip_or_fail(f"argilla-server virtualenv not installed at {ARGILLA_VENV}; run `python -m annotation.install`")
    port, search_port, redis_port = free_ports(3)
    fields = dict(port=port, search_port=search_port, redis_port=redis_port, venv_dir=ARGILLA_VENV,
                  startup_timeout_s=180.0)  # generous: CI's 2 cores may be busy with other tests
    fields.update(overrides)
    return StackConfig(**fields)


@contextlib.contextmanager
def _private_home():
    """A LOOP_HOME outside pytest's shared numbered temp dirs: a concurrent pytest session on the same machine
    prunes those and once deleted a running stack's pid files and temp dir from under it."""
    home = Path(tempfile.mkdtemp(prefix="loop-argilla-test-"))
    try:
        yield home
    finally:
        stop_stack(home)  # whatever the test left running, stop it before its files go
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def argilla_stack():
    """A running local Argilla stack shared by the session (see the module docstring)."""
    config = stack_config()
    with _private_home() as home:
        yield start_stack(home=home, config=config, use_external=False)


@pytest.fixture
def stack_home():
    """An empty LOOP_HOME for a test that runs its own stack; any stack left running in it is stopped after."""
    with _private_home() as home:
        yield home


@pytest.fixture
def new_stack_config():
    """Factory: new_stack_config(**overrides) -> StackConfig on free ports (skips if the venv is missing)."""
    return stack_config
