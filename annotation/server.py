"""The local Argilla stack: `python -m annotation.server start|stop|status`.

Four processes, each started detached with its own pid file under $LOOP_HOME/argilla/run/:
  search  osmem-server, an in-memory OpenSearch-compatible server (Argilla's record index)
  redis   Debian's redis-server on its own port and dir (Argilla's background-job queue)
  server  argilla-server (REST API + UI), SQLite under $LOOP_HOME/argilla/server/
  worker  argilla-server's rq worker (bulk jobs, dataset deletion, webhooks)
SQLite is the source of truth; the index lives in memory, so whenever the search server is fresh `start` rebuilds
it from SQLite ("search-engine reindex") before the UI comes up, and reviews survive restarts.

Security contract: every part listens on `StackConfig.host`, which must be a loopback address (validated), so
nothing is reachable from the network. Redis requires a password (Argilla's worker unpickles the jobs it reads
from redis, so whoever can write to redis can run code as this user): generated once per home, kept in
$LOOP_HOME/argilla/redis_password (0600), handed to redis through a 0600 config file and to the server and
worker through their environment, never on a command line (other users can read command lines). osmem-server
has no authentication option, so loopback is all that guards the record index. Passwords and API keys are
written 0600 and never printed.

Setting ARGILLA_API_URL and ARGILLA_API_KEY points everything at another Argilla; the local stack is then not started.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional

from annotation.config import StackConfig, bind_address
from annotation.install import is_installed, osmem_binary, venv_dir, venv_python
from loop.paths import loop_home

log = logging.getLogger("annotation.server")

PARTS = ("search", "redis", "worker", "server")  # start order; stop runs in reverse
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes this interpreter started, kept so they can be reaped


class StackError(RuntimeError):
    """A part of the stack could not be started or is misconfigured; the message says which and why."""


@dataclass
class StackInfo:
    """How to reach a running stack. The reviewer fields are None for an external server."""

    api_url: str
    api_key: str
    home: Optional[Path] = None  # LOOP_HOME of a local stack
    workspace: str = "feedback"
    owner_username: Optional[str] = None
    owner_password: Optional[str] = None
    reviewer_username: Optional[str] = None
    reviewer_password: Optional[str] = None
    reviewer_api_key: Optional[str] = None
    external: bool = False  # True when ARGILLA_API_URL/ARGILLA_API_KEY point elsewhere
    already_running: bool = False  # True when `start` found every part running and healthy
    startup_seconds: float = 0.0


class _Layout:
    """Where a stack keeps its files under $LOOP_HOME/argilla/."""

    def __init__(self, home: Optional[Path]):
        self.home = Path(home).absolute() if home else loop_home()
        self.root = self.home / "argilla"
        self.run = self.root / "run"
        self.logs = self.root / "logs"
        self.server_home = self.root / "server"  # ARGILLA_HOME_PATH: argilla.db lives here
        self.redis_dir = self.root / "redis"
        self.tmp = self.root / "tmp"  # the server copies its UI statics to a temp dir at every start
        self.api_key = self.root / "api_key"
        self.credentials = self.root / "credentials.json"
        self.redis_password = self.root / "redis_password"
        self.redis_conf = self.redis_dir / "redis.conf"  # holds the password: written 0600 at every start
        self.stack_json = self.run / "stack.json"  # ports of the running stack, for status/stop/info

    def pidfile(self, part: str) -> Path:
        return self.run / f"{part}.json"

    def logfile(self, part: str) -> Path:
        return self.logs / f"{part}.log"


def external_connection() -> Optional[tuple[str, str]]:
    """(url, key) when ARGILLA_API_URL and ARGILLA_API_KEY are both set, else None."""
    url, key = os.environ.get("ARGILLA_API_URL"), os.environ.get("ARGILLA_API_KEY")
    return (url.rstrip("/"), key) if url and key else None


# ---------------------------------------------------------------- processes we own


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks since boot) of a live pid, None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces; skip past it
    return fields[0], int(fields[19])


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)


def _owned_pid(layout: _Layout, part: str) -> Optional[int]:
    """The pid recorded for `part` if that exact process is still running, else None.

    A pid is trusted only when its start time and executable match those recorded at launch (pids get reused)
    and its command line still shows the recorded tokens (redis rewrites its title, so tokens, not the argv)."""
    try:
        record = json.loads(layout.pidfile(part).read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    _reap(pid)
    for attempt in range(3):
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X") or stat[1] != record["starttime"]:
            return None
        if _proc_exe(pid) != record.get("exe"):
            return None
        if all(token in _proc_cmdline(pid) for token in record["match"]):
            return pid
        time.sleep(0.02)  # redis may be rewriting its title this very moment: look again before giving up
    return None


def _proc_exe(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _launch(layout: _Layout, part: str, argv: list[str], env: dict, match: list[str], cwd: Path) -> int:
    logfile = layout.logfile(part)
    with open(logfile, "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n")
        out.flush()
        # A new session makes the part its own process group, so stop can end its children (rq's pool forks)
        # without touching anything else.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    stat = _proc_stat(proc.pid)
    record = {"part": part, "pid": proc.pid, "starttime": stat[1] if stat else -1, "exe": _proc_exe(proc.pid),
              "argv": argv, "match": match}
    layout.pidfile(part).write_text(json.dumps(record, indent=1))
    return proc.pid


def _terminate(layout: _Layout, parts: tuple[str, ...], grace_s: float = 15.0) -> dict[str, Optional[int]]:
    """End the process groups of `parts` that we started (signalled together, so their shutdowns overlap).

    Returns {part: pid stopped, or None when it was not running (a stale pid file is just removed)}."""
    targets: dict[str, tuple[int, Optional[int]]] = {}
    for part in parts:
        pid = _owned_pid(layout, part)
        if pid is not None:
            group = pid if _safe_pgid(pid) == pid else None
            targets[part] = (pid, group)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM) if group else os.kill(pid, signal.SIGTERM)
        layout.pidfile(part).unlink(missing_ok=True)  # only once signalled: a crash above must not orphan it
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_group_alive(*t) for t in targets.values()):
        time.sleep(0.1)
    for part, (pid, group) in targets.items():
        if _group_alive(pid, group):
            log.warning("%s (pid %s) ignored SIGTERM for %.0f s; killing it", part, pid, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
        _reap(pid)
    return {part: targets[part][0] if part in targets else None for part in parts}


def _safe_pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _group_alive(pid: int, group: Optional[int]) -> bool:
    """Is the leader, or any member of the process group we created for it, still there?"""
    _reap(pid)  # our own dead child would linger as a zombie (and keep the group "alive") until reaped
    if group is None:
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- health checks


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _resp(*command: str) -> bytes:
    return (f"*{len(command)}\r\n" + "".join(f"${len(c.encode())}\r\n{c}\r\n" for c in command)).encode()


def _redis(host: str, port: int, *command: str, password: Optional[str] = None) -> Optional[bytes]:
    """Send one command in the RESP protocol (after AUTH when a password is given) and return the first line of
    its reply, or of the AUTH reply when that is not +OK. No client library: the main venv has none."""
    commands = ([("AUTH", password)] if password is not None else []) + [command]
    try:
        with socket.create_connection((bind_address(host), port), timeout=1) as sock:
            sock.sendall(b"".join(_resp(*c) for c in commands))
            data = b""
            while data.count(b"\r\n") < len(commands):  # every reply used here is one line
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    lines = data.split(b"\r\n")
    if password is not None and lines[0] != b"+OK":
        return lines[0]
    return lines[len(commands) - 1] if len(lines) >= len(commands) else None


def _redis_int(host: str, port: int, *command: str, password: Optional[str] = None) -> int:
    reply = _redis(host, port, *command, password=password) or b""
    return int(reply[1:]) if reply[:1] == b":" else -1


def _checks(cfg: StackConfig, redis_password: Optional[str]) -> dict[str, Callable[[], bool]]:
    h = bind_address(cfg.host)
    pw = redis_password
    return {
        "search": lambda: _http_ok(f"http://{h}:{cfg.search_port}/"),
        # Healthy means it accepted the stack's password: a redis without one is not this stack's redis.
        "redis": lambda: pw is not None and _redis(h, cfg.redis_port, "PING", password=pw) == b"+PONG",
        # rq registers each worker in this set once it listens on the queues.
        "worker": lambda: pw is not None and _redis_int(h, cfg.redis_port, "SCARD", "rq:workers", password=pw) > 0,
        # /api/v1/status answers only after the lifespan pinged the database, the search engine and redis.
        "server": lambda: _http_ok(f"http://{h}:{cfg.port}/api/v1/status"),
    }


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_healthy(layout: _Layout, part: str, pid: int, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if _owned_pid(layout, part) != pid:
            raise StackError(f"{part} (pid {pid}) exited during startup; last lines of {layout.logfile(part)}:\n"
                             f"{_tail(layout.logfile(part))}")
        if time.monotonic() > deadline:
            raise StackError(f"{part} (pid {pid}) not healthy after {timeout_s:.0f} s; last lines of "
                             f"{layout.logfile(part)}:\n{_tail(layout.logfile(part))}")
        time.sleep(0.1)


# ---------------------------------------------------------------- credentials and bootstrap


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


def _read_redis_password(layout: _Layout) -> Optional[str]:
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


# Runs inside the argilla-server venv: migrations, users and reindex in ONE interpreter, because each
# `python -m argilla_server ...` call spends ~4 s of CPU importing the server. Parameters arrive as JSON on stdin so
# secrets never show on a command line.
_BOOTSTRAP = r"""
import asyncio, importlib.util, json, sys, types
p = json.load(sys.stdin)
# argilla_server/__init__.py builds the whole web app (and copies 14 MB of UI files) on import; the bootstrap
# needs none of it. A bare package object lets the submodules import without running __init__ (~2 s less CPU).
spec = importlib.util.find_spec("argilla_server")
pkg = types.ModuleType("argilla_server")
pkg.__path__, pkg.__file__, pkg.__spec__ = list(spec.submodule_search_locations), spec.origin, spec
sys.modules["argilla_server"] = pkg
from argilla_server.cli.database.migrate import migrate_db
migrate_db(revision="head")
from argilla_server.contexts import accounts
from argilla_server.database import AsyncSessionLocal
from argilla_server.models import User, UserRole, Workspace, WorkspaceUser

async def ensure_users():
    async with AsyncSessionLocal() as db:
        ws = await Workspace.get_by(db, name=p["workspace"]) or await accounts.create_workspace(db, {"name": p["workspace"]})
        for u in p["users"]:
            user = await accounts.get_user_by_username(db, u["username"])
            if user is None:
                user = await User.create(db, first_name=u["username"], username=u["username"], role=UserRole(u["role"]),
                                         password_hash=accounts.hash_password(u["password"]), api_key=u["api_key"])
                print("created user", u["username"], u["role"])
            else:  # the credentials file is the source of truth: realign a user whose file was regenerated
                changes = {}
                if user.api_key != u["api_key"]:
                    changes["api_key"] = u["api_key"]
                if user.role != UserRole(u["role"]):
                    changes["role"] = UserRole(u["role"])
                if not accounts.verify_password(u["password"], user.password_hash):
                    changes["password_hash"] = accounts.hash_password(u["password"])
                if changes:
                    await user.update(db, **changes)
                    print("updated user", u["username"], sorted(changes))
            if await WorkspaceUser.get_by(db, workspace_id=ws.id, user_id=user.id) is None:
                await WorkspaceUser.create(db, workspace_id=ws.id, user_id=user.id)

asyncio.run(ensure_users())
if p["reindex"]:
    from argilla_server.cli.search_engine.reindex import _reindex
    asyncio.run(_reindex())
    print("search index rebuilt from the database")
"""


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
            done = subprocess.run([str(venv_python(venv_dir(cfg.venv_dir))), "-c", _BOOTSTRAP], input=json.dumps(params),
                                  text=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=layout.root,
                                  timeout=cfg.startup_timeout_s * 3)
        except subprocess.TimeoutExpired:
            raise StackError(f"database migration/bootstrap timed out; see {logfile}:\n{_tail(logfile)}") from None
    if done.returncode != 0:
        raise StackError(f"database migration/bootstrap failed (exit {done.returncode}); last lines of {logfile}:\n"
                         f"{_tail(logfile)}")


# ---------------------------------------------------------------- public API


def _config(cfg: Optional[StackConfig], port: Optional[int]) -> StackConfig:
    cfg = cfg or StackConfig()
    if port is not None:
        cfg = replace(cfg, port=port)
    problems = cfg.validate()
    if problems:
        raise StackError("invalid stack config:\n  " + "\n  ".join(problems))
    return cfg


def _recorded_config(layout: _Layout) -> Optional[StackConfig]:
    try:
        data = json.loads(layout.stack_json.read_text())
    except (OSError, ValueError):
        return None
    known = {f.name for f in fields(StackConfig)}  # tolerate a file written by another version
    data = {k: v for k, v in data.items() if k in known}
    data["venv_dir"] = Path(data["venv_dir"]) if data.get("venv_dir") else None
    return StackConfig(**data)


@contextlib.contextmanager
def _locked(layout: _Layout):
    """Serialise start/stop of one LOOP_HOME (two test sessions, a CLI call during a test...)."""
    layout.run.mkdir(parents=True, exist_ok=True)
    with open(layout.run / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _api_url(cfg: StackConfig) -> str:
    return f"http://{bind_address(cfg.host)}:{cfg.port}"


def _info(layout: _Layout, cfg: StackConfig, creds: dict, **extra) -> StackInfo:
    return StackInfo(
        api_url=_api_url(cfg), api_key=creds["owner"]["api_key"], home=layout.home,
        workspace=cfg.workspace, owner_username=creds["owner"]["username"], owner_password=creds["owner"]["password"],
        reviewer_username=creds["reviewer"]["username"], reviewer_password=creds["reviewer"]["password"],
        reviewer_api_key=creds["reviewer"]["api_key"], **extra,
    )


def start_stack(home: Optional[Path] = None, port: Optional[int] = None, config: Optional[StackConfig] = None,
                *, use_external: bool = True) -> StackInfo:
    """Bring up the local stack (each missing part), wait until healthy and return how to reach it.

    Idempotent: parts already running are kept; when all are, nothing is done (`already_running=True`).
    With ARGILLA_API_URL and ARGILLA_API_KEY set (and use_external), nothing starts and those are returned."""
    external = external_connection() if use_external else None
    if external:
        log.info("using the external Argilla server at %s (ARGILLA_API_URL); the local stack is not started",
                 external[0])
        return StackInfo(api_url=external[0], api_key=external[1], external=True)
    cfg, layout = _config(config, port), _Layout(home)
    venv = venv_dir(cfg.venv_dir)
    if not is_installed(venv):
        raise StackError(f"the argilla-server environment is missing at {venv}; run `python -m annotation.install`")
    if shutil.which(cfg.redis_server_bin) is None:
        raise StackError(f"{cfg.redis_server_bin!r} not found; install Debian's redis-server (apt-get install "
                         "redis-server) or set StackConfig.redis_server_bin")
    started = time.monotonic()
    with _locked(layout):
        for d in (layout.logs, layout.server_home, layout.redis_dir, layout.tmp):
            d.mkdir(parents=True, exist_ok=True)
        recorded = _recorded_config(layout)
        running = {part: _owned_pid(layout, part) for part in PARTS}
        where = lambda c: (c.host, c.port, c.search_port, c.redis_port)  # noqa: E731
        if any(running.values()) and recorded and where(recorded) != where(cfg):
            raise StackError(f"a stack is already running in {layout.root} on other ports (argilla {recorded.port}, "
                             f"search {recorded.search_port}, redis {recorded.redis_port}); stop it first")
        creds = _load_credentials(layout, cfg)
        _write_private(layout.api_key, creds["owner"]["api_key"])
        redis_password = _load_redis_password(layout)
        checks = _checks(cfg, redis_password)
        if all(running.values()) and all(checks[p]() for p in PARTS):
            log.info("the Argilla stack is already running at %s", _api_url(cfg))
            return _info(layout, cfg, creds, already_running=True)
        if running["redis"] and not checks["redis"]():
            raise StackError(f"the running redis (pid {running['redis']}) does not accept this stack's password "
                             f"({layout.redis_password}); stop the stack and start it again")
        env = _server_env(layout, cfg, redis_password)
        ports = {"search": cfg.search_port, "redis": cfg.redis_port, "server": cfg.port}
        for part, p in ports.items():
            if not running[part] and _port_open(bind_address(cfg.host), p):
                flag = "--port" if part == "server" else f"--{part}-port"
                raise StackError(f"port {p} for the {part} part is already in use by a process this stack did "
                                 f"not start; free it or choose another port (StackConfig or {flag})")
        layout.stack_json.write_text(json.dumps(asdict(cfg), default=str, indent=1))
        if not running["redis"]:
            _write_private(layout.redis_conf, _redis_conf(layout, cfg, redis_password))
        venv_py = str(venv_python(venv))
        search_addr = f"{bind_address(cfg.host)}:{cfg.search_port}"
        argvs = {
            # osmem-server has no authentication option: binding to loopback is what keeps the index private.
            "search": [str(osmem_binary(venv)), "--addr", search_addr, "--no-stdin-watch", "--no-ja"],
            "redis": [cfg.redis_server_bin, str(layout.redis_conf)],
            "worker": [venv_py, "-m", "argilla_server", "worker", "--num-workers", str(cfg.worker_processes)],
            "server": [venv_py, "-m", "argilla_server", "start", "--host", bind_address(cfg.host),
                       "--port", str(cfg.port), "--no-access-log"],
        }
        match = {"search": [search_addr], "redis": ["redis-server", str(cfg.redis_port)],
                 "worker": ["argilla_server worker"], "server": ["argilla_server start", str(cfg.port)]}
        pids = dict(running)
        t0 = {part: time.monotonic() for part in PARTS}

        def launch(part: str) -> None:
            if not pids[part]:
                t0[part] = time.monotonic()
                pids[part] = _launch(layout, part, argvs[part], env, match[part], layout.root)

        def healthy(part: str) -> None:
            if not running[part]:
                _wait_healthy(layout, part, pids[part], checks[part], cfg.startup_timeout_s)
                log.info("%-6s started (pid %s) in %.1f s", part, pids[part], time.monotonic() - t0[part])

        try:
            fresh_search = not running["search"]
            for part in ("search", "redis"):
                launch(part)
                healthy(part)
            # Each Argilla process spends seconds importing; overlap them. The worker can always start early;
            # the server only once the database has its tables (its startup queries the users table), so on
            # the very first start it waits for the migrations.
            first_start = not (layout.server_home / "argilla.db").exists()
            launch("worker")
            if not first_start:
                launch("server")
            t_boot = time.monotonic()
            _bootstrap(layout, cfg, creds, env, reindex=fresh_search)
            log.info("database migrated, users ready%s in %.1f s", ", index rebuilt" if fresh_search else "",
                     time.monotonic() - t_boot)
            launch("server")
            healthy("server")
            healthy("worker")
        except BaseException:
            # Leave nothing half-started behind: stop the parts this call launched.
            _terminate(layout, tuple(p for p in reversed(PARTS) if pids[p] and not running[p]))
            if not any(_owned_pid(layout, part) for part in PARTS):
                layout.stack_json.unlink(missing_ok=True)
            raise
    elapsed = time.monotonic() - started
    log.info("Argilla is up at %s in %.1f s (owner API key in %s)", _api_url(cfg), elapsed, layout.api_key)
    return _info(layout, cfg, creds, startup_seconds=elapsed)


def stop_stack(home: Optional[Path] = None) -> dict[str, Optional[int]]:
    """Stop the parts this stack started (pid files verified); returns {part: pid stopped or None}."""
    layout = _Layout(home)
    if not layout.run.exists():
        return {part: None for part in PARTS}
    with _locked(layout):
        # Clients first (server, worker), then what they talk to, so neither logs connection errors on the way out.
        stopped = _terminate(layout, ("server", "worker")) | _terminate(layout, ("redis", "search"))
        layout.stack_json.unlink(missing_ok=True)
        shutil.rmtree(layout.tmp, ignore_errors=True)  # the server's per-start copies of its UI statics
    for part, pid in stopped.items():
        log.info("%-6s %s", part, f"stopped (pid {pid})" if pid else "was not running")
    return stopped


def stack_status(home: Optional[Path] = None) -> dict:
    """{"external", "api_url", "running", "parts": {part: {"pid", "alive", "healthy", "log"}}}."""
    external = external_connection()
    layout = _Layout(home)
    cfg = _recorded_config(layout) or StackConfig()
    checks = _checks(cfg, _read_redis_password(layout))
    parts = {}
    for part in PARTS:
        pid = _owned_pid(layout, part)
        parts[part] = {"pid": pid, "alive": pid is not None, "healthy": bool(pid) and checks[part](),
                       "log": str(layout.logfile(part))}
    return {
        "external": bool(external),
        "api_url": external[0] if external else _api_url(cfg),
        "home": str(layout.home),
        "running": all(p["healthy"] for p in parts.values()),
        "parts": parts,
    }


def connection(home: Optional[Path] = None) -> tuple[str, str]:
    """(api_url, api_key) to use: ARGILLA_API_URL/ARGILLA_API_KEY when set, else the local stack's files."""
    external = external_connection()
    if external:
        return external
    layout = _Layout(home)
    cfg = _recorded_config(layout) or StackConfig()
    try:
        key = layout.api_key.read_text().strip()
    except OSError:
        raise StackError(f"no API key at {layout.api_key}; run `python -m annotation.server start` or set "
                         "ARGILLA_API_URL and ARGILLA_API_KEY") from None
    return _api_url(cfg), key


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotation.server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start every part that is not running and wait until healthy")
    defaults = StackConfig()
    start.add_argument("--port", type=int, default=defaults.port, help="Argilla UI/API port")
    start.add_argument("--search-port", type=int, default=defaults.search_port, help="search server port")
    start.add_argument("--redis-port", type=int, default=defaults.redis_port, help="redis port")
    start.add_argument("--timeout", type=float, default=defaults.startup_timeout_s, help="seconds per part")
    sub.add_parser("stop", help="stop the processes this stack started")
    status = sub.add_parser("status", help="report each part")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if args.command == "start":
            cfg = replace(defaults, port=args.port, search_port=args.search_port, redis_port=args.redis_port,
                          startup_timeout_s=args.timeout)
            info = start_stack(config=cfg)
            if not info.external:
                # Terminals are logged and shared: say where the secrets are, never what they are.
                print(f"UI: {info.api_url}  users: {info.owner_username} (owner), {info.reviewer_username} "
                      f"(reviewer); passwords and API keys in {_Layout(info.home).credentials}")
        elif args.command == "stop":
            stop_stack()
        else:
            report = stack_status()
            if args.json:
                print(json.dumps(report, indent=1))
            else:
                if report["external"]:
                    print(f"using the external Argilla server at {report['api_url']}")
                for part, st in report["parts"].items():
                    state = "healthy" if st["healthy"] else "alive, not healthy" if st["alive"] else "not running"
                    print(f"{part:7} {state:20} pid {st['pid'] or '-'}")
            return 0 if report["running"] or report["external"] else 3
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
