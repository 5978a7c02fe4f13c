"""``python -m loop.schedule``: run the loop on a schedule (APScheduler), one cycle at a time.

- The job store is SQLite under ``$LOOP_HOME/scheduler.db``, so the schedule (and a run that
  was due while the daemon was down) survives restarts.
- ``max_instances=1`` and ``coalesce=True``: a slow cycle never overlaps the next, and runs
  missed while it trained collapse into one; ``misfire_grace_time`` bounds how late a run may be.
  Each cycle also takes the cycle lock (``loop.lock``), so even two daemons cannot overlap.
- Each cycle runs in a child process (``python -m loop.cycle --json``): training's memory is
  returned to the OS after every cycle, and a crash in a cycle cannot take the daemon down.
  The child gets the daemon's config file (``--config``, ``$LOOP_CONFIG`` or
  ``$LOOP_HOME/config.toml``, resolved once at start) as ``--config <absolute path>``, so the
  cycles run with exactly the config the daemon was started with.
- SIGTERM/SIGINT: stop scheduling, let the cycle in flight end (it is resumable anyway if the
  supervisor kills it), then exit 0.
- Optional webhook (``schedule.webhook_port``): at start the daemon registers
  ``http://127.0.0.1:<port>/`` in Argilla for ``record.completed`` (or reuses the webhook already
  registered there) and keeps the signing secret Argilla returns. Every event must carry a valid
  Standard Webhooks signature (``webhook-id``/``webhook-timestamp``/``webhook-signature``, checked
  with the ``standardwebhooks`` package, timestamps older or newer than 5 minutes refused) or it
  is answered 401 and ignored; a repeated ``webhook-id`` is acknowledged but counted once. A bad
  Content-Length, a body that is not a JSON object, or one over 1 MiB gets a 4xx, never a 500.
  After ``schedule.webhook_min_records`` signed ``record.completed`` events the next cycle is
  pulled forward to now. When Argilla cannot be reached at start, the daemon runs without the
  webhook (scheduled cycles are unaffected) and says so in its log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loop.config import LoopConfig, config_file, load_config
from loop.core import paths
from loop.core.errors import LoopError, error_exit

log = logging.getLogger("loop.schedule")
JOB_ID = "feedback-loop-cycle"
WEBHOOK_EVENT = "record.completed"
MAX_WEBHOOK_BODY = 1 << 20  # Argilla's record events are a few KiB


def run_cycle_subprocess(config_path: str | None = None, extra_args: list[str] | None = None) -> dict:
    """Run one cycle in a child process with `config_path` (None: the child's own lookup); return its JSON report
    (or an error record)."""
    started = dt.datetime.now(dt.UTC)
    cmd = [sys.executable, "-m", "loop.cycle", "--json", *(["--config", config_path] if config_path else []),
           *(extra_args or [])]
    log.info("cycle starting: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    report.setdefault("exit_code", proc.returncode)
    if proc.returncode != 0:
        report.setdefault("error", proc.stderr.strip()[-2000:])
    took = (dt.datetime.now(dt.UTC) - started).total_seconds()
    log.info("cycle ended in %.1fs: exit %s, outcome %s", took, proc.returncode, report.get("outcome", report.get("error", "?")))
    return report


def _trigger(config: LoopConfig):
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if config.schedule.cron:
        return CronTrigger.from_crontab(config.schedule.cron, timezone="UTC")
    return IntervalTrigger(minutes=config.schedule.interval_minutes, timezone="UTC")


def build_scheduler(config: LoopConfig, job=run_cycle_subprocess, blocking: bool = True,
                    config_path: str | os.PathLike | None = None):
    """A scheduler with a persistent SQLite job store and the cycle job (replacing any old one).

    The job is called as ``job(config_path=...)``: the absolute path of the file `config` was loaded from (or
    None for defaults), so every scheduled cycle uses the daemon's config, whatever the working directory."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.blocking import BlockingScheduler

    url = f"sqlite:///{paths.loop_home() / 'scheduler.db'}"
    cls = BlockingScheduler if blocking else BackgroundScheduler
    scheduler = cls(
        jobstores={"default": SQLAlchemyJobStore(url=url)},
        job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": config.schedule.misfire_grace_s},
        timezone="UTC",
    )
    path = str(Path(config_path).resolve()) if config_path else None
    scheduler.add_job(job, _trigger(config), kwargs={"config_path": path}, id=JOB_ID,
                      name="one pass of the feedback loop", replace_existing=True)
    return scheduler


class _WebhookHandler(BaseHTTPRequestHandler):
    """Counts signed `record.completed` events; the class attributes are set per server by `start_webhook`."""

    timeout = 10  # seconds a client may take to send its request: a stalled sender holds one thread, not forever
    counter = 0
    threshold = 1
    wake = staticmethod(lambda: None)
    verifier = None  # standardwebhooks.Webhook holding the secret Argilla signs with
    seen: dict[str, float] = {}  # webhook-id -> monotonic time first accepted (replays inside the window)
    lock = threading.Lock()

    def _reply(self, code: int, reason: str = "") -> None:
        if reason:
            log.warning("webhook: %d %s (from %s)", code, reason, self.client_address[0])
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        from standardwebhooks.webhooks import WebhookVerificationError

        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return self._reply(411, "no Content-Length")
        if not re.fullmatch(r"[0-9]+", raw_length.strip()):
            self.close_connection = True  # the body's extent is unknown: the connection cannot be reused
            return self._reply(400, f"bad Content-Length {raw_length[:40]!r}")
        length = int(raw_length)
        if length > MAX_WEBHOOK_BODY:
            self.close_connection = True
            return self._reply(413, f"body of {length} bytes")
        body = self.rfile.read(length)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return self._reply(400, "body is not UTF-8")
        try:
            self.verifier.verify(text, dict(self.headers.items()), json_parse=False)
        except (WebhookVerificationError, ValueError) as exc:  # ValueError: a malformed signature header
            return self._reply(401, f"signature refused: {exc}")
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            return self._reply(400, "body is not JSON")
        if not isinstance(event, dict):
            return self._reply(400, "body is not a JSON object")
        cls = type(self)
        with cls.lock:
            now = time.monotonic()
            # Signatures are valid for 5 minutes either side, so ids older than 10 minutes cannot come back.
            for msg_id in [m for m, t in cls.seen.items() if now - t > 600]:
                del cls.seen[msg_id]
            msg_id = self.headers.get("webhook-id", "")
            replay = msg_id in cls.seen
            cls.seen.setdefault(msg_id, now)
            wake = False
            if not replay and event.get("type") == WEBHOOK_EVENT:
                cls.counter += 1
                if cls.counter >= cls.threshold:
                    cls.counter, wake = 0, True
        if wake:
            log.info("webhook: %d records completed: waking the scheduler", cls.threshold)
            cls.wake()
        self._reply(204)

    def log_message(self, *args) -> None:
        return


def start_webhook(port: int, threshold: int, wake, *, secret: str) -> ThreadingHTTPServer:
    """Listen on 127.0.0.1:`port` for Argilla events signed with `secret` (a ``whsec_...`` string)."""
    from standardwebhooks.webhooks import Webhook

    handler = type("Handler", (_WebhookHandler,), {
        "threshold": threshold, "wake": staticmethod(wake), "counter": 0, "verifier": Webhook(secret),
        "seen": {}, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
    return server


def register_webhook(config: LoopConfig, url: str) -> str:
    """Make Argilla post `record.completed` events to `url` and return the secret it signs them with.

    A webhook already registered for `url` is reused (and re-enabled / given the event if it lacks them), so
    restarting the daemon does not pile up webhooks."""
    import argilla as rg

    from annotation.client import connect

    client = connect(config.annotation)
    for hook in client.webhooks.list():
        if hook.url == url:
            if WEBHOOK_EVENT not in hook.events or not hook.enabled:
                hook.events = sorted(set(hook.events) | {WEBHOOK_EVENT})
                hook.enabled = True
                hook.update()
            return hook.secret
    hook = rg.Webhook(url=url, events=[WEBHOOK_EVENT], description="feedback loop: run the next cycle early",
                      _client=client).create()
    return hook.secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.schedule", description="Run the loop on a schedule.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--run-now", action="store_true", help="also run a cycle immediately")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except LoopError as exc:
        return error_exit(exc)


def _run(args: argparse.Namespace) -> int:
    """Start the scheduler (and the webhook listener) and block until a signal stops it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args.config)
    scheduler = build_scheduler(config, config_path=config_file(args.config))
    if args.run_now:
        scheduler.modify_job(JOB_ID, next_run_time=dt.datetime.now(dt.UTC))

    def stop(signum, _frame):
        log.info("signal %s: shutting down after the cycle in flight", signal.Signals(signum).name)
        threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    webhook = None
    if config.schedule.webhook_port:
        url = f"http://127.0.0.1:{config.schedule.webhook_port}/"
        try:
            secret = register_webhook(config, url)
        except Exception as exc:  # Argilla down or no key: the schedule itself must still run
            log.error("webhook off: could not register %s in Argilla (%s: %s); scheduled cycles run as usual",
                      url, type(exc).__name__, exc)
        else:
            webhook = start_webhook(
                config.schedule.webhook_port,
                config.schedule.webhook_min_records,
                lambda: scheduler.modify_job(JOB_ID, next_run_time=dt.datetime.now(dt.UTC)),
                secret=secret,
            )
            log.info("webhook listening on %s (signed Argilla events only)", url)
    trigger = config.schedule.cron or f"every {config.schedule.interval_minutes} min"
    log.info("scheduler started (%s); job store %s", trigger, Path(paths.loop_home()) / "scheduler.db")
    scheduler.start()  # blocks until shutdown
    if webhook:
        webhook.shutdown()
    log.info("scheduler stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
