"""The local Argilla stack's parts: where their files live, the processes this stack owns, and their
health checks (``annotation.server`` states the stack's contract and starts and stops it)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from annotation.config import StackConfig, bind_address
from loop.core.errors import LoopError
from loop.core.paths import loop_home

log = logging.getLogger("annotation.server")

PARTS = ("search", "redis", "worker", "server")  # start order; stop runs in reverse
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes this interpreter started, kept so they can be reaped


class StackError(LoopError, RuntimeError):
    """A part of the stack could not be started or is misconfigured; the message says which and why."""


class _Layout:
    """Where a stack keeps its files under $LOOP_HOME/argilla/."""

    def __init__(self, home: Path | None):
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


# ---------------------------------------------------------------- processes we own


def _proc_stat(pid: int) -> tuple[str, int] | None:
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


def _owned_pid(layout: _Layout, part: str) -> int | None:
    """The pid recorded for `part` if that exact process is still running, else None.

    A pid is trusted only when its start time and executable match those recorded at launch (pids get reused)
    and its command line shows the recorded tokens (redis rewrites its title, so tokens, not the argv) or is
    still the argv it was launched with: a part that has not rewritten its title yet (redis on a busy machine
    can take well over 60 ms) is starting, not dead."""
    try:
        record = json.loads(layout.pidfile(part).read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    _reap(pid)
    for _attempt in range(3):
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X") or stat[1] != record["starttime"]:
            return None
        if _proc_exe(pid) != record.get("exe"):
            return None
        cmdline = _proc_cmdline(pid)
        launched_as = " ".join(record.get("argv") or [])
        if all(token in cmdline for token in record["match"]) or (launched_as and cmdline.rstrip() == launched_as):
            return pid
        time.sleep(0.02)  # redis may be rewriting its title this very moment: look again before giving up
    return None


def _proc_exe(pid: int) -> str | None:
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


def _terminate(layout: _Layout, parts: tuple[str, ...], grace_s: float = 15.0) -> dict[str, int | None]:
    """End the process groups of `parts` that we started (signalled together, so their shutdowns overlap).

    Returns {part: pid stopped, or None when it was not running (a stale pid file is just removed)}."""
    targets: dict[str, tuple[int, int | None]] = {}
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


def _safe_pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _group_alive(pid: int, group: int | None) -> bool:
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


def _redis(host: str, port: int, *command: str, password: str | None = None) -> bytes | None:
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


def _redis_int(host: str, port: int, *command: str, password: str | None = None) -> int:
    reply = _redis(host, port, *command, password=password) or b""
    return int(reply[1:]) if reply[:1] == b":" else -1


def _checks(cfg: StackConfig, redis_password: str | None) -> dict[str, Callable[[], bool]]:
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
