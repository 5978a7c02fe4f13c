"""The local Argilla stack: lifecycle, restart durability, pid-file safety, failure reports, API key file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from annotation.config import StackConfig
from annotation.server import PARTS, StackError, _Layout, _proc_stat, stack_status, start_stack, stop_stack

rg = pytest.importorskip("argilla")


def _bystander() -> subprocess.Popen:
    """An unrelated long-running process that no stop may touch."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def _alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def _dataset(client, name: str):
    settings = rg.Settings(
        fields=[rg.TextField(name="text")],
        questions=[rg.RatingQuestion(name="quality", values=[1, 2, 3, 4, 5])],
    )
    return rg.Dataset(name=name, workspace="feedback", settings=settings, client=client).create()


def test_config_validate_reports_every_problem():
    problems = StackConfig(port=0, search_port=6911, redis_port=6911, workspace="Bad Name",
                           owner_username="x", reviewer_username="x", startup_timeout_s=0,
                           worker_processes=0).validate()
    text = "\n".join(problems)
    for fragment in ("stack.port", "must differ", "stack.workspace", "owner_username and", "startup_timeout_s",
                     "worker_processes"):
        assert fragment in text
    assert StackConfig().validate() == []


def test_external_server_is_used_instead_of_starting(tmp_path, monkeypatch):
    monkeypatch.setenv("ARGILLA_API_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("ARGILLA_API_KEY", "external-key")
    info = start_stack(home=tmp_path)
    assert (info.external, info.api_url, info.api_key) == (True, "http://127.0.0.1:1", "external-key")
    assert not (tmp_path / "argilla" / "run").exists(), "nothing may be started for an external server"
    assert stack_status(tmp_path)["external"] is True


def test_port_taken_by_another_program_is_reported(tmp_path, new_stack_config):
    config = new_stack_config()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.search_port))
        squatter.listen()
        with pytest.raises(StackError, match=rf"port {config.search_port} for the search part is already in use"):
            start_stack(home=tmp_path, config=config, use_external=False)
    assert not any(stack_status(tmp_path)["parts"][p]["alive"] for p in PARTS)


def test_part_that_dies_is_named_with_its_log_and_the_rest_is_cleaned_up(tmp_path, stack_home, new_stack_config):
    broken = tmp_path / "redis-server"
    broken.write_text("#!/bin/sh\necho 'boom: cannot open the redis dir' >&2\nexit 3\n")
    broken.chmod(0o755)
    config = new_stack_config(redis_server_bin=str(broken))
    home = stack_home
    with pytest.raises(StackError) as failure:
        start_stack(home=home, config=config, use_external=False)
    message = str(failure.value)
    assert message.startswith("redis (pid ") and "exited during startup" in message
    assert "boom: cannot open the redis dir" in message
    # The search server launched before redis failed must have been stopped again.
    assert not any(stack_status(home)["parts"][p]["alive"] for p in PARTS)
    assert not list((home / "argilla" / "run").glob("*.json"))


def test_stop_never_kills_a_process_whose_pid_file_does_not_match(tmp_path):
    """A stale pid file (pid reused by another program) must not make stop kill that program."""
    layout = _Layout(tmp_path)
    layout.run.mkdir(parents=True)
    bystander = _bystander()
    try:
        start = _proc_stat(bystander.pid)[1]
        # Wrong start time (pid reuse) and right start time but foreign command line: both must be refused.
        exe = os.readlink(f"/proc/{bystander.pid}/exe")
        layout.pidfile("server").write_text(json.dumps(
            {"pid": bystander.pid, "starttime": start + 1, "exe": exe, "argv": [], "match": ["time.sleep"]}))
        layout.pidfile("worker").write_text(json.dumps(
            {"pid": bystander.pid, "starttime": start, "exe": exe, "argv": [], "match": ["argilla_server worker"]}))
        stopped = stop_stack(tmp_path)
        assert stopped == {part: None for part in reversed(PARTS)}
        time.sleep(0.2)
        assert _alive(bystander)
        assert not list(layout.run.glob("*.json")), "stale pid files are cleared"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_start_status_stop_lifecycle(stack_home, new_stack_config):
    config = new_stack_config()
    bystander = _bystander()
    try:
        info = start_stack(home=stack_home, config=config, use_external=False)
        try:
            assert not info.already_running and info.api_url == f"http://127.0.0.1:{config.port}"
            status = stack_status(stack_home)
            assert status["running"] and status["api_url"] == info.api_url
            assert all(status["parts"][p]["alive"] and status["parts"][p]["healthy"] for p in PARTS)
            pids = {p: status["parts"][p]["pid"] for p in PARTS}
            again = start_stack(home=stack_home, config=config, use_external=False)
            assert again.already_running and again.api_key == info.api_key
            assert {p: stack_status(stack_home)["parts"][p]["pid"] for p in PARTS} == pids
            print(f"stack startup: {info.startup_seconds:.1f} s")
        finally:
            stopped = stop_stack(stack_home)
        assert stopped == {p: pids[p] for p in reversed(PARTS)}
        status = stack_status(stack_home)
        assert not status["running"] and not any(status["parts"][p]["alive"] for p in PARTS)
        for pid in pids.values():
            assert _proc_stat(pid) is None or _proc_stat(pid)[0] in "ZX", f"pid {pid} still running after stop"
        assert _alive(bystander), "stop must leave processes it did not start alone"
        with socket.socket() as probe:  # the Argilla port is free again
            assert probe.connect_ex(("127.0.0.1", config.port)) != 0
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_restart_keeps_records_and_reviews_searchable(stack_home, new_stack_config):
    """The search server is in memory: after stop/start every record and response must be found again."""
    config = new_stack_config()
    info = start_stack(home=stack_home, config=config, use_external=False)
    try:
        client = rg.Argilla(api_url=info.api_url, api_key=info.api_key)
        name = f"restart-{uuid.uuid4().hex[:8]}"
        dataset = _dataset(client, name)
        token = f"zebra{uuid.uuid4().hex[:6]}"
        dataset.records.log([
            {"text": f"the {token} answer"},
            rg.Record(fields={"text": "a reviewed answer"},
                      responses=[rg.Response("quality", 4, user_id=client.me.id, status="submitted")]),
        ])
        stop_stack(stack_home)
        assert not stack_status(stack_home)["running"]

        again = start_stack(home=stack_home, config=config, use_external=False)
        assert again.api_key == info.api_key and not again.already_running
        client = rg.Argilla(api_url=again.api_url, api_key=again.api_key)
        dataset = client.datasets(name=name, workspace="feedback")
        found = list(dataset.records(query=rg.Query(query=token)))
        assert [r.fields["text"] for r in found] == [f"the {token} answer"]
        submitted = list(dataset.records(query=rg.Query(filter=rg.Filter(("response.status", "==", "submitted"))),
                                         with_responses=True))
        assert [r.fields["text"] for r in submitted] == ["a reviewed answer"]
        assert [resp.value for resp in submitted[0].responses["quality"]] == [4]
    finally:
        stop_stack(stack_home)


def test_api_key_file_works_with_the_sdk(argilla_stack):
    key_file = argilla_stack.home / "argilla" / "api_key"
    assert key_file.stat().st_mode & 0o077 == 0, "the API key must be readable by its owner only"
    key = key_file.read_text().strip()
    owner = rg.Argilla(api_url=argilla_stack.api_url, api_key=key)
    assert owner.me.username == "owner" and owner.me.role == "owner"
    assert owner.workspaces("feedback") is not None

    reviewer = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.reviewer_api_key)
    assert reviewer.me.username == argilla_stack.reviewer_username == "reviewer"
    assert reviewer.me.role == "annotator"
    assert [w.name for w in reviewer.workspaces] == ["feedback"]

    with pytest.raises(Exception):
        rg.Argilla(api_url=argilla_stack.api_url, api_key="not-a-key").me  # noqa: B018 - proves keys are checked


def test_cli_status_reports_each_part(argilla_stack):
    env = dict(os.environ, LOOP_HOME=str(argilla_stack.home))
    env.pop("ARGILLA_API_URL", None)
    env.pop("ARGILLA_API_KEY", None)
    done = subprocess.run([sys.executable, "-m", "annotation.server", "status", "--json"], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["running"] and report["api_url"] == argilla_stack.api_url
    assert set(report["parts"]) == set(PARTS) and all(p["healthy"] for p in report["parts"].values())
