"""The local Argilla stack: lifecycle, restart durability, pid-file safety, failure reports, API key file, and its
security: loopback only, a redis that demands its password, secrets never on a command line or a terminal."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from skips import import_or_skip  # noqa: E402

from annotation.config import StackConfig
from annotation.server import PARTS, StackError, _Layout, stack_status, start_stack, stop_stack
from annotation.stack_parts import _launch, _owned_pid, _proc_stat
from loop.config import ConfigError, load_config

rg = import_or_skip("argilla")


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


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.255.255.254", "localhost"])
def test_stack_host_accepts_loopback_addresses(host):
    assert StackConfig(host=host).validate() == []


def test_stack_host_ipv6_loopback_is_refused_with_the_reason():
    (problem,) = StackConfig(host="::1").validate()
    assert "cannot reach an IPv6 address" in problem


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", "localhost.example.com",
                                  "::ffff:127.0.0.1", "", "127.0.0.1 ", "128.0.0.1"])
def test_stack_host_that_is_not_loopback_is_a_config_error(host, monkeypatch, tmp_path):
    problems = StackConfig(host=host).validate()
    assert len(problems) == 1 and problems[0].startswith("stack.host must be a loopback address"), problems
    monkeypatch.setenv("LOOP_STACK__HOST", host)
    with pytest.raises(ConfigError, match="stack.host must be a loopback address"):
        load_config()
    with pytest.raises(StackError, match="stack.host must be a loopback address"):
        start_stack(home=tmp_path, config=StackConfig(host=host), use_external=False)
    assert not (tmp_path / "argilla").exists(), "nothing may be started or written for a rejected config"


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


def test_a_part_that_has_not_rewritten_its_title_yet_is_starting_not_dead(tmp_path):
    """redis's pid record matches on its rewritten title ("redis-server 127.0.0.1:PORT"); on a busy machine it
    can take longer than the retries to rewrite it, and a live redis was once reported as "exited during
    startup". A process whose command line is still the argv it was launched with is ours."""
    layout = _Layout(tmp_path)
    layout.run.mkdir(parents=True)
    layout.logs.mkdir(parents=True)
    argv = ["/bin/sleep", "30"]  # never rewrites its title: a part caught before it does
    pid = _launch(layout, "redis", argv, dict(os.environ), ["redis-server", "6399"], tmp_path)
    try:
        assert _owned_pid(layout, "redis") == pid
    finally:
        os.kill(pid, 9)
    record = json.loads(layout.pidfile("redis").read_text())
    assert record["argv"] == argv


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


def _raw_redis(port: int, *commands: list[str]) -> list[bytes]:
    """Send RESP commands on one connection and return the first line of each reply."""
    payload = b"".join(
        (f"*{len(c)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in c)).encode() for c in commands)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        data = b""
        while data.count(b"\r\n") < len(commands):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[: len(commands)]


def _group_pids(leader: int) -> list[int]:
    """Every process in the process group `leader` started (the worker's forked children included)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[2]) == leader:
                pids.append(int(entry.name))
    return pids


def _listening_addresses(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, _width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


def test_redis_refuses_commands_without_the_stack_password(argilla_stack):
    port = json.loads((argilla_stack.home / "argilla" / "run" / "stack.json").read_text())["redis_port"]
    (ping,) = _raw_redis(port, ["PING"])
    assert ping.startswith(b"-NOAUTH"), ping
    (keys,) = _raw_redis(port, ["KEYS", "*"])  # rq's pickled jobs live here: no reading them without the password
    assert keys.startswith(b"-NOAUTH"), keys
    password_file = argilla_stack.home / "argilla" / "redis_password"
    assert password_file.stat().st_mode & 0o077 == 0, "the redis password must be readable by its owner only"
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert _raw_redis(port, ["AUTH", "not-the-password"], ["PING"]) == [
        b"-WRONGPASS invalid username-password pair or user is disabled.", b"-NOAUTH Authentication required."]
    assert _raw_redis(port, ["AUTH", password], ["PING"]) == [b"+OK", b"+PONG"]
    # Command lines are readable by every local user: no part may carry the password on its own.
    for part in PARTS:
        for pid in _group_pids(stack_status(argilla_stack.home)["parts"][part]["pid"]):
            assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), part
    conf = argilla_stack.home / "argilla" / "redis" / "redis.conf"
    assert conf.stat().st_mode & 0o077 == 0, "redis.conf holds the password"


def test_every_part_listens_on_loopback_only(argilla_stack):
    status = stack_status(argilla_stack.home)
    ports = json.loads((argilla_stack.home / "argilla" / "run" / "stack.json").read_text())
    for part in PARTS:
        addresses = _listening_addresses(_group_pids(status["parts"][part]["pid"]))
        assert all(ipaddress.ip_address(a).is_loopback for a, _ in addresses), (part, addresses)
        expected = {"search": ports["search_port"], "redis": ports["redis_port"], "server": ports["port"]}.get(part)
        if expected is not None:  # the worker listens on nothing
            assert expected in {p for _, p in addresses}, (part, addresses)
        else:
            assert addresses == [], (part, addresses)


def test_cli_start_never_prints_passwords_and_says_where_they_are(argilla_stack):
    ports = json.loads((argilla_stack.home / "argilla" / "run" / "stack.json").read_text())
    env = dict(os.environ, LOOP_HOME=str(argilla_stack.home))
    env.pop("ARGILLA_API_URL", None)
    env.pop("ARGILLA_API_KEY", None)
    done = subprocess.run([sys.executable, "-m", "annotation.server", "start", "--port", str(ports["port"]),
                           "--search-port", str(ports["search_port"]), "--redis-port", str(ports["redis_port"])],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                          timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    credentials = json.loads((argilla_stack.home / "argilla" / "credentials.json").read_text())
    secrets_ = [credentials[role][key] for role in ("owner", "reviewer") for key in ("password", "api_key")]
    for secret in secrets_:
        assert secret not in printed
    assert str(argilla_stack.home / "argilla" / "credentials.json") in printed
    assert re.search(r"UI: http://127\.0\.0\.1:\d+", printed)
