"""The scheduler never overlaps cycles, persists its job, and the cycle lock survives crashes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from loop.config import load_config
from loop.lock import CycleLock, LockHeld
from loop.schedule import JOB_ID, build_scheduler, start_webhook

RUNS_FILE = None


def slow_job():
    """A stand-in cycle that takes longer than the interval (module-level: the job store pickles a reference)."""
    path = Path(os.environ["SCHED_TEST_RUNS"])
    start = time.monotonic()
    with open(path, "a") as f:
        f.write(json.dumps({"event": "start", "t": start, "thread": threading.get_ident()}) + "\n")
    time.sleep(1.5)
    with open(path, "a") as f:
        f.write(json.dumps({"event": "end", "t": time.monotonic()}) + "\n")


def test_scheduler_never_overlaps(tmp_path, monkeypatch):
    runs = tmp_path / "runs.jsonl"
    monkeypatch.setenv("SCHED_TEST_RUNS", str(runs))
    monkeypatch.setenv("LOOP_SCHEDULE__INTERVAL_MINUTES", str(0.3 / 60))  # every 0.3 s, a job takes 1.5 s
    config = load_config()
    scheduler = build_scheduler(config, job=slow_job, blocking=False)
    scheduler.start()
    time.sleep(5.5)
    scheduler.shutdown(wait=True)
    events = [json.loads(line) for line in runs.read_text().splitlines()]
    starts = [e["t"] for e in events if e["event"] == "start"]
    ends = [e["t"] for e in events if e["event"] == "end"]
    assert len(starts) >= 2, "the job should have run more than once"
    assert len(starts) == len(ends)
    # Strictly sequential: each run starts after the previous one ended.
    for prev_end, next_start in zip(ends, starts[1:]):
        assert next_start >= prev_end
    # The job store is persistent SQLite under LOOP_HOME.
    assert (Path(os.environ["LOOP_HOME"]) / "scheduler.db").is_file()


def test_job_store_survives_restart(monkeypatch):
    config = load_config()
    first = build_scheduler(config, job=slow_job, blocking=False)
    first.start(paused=True)
    next_run = first.get_job(JOB_ID).next_run_time
    first.shutdown(wait=False)
    second = build_scheduler(config, job=slow_job, blocking=False)
    second.start(paused=True)
    job = second.get_job(JOB_ID)
    assert job is not None and job.max_instances == 1 and job.coalesce is True
    assert abs((job.next_run_time - next_run).total_seconds()) < 5
    second.shutdown(wait=False)


def test_webhook_wakes_after_threshold():
    woken = []
    server = start_webhook(0, 3, lambda: woken.append(time.time()))
    port = server.server_address[1]
    try:
        for i in range(5):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/", data=json.dumps({"type": "record.completed", "i": i}).encode(),
                headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(req, timeout=5).read()
        other = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b'{"type": "record.created"}', method="POST")
        urllib.request.urlopen(other, timeout=5).read()
    finally:
        server.shutdown()
    assert len(woken) == 1  # 5 completed records, threshold 3: one wake-up, 2 counted towards the next


def test_lock_excludes_second_holder(tmp_path):
    path = tmp_path / "cycle.lock"
    with CycleLock(path):
        with pytest.raises(LockHeld, match="another cycle is running"):
            CycleLock(path).acquire()
    CycleLock(path).acquire().release()  # free again after release


def test_lock_released_when_holder_is_killed(tmp_path):
    path = tmp_path / "cycle.lock"
    code = ("import sys, time; sys.path.insert(0, %r); from loop.lock import CycleLock; "
            "CycleLock(%r).acquire(); print('held', flush=True); time.sleep(60)") % (str(Path.cwd()), str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld):
        CycleLock(path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    lock = CycleLock(path).acquire()  # the kernel released the dead holder's lock
    lock.release()
