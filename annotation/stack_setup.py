"""What the local Argilla stack is started with: its generated secrets (kept 0600, never printed or put on
a command line), redis's config, the server's environment, and the one-time database bootstrap."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from annotation.config import StackConfig, bind_address
from annotation.install import venv_dir, venv_python
from annotation.server_venv import server_venv_path
from annotation.stack_parts import StackError, _Layout, _tail


def _load_credentials(layout: _Layout, cfg: StackConfig) -> dict:
    """Owner and reviewer credentials; generated once and kept (mode 0600) so restarts keep the same keys."""
    try:
        creds = json.loads(layout.credentials.read_text())
    except (OSError, ValueError):
        creds = {}
    changed = False
    for role, username in (("owner", cfg.owner_username), ("reviewer", cfg.reviewer_username)):
        entry = creds.get(role) or {}
        if entry.get("username") != username or not entry.get("password") or not entry.get("api_key"):
            entry = {"username": username, "password": secrets.token_urlsafe(12), "api_key": secrets.token_urlsafe(24)}
            creds[role], changed = entry, True
    if changed:
        _write_private(layout.credentials, json.dumps(creds, indent=1))
    return creds


def _load_redis_password(layout: _Layout) -> str:
    """The home's redis password: generated on the first start, then kept (0600)."""
    try:
        password = layout.redis_password.read_text().strip()
    except OSError:
        password = ""
    if not password:
        password = secrets.token_urlsafe(32)  # URL-safe: it goes into ARGILLA_REDIS_URL as is
        _write_private(layout.redis_password, password + "\n")
    return password


def _read_redis_password(layout: _Layout) -> str | None:
    try:
        return layout.redis_password.read_text().strip() or None
    except OSError:
        return None


def _redis_conf(layout: _Layout, cfg: StackConfig, password: str) -> str:
    """redis.conf for the stack's redis: loopback, its own dir, no persistence, the password."""
    quoted_dir = json.dumps(str(layout.redis_dir))  # redis reads double-quoted strings with C-style escapes
    return "\n".join([
        f"port {cfg.redis_port}",
        f"bind {bind_address(cfg.host)}",
        "protected-mode yes",
        f"dir {quoted_dir}",
        'save ""',
        "appendonly no",
        "daemonize no",
        f"requirepass {password}",
        "",
    ])


def _write_private(path: Path, text: str) -> None:
    """Write a secret readable by this user only, never (even briefly) with wider permissions."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _server_env(layout: _Layout, cfg: StackConfig, redis_password: str) -> dict:
    # Drop inherited ARGILLA_* (e.g. a client's ARGILLA_API_URL) and Python path settings of the main venv.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ARGILLA_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        ARGILLA_HOME_PATH=str(layout.server_home),
        ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{layout.server_home / 'argilla.db'}?check_same_thread=False",
        ARGILLA_ELASTICSEARCH=f"http://{bind_address(cfg.host)}:{cfg.search_port}",
        ARGILLA_SEARCH_ENGINE="opensearch",
        # The environment of a process is readable by its user only (unlike its command line).
        ARGILLA_REDIS_URL=f"redis://:{redis_password}@{bind_address(cfg.host)}:{cfg.redis_port}/0",
        HF_HUB_OFFLINE="1",  # no telemetry calls home, no hub look-ups
        HF_HUB_DISABLE_TELEMETRY="1",
        TMPDIR=str(layout.tmp),
    )
    return env


def _bootstrap(layout: _Layout, cfg: StackConfig, creds: dict, env: dict, reindex: bool) -> None:
    params = {
        "workspace": cfg.workspace,
        "reindex": reindex,
        "users": [dict(creds["owner"], role="owner"), dict(creds["reviewer"], role="annotator")],
    }
    logfile = layout.logfile("bootstrap")
    with open(logfile, "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} migrate, users{', reindex' if reindex else ''}\n")
        out.flush()
        try:
            # The program is a module of its own (annotation/server_venv/loop_argilla_bootstrap.py); only its
            # folder goes on the path, so the server's interpreter sees none of this project's other modules.
            done = subprocess.run([str(venv_python(venv_dir(cfg.venv_dir))), "-m", "loop_argilla_bootstrap"],
                                  input=json.dumps(params), text=True, stdout=out, stderr=subprocess.STDOUT,
                                  env=dict(env, PYTHONPATH=str(server_venv_path())), cwd=layout.root,
                                  timeout=cfg.startup_timeout_s * 3)
        except subprocess.TimeoutExpired:
            raise StackError(f"database migration/bootstrap timed out; see {logfile}:\n{_tail(logfile)}") from None
    if done.returncode != 0:
        raise StackError(f"database migration/bootstrap failed (exit {done.returncode}); last lines of {logfile}:\n"
                         f"{_tail(logfile)}")
