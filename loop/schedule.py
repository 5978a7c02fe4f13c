"""``python -m loop.schedule``: run the loop on a schedule (APScheduler), one cycle at a time.

- The job store is SQLite under ``$LOOP_HOME/scheduler.db``, so the schedule (and a run that
  was due while the daemon was down) survives restarts.
- ``max_instances=1`` and ``coalesce=True``: a slow cycle never overlaps the next, and runs
  missed while it trained collapse into one; ``misfire_grace_time`` bounds how late a run may be.
  Each cycle also takes the cycle lock (``loop.lock``), so even two daemons cannot overlap.
- Each cycle runs in a child process (``python -m loop.cycle --json``): training's memory is
  returned to the OS after every cycle, and a crash in a cycle cannot take the daemon down.
- SIGTERM/SIGINT: stop scheduling, let the cycle in flight end (it is resumable anyway if the
  supervisor kills it), then exit 0.
- Optional webhook: Argilla posts ``record.completed`` events; after
  ``schedule.webhook_min_records`` of them the next cycle is pulled forward to now.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loop import paths
from loop.config import Config, load_config

log = logging.getLogger("loop.schedule")
JOB_ID = "feedback-loop-cycle"


def run_cycle_subprocess(extra_args: list[str] | None = None) -> dict:
    """Run one cycle in a child process; return its JSON report (or an error record)."""
    started = dt.datetime.now(dt.timezone.utc)
    cmd = [sys.executable, "-m", "loop.cycle", "--json", *(extra_args or [])]
    log.info("cycle starting: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    report.setdefault("exit_code", proc.returncode)
    if proc.returncode != 0:
        report.setdefault("error", proc.stderr.strip()[-2000:])
    took = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    log.info("cycle ended in %.1fs: exit %s, outcome %s", took, proc.returncode, report.get("outcome", report.get("error", "?")))
    return report


def _trigger(config: Config):
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    if config.schedule.cron:
        return CronTrigger.from_crontab(config.schedule.cron, timezone="UTC")
    return IntervalTrigger(minutes=config.schedule.interval_minutes, timezone="UTC")


def build_scheduler(config: Config, job=run_cycle_subprocess, blocking: bool = True):
    """A scheduler with a persistent SQLite job store and the cycle job (replacing any old one)."""
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
    scheduler.add_job(job, _trigger(config), id=JOB_ID, name="one pass of the feedback loop", replace_existing=True)
    return scheduler


class _WebhookHandler(BaseHTTPRequestHandler):
    counter = 0
    threshold = 1
    wake = staticmethod(lambda: None)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20))
        try:
            event = json.loads(body or b"{}")
        except json.JSONDecodeError:
            self.send_response(400)
            self.end_headers()
            return
        if event.get("type") == "record.completed":
            cls = type(self)
            cls.counter += 1
            if cls.counter >= cls.threshold:
                cls.counter = 0
                log.info("webhook: %d records completed: waking the scheduler", cls.threshold)
                cls.wake()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        return


def start_webhook(port: int, threshold: int, wake) -> ThreadingHTTPServer:
    handler = type("Handler", (_WebhookHandler,), {"threshold": threshold, "wake": staticmethod(wake), "counter": 0})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, name="webhook", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.schedule", description="Run the loop on a schedule.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--run-now", action="store_true", help="also run a cycle immediately")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args.config)
    scheduler = build_scheduler(config)
    if args.run_now:
        scheduler.modify_job(JOB_ID, next_run_time=dt.datetime.now(dt.timezone.utc))

    def stop(signum, _frame):
        log.info("signal %s: shutting down after the cycle in flight", signal.Signals(signum).name)
        threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    webhook = None
    if config.schedule.webhook_port:
        webhook = start_webhook(
            config.schedule.webhook_port,
            config.schedule.webhook_min_records,
            lambda: scheduler.modify_job(JOB_ID, next_run_time=dt.datetime.now(dt.timezone.utc)),
        )
        log.info("webhook listening on 127.0.0.1:%d", config.schedule.webhook_port)
    trigger = config.schedule.cron or f"every {config.schedule.interval_minutes} min"
    log.info("scheduler started (%s); job store %s", trigger, Path(paths.loop_home()) / "scheduler.db")
    scheduler.start()  # blocks until shutdown
    if webhook:
        webhook.shutdown()
    log.info("scheduler stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
