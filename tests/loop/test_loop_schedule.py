"""The scheduler never overlaps cycles, persists its job, runs its cycles with its own config file, and the cycle
lock survives crashes; its webhook counts only events signed by Argilla and answers bad requests with a 4xx."""

import base64
import datetime as dt
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from argilla_fixtures import free_ports
from standardwebhooks.webhooks import Webhook

from loop.config import load_config
from loop.lock import CycleLock, LockHeld
from loop.schedule import JOB_ID, build_scheduler, register_webhook, start_webhook

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes.......").decode()


def slow_job(config_path=None):
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


def _signed(body: bytes, secret: str = SECRET, *, age_s: float = 0.0, msg_id: str | None = None) -> dict:
    """Standard Webhooks headers for `body`, as Argilla sends them (signed `age_s` seconds ago)."""
    msg_id = msg_id or f"msg_{secrets.token_urlsafe(16)}"
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()),
            "Content-Type": "application/json"}


def _post(port: int, headers: dict, body: bytes = b"", *, length: str | None = None) -> int:
    """POST over a raw socket (so any Content-Length can be sent) and return the status code; a handler that
    crashes or hangs gives no status line, which fails the caller's assertion instead of hanging the test."""
    lines = ["POST / HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             f"Content-Length: {len(body) if length is None else length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        try:
            reply = sock.recv(4096)
        except (TimeoutError, ConnectionResetError):
            return -1
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    return int(match.group(1)) if match else -1


def _event(kind: str = "record.completed", **extra) -> bytes:
    return json.dumps({"type": kind, "version": 1, "data": {"id": str(uuid.uuid4())}, **extra}).encode()


@pytest.fixture
def webhook():
    """A listener with threshold 3 and the test secret: yields (port, wake-up times)."""
    woken: list[float] = []
    server = start_webhook(0, 3, lambda: woken.append(time.time()), secret=SECRET)
    try:
        yield server.server_address[1], woken
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_wakes_after_threshold_signed_events(webhook):
    port, woken = webhook
    for i in range(5):
        body = _event(i=i)
        assert _post(port, _signed(body), body) == 204
    other = _event("record.created")
    assert _post(port, _signed(other), other) == 204
    assert len(woken) == 1  # 5 completed records, threshold 3: one wake-up, 2 counted towards the next


def test_webhook_refuses_unsigned_forged_and_stale_events(webhook):
    port, woken = webhook
    body = _event()
    forged = _signed(body, "whsec_" + base64.b64encode(b"not the secret Argilla holds....").decode())
    tampered = _signed(body)
    replayed_old = _signed(body, age_s=6 * 60)  # Standard Webhooks' tolerance is 5 minutes
    from_future = _signed(body, age_s=-6 * 60)
    garbage = dict(_signed(body), **{"webhook-signature": "v1"})
    for _ in range(3):
        assert _post(port, {"Content-Type": "application/json"}, body) == 401
        assert _post(port, forged, body) == 401
        assert _post(port, tampered, body.replace(b"completed", b"completed ")) == 401
        assert _post(port, replayed_old, body) == 401
        assert _post(port, from_future, body) == 401
        assert _post(port, garbage, body) == 401
    assert woken == [], "no unsigned or wrongly signed event may wake the scheduler"


def test_webhook_counts_a_repeated_delivery_once(webhook):
    port, woken = webhook
    body = _event()
    headers = _signed(body)
    for _ in range(3):
        assert _post(port, headers, body) == 204  # acknowledged, so a sender does not retry forever
    assert woken == []
    for _ in range(2):
        fresh = _event()
        assert _post(port, _signed(fresh), fresh) == 204
    assert len(woken) == 1


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", " -0x10"])
def test_webhook_answers_400_to_a_bad_content_length(webhook, length):
    port, woken = webhook
    body = _event()
    assert _post(port, _signed(body), body, length=length) == 400
    assert woken == []
    assert _post(port, _signed(body), body) == 204, "the listener keeps serving after a bad request"


@pytest.mark.parametrize("body", [b"[1, 2]", b'"record.completed"', b"3", b"null", b"{not json"])
def test_webhook_answers_400_to_a_signed_body_that_is_not_a_json_object(webhook, body):
    port, woken = webhook
    assert _post(port, _signed(body), body) == 400
    assert woken == []


def test_webhook_refuses_an_oversized_body_without_reading_it(webhook):
    port, _ = webhook
    assert _post(port, {}, b"", length=str(64 << 20)) == 413


@pytest.mark.slow
def test_argilla_signed_record_completed_events_wake_the_scheduler(argilla_stack, monkeypatch):
    """The whole path: the daemon registers its webhook in a real Argilla, a reviewer submits, Argilla's worker
    posts the signed event, and the listener verifies it with the secret Argilla returned."""
    import argilla as rg

    from annotation.pull import submit_review

    monkeypatch.setenv("ARGILLA_API_URL", argilla_stack.api_url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_stack.api_key)
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}/"
    config = load_config()
    secret = register_webhook(config, url)
    assert secret and register_webhook(config, url) == secret, "a restarted daemon reuses its webhook"
    woken: list[float] = []
    server = start_webhook(port, 1, lambda: woken.append(time.time()), secret=secret)
    client = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    dataset = rg.Dataset(name=f"webhook-{uuid.uuid4().hex[:8]}", workspace="feedback", client=client, settings=rg.Settings(
        fields=[rg.TextField(name="text")], questions=[rg.RatingQuestion(name="quality", values=[1, 2, 3, 4, 5])],
        distribution=rg.TaskDistribution(min_submitted=1))).create()
    try:
        dataset.records.log([{"text": "an answer"}])
        reviewer = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.reviewer_api_key)
        (record,) = list(dataset.records)
        submit_review(reviewer, record._server_id, quality=4)  # as the UI does: this completes the record
        deadline = time.monotonic() + 60
        while not woken and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(woken) == 1, "Argilla's signed record.completed event must be accepted"
    finally:
        server.shutdown()
        server.server_close()
        dataset.delete()
        for hook in client.webhooks.list():
            if hook.url == url:
                hook.delete()


def test_scheduled_cycles_use_the_config_file_the_daemon_was_started_with(tmp_path):
    """`python -m loop.schedule --config X`: the cycle child process must load X, not the default config.

    X is valid when the daemon starts and is then broken; a cycle that reads X fails with X's problem (exit 2).
    The test holds the cycle lock, so a cycle that ignored X would stop at the lock (exit 3) instead of training."""
    home = Path(os.environ["LOOP_HOME"])
    config = tmp_path / "custom.toml"
    config.write_text("[schedule]\ninterval_minutes = 0.05\n")  # first run 3 s after start
    env = {k: v for k, v in os.environ.items() if k != "LOOP_CONFIG"}
    with CycleLock(home / "cycle.lock"):
        daemon = subprocess.Popen([sys.executable, "-m", "loop.schedule", "--config", config.name], cwd=tmp_path,
                                  env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        try:
            for line in daemon.stdout:
                lines.append(line)
                if "scheduler started" in line:
                    config.write_text(config.read_text() + "[no_such_section]\n")
                if "cycle ended" in line:
                    break
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            lines += daemon.stdout.readlines()  # the rest of the child's error, logged after "cycle ended"
    log = "".join(lines)
    assert f"--config {config}" in log, log  # the absolute path, though the daemon was given a relative one
    ended = next(i for i, line in enumerate(lines) if "cycle ended" in line)
    assert "exit 2" in lines[ended] and "no_such_section" in "".join(lines[ended:]), log


def test_lock_excludes_second_holder(tmp_path):
    path = tmp_path / "cycle.lock"
    with CycleLock(path):
        with pytest.raises(LockHeld, match="another cycle is running"):
            CycleLock(path).acquire()
    CycleLock(path).acquire().release()  # free again after release


def test_lock_released_when_holder_is_killed(tmp_path):
    path = tmp_path / "cycle.lock"
    code = (f"import sys, time; sys.path.insert(0, {str(Path.cwd())!r}); from loop.lock import CycleLock; "
            f"CycleLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld):
        CycleLock(path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    lock = CycleLock(path).acquire()  # the kernel released the dead holder's lock
    lock.release()
