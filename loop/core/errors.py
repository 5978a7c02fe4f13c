"""The one base of every exception this project raises, and how a command line reports one.

Every project exception derives from ``LoopError`` (most also from the built-in they refine, e.g.
``ConfigError`` is a ``ValueError``), so a caller that wants "anything the loop refused" catches
one class, and each CLI ``main()`` catches it once: the message is printed as ``error: ...`` on
stderr and the command exits with the error's ``exit_code``, never with a traceback.
"""

from __future__ import annotations

import sys
from typing import TextIO


class LoopError(Exception):
    """Anything the feedback loop refuses or cannot do; the message says what and, where it can, how to fix it."""

    # What a command line exits with when this error ends it.
    exit_code = 1


class ConfigError(LoopError, ValueError):
    """Every problem found in a configuration, listed together."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if isinstance(problems, str):
            super().__init__(problems)
        else:
            super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def error_exit(exc: LoopError, exit_code: int | None = None, *, stream: TextIO | None = None) -> int:
    """Print ``exc`` for a person (``error: ...`` on stderr) and return the exit code for ``main()``:
    ``exit_code`` when given, else the error's own."""
    print(f"error: {exc}", file=stream or sys.stderr)
    return exc.exit_code if exit_code is None else exit_code
