"""Argilla dies in the middle of a push: nothing is lost, nothing doubles, the next run finishes the job."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from annotation.client import connect
from annotation.config import AnnotationConfig, StackConfig
from annotation.push import push
from annotation.schema import ensure_dataset, find_dataset
from annotation.server import start_stack
from loop.core.store import Store

N = 600


def _server_pid(home: Path) -> int:
    return int(json.loads((home / "argilla" / "run" / "server.json").read_text())["pid"])


def _restart(home: Path):
    """Start the stack again with the settings it was started with (only the dead part comes up)."""
    data = json.loads((home / "argilla" / "run" / "stack.json").read_text())
    data["venv_dir"] = Path(data["venv_dir"]) if data.get("venv_dir") else None
    return start_stack(home=home, config=StackConfig(**data), use_external=False)


def _argilla_ids(client, cfg) -> list[str]:
    ds = find_dataset(client, cfg)
    ids, offset = [], 0
    while True:
        page = client.api.http_client.get(f"/api/v1/datasets/{ds.id}/records", params={"offset": offset, "limit": 1000})
        page.raise_for_status()
        items = page.json()["items"]
        ids += [r["external_id"] for r in items]
        offset += len(items)
        if len(items) < 1000:
            return ids


@pytest.mark.slow
def test_killing_argilla_mid_push_loses_nothing_and_doubles_nothing(argilla_stack):
    owner = connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    cfg = AnnotationConfig(dataset=f"kill-{uuid.uuid4().hex[:10]}", budget_per_cycle=N, push_batch_size=50,
                           retry_base_s=60)
    store = Store.open()
    cid = store.new_conversation()
    turn_ids = [store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": f"question {i}"}],
                               answer=f"answer {i} " * 10, model_version="v1") for i in range(N)]
    ensure_dataset(owner, cfg)

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(report=push(cfg, store, owner, progress=False)))
    worker.start()
    deadline = time.monotonic() + 300
    target = None
    while time.monotonic() < deadline:  # wait until two batches are acknowledged, then kill the server
        with contextlib.closing(sqlite3.connect(store.path, timeout=30)) as db:
            rows = db.execute("SELECT target, COUNT(*) FROM sync_state WHERE status = 'sent' GROUP BY target").fetchall()
        if rows and rows[0][1] >= 100:
            target = rows[0][0]
            break
        time.sleep(0.05)
    assert target, "the push never got going"
    os.kill(_server_pid(argilla_stack.home), signal.SIGKILL)
    worker.join(timeout=300)
    first = result["report"]
    try:
        assert first.failed > 0, "the kill came too late to test anything"
        assert first.sent >= 100 and first.sent + first.failed == N
        state = store.sync_state(first.target)
        assert sum(s["status"] == "sent" for s in state.values()) == first.sent
        failed = [s for s in state.values() if s["status"] == "failed"]
        assert len(failed) == first.failed
        assert all(s["attempts"] == 1 and s["content_hash"] is None and s["last_error"] for s in failed)
        assert all(dt.datetime.fromisoformat(s["next_attempt_at"]) > dt.datetime.now(dt.UTC) for s in failed)
    finally:
        _restart(argilla_stack.home)

    waiting = push(cfg, store, owner, progress=False)  # within the backoff: nothing is retried yet
    assert (waiting.sent, waiting.deferred, waiting.unchanged) == (0, first.failed, first.sent)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    second = push(cfg, store, owner, now=later, progress=False)
    assert (second.sent, second.failed) == (first.failed, 0)
    assert first.sent + second.sent == N
    in_argilla = _argilla_ids(owner, cfg)
    assert len(in_argilla) == N and set(in_argilla) == set(turn_ids)
    assert {s["status"] for s in store.sync_state(first.target).values()} == {"sent"}
    assert push(cfg, store, owner, progress=False).unchanged == N


def _latency_capped(cfg, client, version):
    """The current settings, except that Argilla itself rejects latencies above 10 s."""
    import argilla as rg

    from annotation.schema import build_settings

    settings = build_settings(cfg, client, version)
    settings.metadata.remove("latency_s")
    settings.metadata.add(rg.FloatMetadataProperty(name="latency_s", min=0.0, max=10.0, client=client))
    return settings


def test_a_record_argilla_rejects_does_not_hold_back_its_batch(argilla_stack):
    from annotation.schema import SCHEMA_VERSION, Schema

    owner = connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    cfg = AnnotationConfig(dataset=f"poison-{uuid.uuid4().hex[:10]}", push_batch_size=8)
    ensure_dataset(owner, cfg, schema=Schema(SCHEMA_VERSION, _latency_capped, {}))
    store = Store.open()
    cid = store.new_conversation()
    ids = [store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": f"q{i}"}], answer="a",
                          latency_s=100.0 if i == 5 else 1.0) for i in range(8)]
    report = push(cfg, store, owner, progress=False)
    assert (report.sent, report.failed) == (7, 1)
    assert "latency_s" in report.errors[0]
    state = store.sync_state(report.target)
    assert state[ids[5]]["status"] == "failed" and "latency_s" in state[ids[5]]["last_error"]
    assert sorted(_argilla_ids(owner, cfg)) == sorted(i for i in ids if i != ids[5])
