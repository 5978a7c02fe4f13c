"""Load test: many users chat and give feedback through the running app's API, then the app is
killed with SIGKILL and restarted, and every acknowledged feedback event must be in the store.

    python benchmarks/load_test.py [--users 50] [--duration 120] [--max-requests 20000]
                                   [--max-tokens 8] [--json OUT] [--record]

What it does, all on loopback and bounded in requests and time (it stops by itself):

  1. starts the real app (``python -m app``) on a free 127.0.0.1 port with a fresh LOOP_HOME
     (mirror off, so what survives is what the store itself kept);
  2. runs ``--users`` simulated users for ``--duration`` seconds, each over plain HTTP
     (Gradio's ``/gradio_api/call/<name>``): ``/ask`` (a new conversation or the next message
     of its own), then one to three ``/feedback`` events on the answer's turn id (thumbs,
     reasons, sometimes a comment and a correction); every feedback id the app acknowledged is
     recorded;
  3. at the deadline kills the app with SIGKILL while requests are still in flight (those get no
     acknowledgement, so they do not count), starts it again on the same home, and checks
     ``python -m loop.store export``: every acknowledged feedback event and every turn id that
     ``/ask`` returned must be there. ``lost`` must be 0 (exit status 1 otherwise).

``--record`` appends a dated section with the figures to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loop.core.reasons import REASONS_DOWN, REASONS_UP  # noqa: E402

PROMPTS = ["Say hello.", "What is 2 + 2?", "Name a colour.", "Give me one word.", "What day comes after Monday?",
           "Tell me a fruit.", "Say something kind.", "What is the capital of France?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class App:
    """``python -m app`` as a subprocess on a loopback port."""

    def __init__(self, home: Path, port: int, max_tokens: int, log: Path):
        self.home, self.port, self.log = home, port, log
        self.env = {**os.environ, "LOOP_HOME": str(home), "LOOP_APP__MIRROR_DIR": "off",
                    "LOOP_APP__MAX_TOKENS": str(max_tokens), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "GRADIO_ANALYTICS_ENABLED": "False"}
        self.url = f"http://127.0.0.1:{port}/"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port)],
                                         cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the app did not come up in {timeout} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def export(self) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "loop.store", "export"], cwd=REPO, env=self.env,
                             capture_output=True, text=True, check=True)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


class ApiError(RuntimeError):
    pass


def call(client: httpx.Client, name: str, data: list, timeout: float) -> dict:
    """One call of a named Gradio endpoint over plain HTTP: POST, then read the event stream."""
    r = client.post(f"gradio_api/call/{name}", json={"data": data}, timeout=timeout)
    r.raise_for_status()
    event_id = r.json()["event_id"]
    event = None
    with client.stream("GET", f"gradio_api/call/{name}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1].strip() or "null")
                if event == "error":
                    raise ApiError(str(payload))
                return payload[0]
    raise ApiError(f"{name}: the event stream ended without a result")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {"ask": [], "feedback": []}
        self.errors: dict[str, list[str]] = {"ask": [], "feedback": []}
        self.feedback_ids: list[str] = []
        self.turn_ids: list[str] = []
        self.requests = 0

    def take_request(self, max_requests: int) -> bool:
        with self.lock:
            if self.requests >= max_requests:
                return False
            self.requests += 1
            return True


def user(i: int, url: str, stats: Stats, stop: threading.Event, max_requests: int, timeout: float) -> None:
    rng = random.Random(i)
    conversation = ""
    with httpx.Client(base_url=url, timeout=timeout) as client:
        while not stop.is_set():
            if not stats.take_request(max_requests):
                return
            t = time.perf_counter()
            try:
                turn = call(client, "ask", [rng.choice(PROMPTS), conversation, "", 0.7, 0], timeout)
            except (httpx.HTTPError, ApiError, KeyError, ValueError) as exc:
                with stats.lock:
                    stats.errors["ask"].append(str(exc)[:200])
                continue
            with stats.lock:
                stats.latency["ask"].append(time.perf_counter() - t)
                stats.turn_ids.append(turn["turn_id"])
            # Up to three turns per conversation, then a new one.
            conversation = turn["conversation_id"] if rng.random() < 0.66 else ""
            for k in range(rng.randint(1, 3)):
                if stop.is_set() or not stats.take_request(max_requests):
                    return
                thumbs = rng.choice(["up", "down"])
                reasons = rng.sample(list(REASONS_UP if thumbs == "up" else REASONS_DOWN), rng.randint(0, 2))
                comment = f"user {i} event {k}" if rng.random() < 0.5 else ""
                correction = "A better answer." if thumbs == "down" and rng.random() < 0.3 else ""
                t = time.perf_counter()
                try:
                    fb = call(client, "feedback", [turn["turn_id"], thumbs, reasons, comment, correction], timeout)
                except (httpx.HTTPError, ApiError, KeyError, ValueError) as exc:
                    with stats.lock:
                        stats.errors["feedback"].append(str(exc)[:200])
                    continue
                with stats.lock:  # acknowledged: the app said the event is durable
                    stats.latency["feedback"].append(time.perf_counter() - t)
                    stats.feedback_ids.append(fb["feedback_id"])


def run(users: int, duration: float, max_requests: int, max_tokens: int, timeout: float = 120.0) -> dict:
    home = Path(tempfile.mkdtemp(prefix="load-test-")) / "home"
    home.mkdir()
    app = App(home, free_port(), max_tokens, home.parent / "app.log")
    result: dict = {"users": users, "duration_s": duration, "max_requests": max_requests, "max_tokens": max_tokens}
    try:
        result["start_s"] = round(app.start(), 1)
        stats, stop = Stats(), threading.Event()
        threads = [threading.Thread(target=user, args=(i, app.url, stats, stop, max_requests, timeout), daemon=True)
                   for i in range(users)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < duration and any(t.is_alive() for t in threads):
            time.sleep(0.2)
        stop.set()
        with stats.lock:  # freeze the acknowledgements: anything answered after this is not counted
            acked_feedback, acked_turns = list(stats.feedback_ids), list(stats.turn_ids)
            latency = {k: list(v) for k, v in stats.latency.items()}
            errors = {k: list(v) for k, v in stats.errors.items()}
            requests = stats.requests
        elapsed = time.monotonic() - t0
        app.kill()  # SIGKILL, with requests still in flight
        for t in threads:
            t.join(timeout=timeout)
        result["restart_s"] = round(app.start(), 1)
        records = app.export()
        stored_feedback = {e["id"] for r in records for e in r["feedback_events"]}
        stored_turns = {r["id"] for r in records}
        lost_feedback = sorted(set(acked_feedback) - stored_feedback)
        lost_turns = sorted(set(acked_turns) - stored_turns)
        result.update({
            "elapsed_s": round(elapsed, 1),
            "requests": requests,
            "ask": {"ok": len(latency["ask"]), "errors": len(errors["ask"]),
                    "p50_s": round(pct(latency["ask"], 0.5), 3), "p95_s": round(pct(latency["ask"], 0.95), 3)},
            "feedback": {"ok": len(latency["feedback"]), "errors": len(errors["feedback"]),
                         "p50_s": round(pct(latency["feedback"], 0.5), 3),
                         "p95_s": round(pct(latency["feedback"], 0.95), 3)},
            "acknowledged_feedback": len(acked_feedback),
            "acknowledged_turns": len(acked_turns),
            "stored_feedback": len(stored_feedback),
            "stored_turns": len(stored_turns),
            "lost": len(lost_feedback) + len(lost_turns),
            "lost_ids": (lost_feedback + lost_turns)[:20],
            "error_samples": (errors["ask"] + errors["feedback"])[:5],
        })
    finally:
        app.stop()
        if result.get("lost") == 0:
            shutil.rmtree(home.parent, ignore_errors=True)
        else:  # kept for a look: the app's log and the store
            result["kept_home"] = str(home)
    return result


def markdown(r: dict) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    in_flight = r['requests'] - r['ask']['ok'] - r['ask']['errors'] - r['feedback']['ok'] - r['feedback']['errors']
    return f"""
## Load test: {r['users']} users, chat + feedback through the API, SIGKILL, restart ({dt.date.today().isoformat()})

`python benchmarks/load_test.py --users {r['users']} --duration {r['duration_s']:g} --max-tokens {r['max_tokens']} --record`
on {os.cpu_count()} CPU cores ({cpu}), {platform.system()}, Python {platform.python_version()};
the bundled SmolLM2-135M GGUF, answers capped at {r['max_tokens']} tokens, mirror off, under `nice -n 15` on a
machine shared with other work. Users call `/ask` then one to three `/feedback` over plain HTTP; at
{r['elapsed_s']} s the app is killed with SIGKILL mid-load and started again.

| figure | value |
|---|---|
| requests (ask + feedback) | {r['requests']} |
| `/ask` answered / errors | {r['ask']['ok']} / {r['ask']['errors']} |
| `/ask` latency p50 / p95 (queue + generation + durable turn) | {r['ask']['p50_s']} s / {r['ask']['p95_s']} s |
| `/feedback` acknowledged / errors | {r['feedback']['ok']} / {r['feedback']['errors']} |
| `/feedback` latency p50 / p95 (until durable) | {r['feedback']['p50_s']} s / {r['feedback']['p95_s']} s |
| acknowledged feedback events / turns | {r['acknowledged_feedback']} / {r['acknowledged_turns']} |
| in `loop.store export` after SIGKILL + restart (feedback / turns) | {r['stored_feedback']} / {r['stored_turns']} |
| requests in flight at the SIGKILL (never answered, so never acknowledged) | {in_flight} |
| **lost** (acknowledged, then missing after the restart) | **{r['lost']}** |
| app start / restart after SIGKILL | {r['start_s']} s / {r['restart_s']} s |

`/ask` latency is mostly the wait in the one-at-a-time generation queue ({r['users']} users share
one llama.cpp context); `/feedback` has its own queue and waits only for its group commit. The
store may hold more than was acknowledged: writes committed just before the kill whose answer
never arrived.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load before the SIGKILL")
    parser.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests in all")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer length cap (keeps 2 cores coping)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--record", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    result = run(args.users, args.duration, args.max_requests, args.max_tokens)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as out:
            out.write(markdown(result))
    return 0 if result["lost"] == 0 and result["acknowledged_feedback"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
