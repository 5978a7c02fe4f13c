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
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from annotation.config import StackConfig, bind_address
from annotation.install import is_installed, osmem_binary, venv_dir, venv_python
from annotation.stack_parts import (
    PARTS,
    StackError,
    _checks,
    _launch,
    _Layout,
    _owned_pid,
    _port_open,
    _terminate,
    _wait_healthy,
)
from annotation.stack_setup import (
    _bootstrap,
    _load_credentials,
    _load_redis_password,
    _read_redis_password,
    _redis_conf,
    _server_env,
    _write_private,
)
from loop.core.errors import LoopError, error_exit

log = logging.getLogger("annotation.server")


@dataclass
class StackInfo:
    """How to reach a running stack. The reviewer fields are None for an external server."""

    api_url: str
    api_key: str
    home: Path | None = None  # LOOP_HOME of a local stack
    workspace: str = "feedback"
    owner_username: str | None = None
    owner_password: str | None = None
    reviewer_username: str | None = None
    reviewer_password: str | None = None
    reviewer_api_key: str | None = None
    external: bool = False  # True when ARGILLA_API_URL/ARGILLA_API_KEY point elsewhere
    already_running: bool = False  # True when `start` found every part running and healthy
    startup_seconds: float = 0.0


def external_connection() -> tuple[str, str] | None:
    """(url, key) when ARGILLA_API_URL and ARGILLA_API_KEY are both set, else None."""
    url, key = os.environ.get("ARGILLA_API_URL"), os.environ.get("ARGILLA_API_KEY")
    return (url.rstrip("/"), key) if url and key else None


# ---------------------------------------------------------------- public API


def _config(cfg: StackConfig | None, port: int | None) -> StackConfig:
    cfg = cfg or StackConfig()
    if port is not None:
        cfg = replace(cfg, port=port)
    problems = cfg.validate()
    if problems:
        raise StackError("invalid stack config:\n  " + "\n  ".join(problems))
    return cfg


def _recorded_config(layout: _Layout) -> StackConfig | None:
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


def start_stack(home: Path | None = None, port: int | None = None, config: StackConfig | None = None,
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


def stop_stack(home: Path | None = None) -> dict[str, int | None]:
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


def stack_status(home: Path | None = None) -> dict:
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


def connection(home: Path | None = None) -> tuple[str, str]:
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


def main(argv: list[str] | None = None) -> int:
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
    except LoopError as exc:
        return error_exit(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
