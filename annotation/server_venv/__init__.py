"""Programs run by the Argilla server's own interpreter (its virtualenv, ``annotation.install``), never by ours.

The folder, not this package, goes on that interpreter's ``PYTHONPATH`` (``server_venv_path()``),
so each program here is a top-level module there (``python -m loop_argilla_bootstrap``): it may
import the standard library and ``argilla_server``, and nothing of this project.
"""

from __future__ import annotations

from pathlib import Path


def server_venv_path() -> Path:
    """The folder to put on the Argilla interpreter's ``PYTHONPATH`` to run the programs here."""
    return Path(__file__).resolve().parent
