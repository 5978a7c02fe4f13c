"""Connecting to Argilla: any deployment by environment, else the local stack under LOOP_HOME.

``ARGILLA_API_URL`` / ``ARGILLA_API_KEY`` point at any Argilla (a Space, a docker deployment);
without them the local stack is used: ``http://127.0.0.1:6900`` (or ``annotation.api_url``) with
the owner key that ``python -m annotation.server start`` writes to ``$LOOP_HOME/argilla/api_key``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from annotation.config import AnnotationConfig
from loop.core import paths
from loop.core.errors import LoopError

DEFAULT_API_URL = "http://127.0.0.1:6900"


class ArgillaUnavailable(LoopError, RuntimeError):
    """Argilla cannot be reached or no credentials are configured; the message says how to fix it."""


@dataclass(frozen=True)
class Credentials:
    api_url: str
    api_key: str
    source: str  # "env" or the key file's path


def api_key_file(home: Path | None = None) -> Path:
    return (home or paths.loop_home()) / "argilla" / "api_key"


def credentials(config: AnnotationConfig | None = None) -> Credentials:
    """Where to connect: the environment first, then the config's URL, then the local stack."""
    config = config or AnnotationConfig()
    url = os.environ.get("ARGILLA_API_URL") or config.api_url
    key = os.environ.get("ARGILLA_API_KEY")
    if key:
        return Credentials((url or DEFAULT_API_URL).rstrip("/"), key, "env")
    if not url:
        # The local stack records the ports it was started on (they need not be the defaults).
        from annotation.server import StackError, connection

        try:
            local_url, local_key = connection()
            return Credentials(local_url, local_key, str(api_key_file()))
        except StackError:
            url = DEFAULT_API_URL
    key_file = api_key_file()
    if not key_file.is_file():
        raise ArgillaUnavailable(
            f"no Argilla API key: set ARGILLA_API_KEY (with ARGILLA_API_URL for a remote Argilla) or start the "
            f"local stack with `python -m annotation.server start`, which writes {key_file}"
        )
    return Credentials(url.rstrip("/"), key_file.read_text().strip(), str(key_file))


def connect(config: AnnotationConfig | None = None, *, api_url: str | None = None, api_key: str | None = None,
            retries: int = 2):
    """An ``argilla.Argilla`` client, checked with one request so a dead server fails here, clearly."""
    import argilla as rg  # imported late: the SDK is heavy and only needed when talking to Argilla

    config = config or AnnotationConfig()
    if api_url is None or api_key is None:
        creds = credentials(config)
        api_url, api_key = api_url or creds.api_url, api_key or creds.api_key
    try:
        client = rg.Argilla(api_url=api_url, api_key=api_key, timeout=config.request_timeout_s, retries=retries)
        client.me  # noqa: B018 - one authenticated round-trip
    except Exception as exc:
        raise ArgillaUnavailable(f"cannot use Argilla at {api_url}: {type(exc).__name__}: {exc}") from exc
    return client
