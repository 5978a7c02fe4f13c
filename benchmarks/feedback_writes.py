"""Feedback write throughput and the latency that logging adds to a chat turn.

    python benchmarks/feedback_writes.py [--events 2000] [--users 20] [--turns 500] [--json]

Everything is durable (the store runs SQLite in WAL mode with synchronous=FULL: a committed
write survives a power cut), in a throwaway LOOP_HOME. Measured:

  * feedback events/s, one writer calling ``Store.add_feedback`` (one fsync per event);
  * feedback events/s through the app's path (``app.writer.StoreWriter``) with ``--users``
    concurrent users, each waiting until its event is committed (group commit); target >= 1000/s;
  * the latency logging adds to a turn: ``Store.log_turn`` (waits for its fsync) and the app's
    ``StoreWriter.log_turn`` (queues; durable a moment later), p50/p99; target p99 < 5 ms;
  * how long until a queued turn is durable (the app's path), p50/p99.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.writer import StoreWriter  # noqa: E402
from loop.core.store import Store  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a helpful, concise assistant."},
    {"role": "user", "content": "Explain, step by step, how a sourdough starter works. " * 12},
    {"role": "assistant", "content": "A sourdough starter is a culture of wild yeast and lactic acid bacteria. " * 8},
    {"role": "user", "content": "And how do I keep it alive while on holiday?"},
]
ANSWER = "Feed it, refrigerate it, and give it two feedings before baking again. " * 10


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def turn_kwargs(cid: str) -> dict:
    return dict(conversation_id=cid, messages=MESSAGES, answer=ANSWER, model_version="v1", gguf_sha256="ab" * 32,
                sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 256, "seed": 1, "finish_reason": "stop"},
                latency_s=2.0, ttft_s=0.3, prompt_tokens=420, completion_tokens=160, logprob_mean=-0.8, logprob_min=-6.1)


def bench(events: int, users: int, turns: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="feedback-bench-"))
    store = Store(home / "store.db")
    cid = store.new_conversation("bench")
    out: dict = {}

    # 1. The latency logging adds to a turn, synchronous store call (waits for its fsync).
    lat = []
    for _ in range(turns):
        t = time.perf_counter()
        tid = store.log_turn(**turn_kwargs(cid))
        lat.append(time.perf_counter() - t)
    out["store_log_turn_ms"] = {"p50": pct(lat, 0.5) * 1e3, "p99": pct(lat, 0.99) * 1e3, "n": turns}

    # 2. The app's path: queue the turn (what the turn waits for), and time until durable.
    writer = StoreWriter(store)
    added, durable = [], []
    for _ in range(turns):
        t = time.perf_counter()
        writer.log_turn(**turn_kwargs(cid))
        added.append(time.perf_counter() - t)
        writer.flush()
        durable.append(time.perf_counter() - t)
    out["app_log_turn_added_ms"] = {"p50": pct(added, 0.5) * 1e3, "p99": pct(added, 0.99) * 1e3, "n": turns}
    out["app_log_turn_until_durable_ms"] = {"p50": pct(durable, 0.5) * 1e3, "p99": pct(durable, 0.99) * 1e3}

    # 3. Feedback, one writer, one fsync per event.
    seq = max(200, events // 4)
    t = time.perf_counter()
    for i in range(seq):
        store.add_feedback(tid, thumbs="down", reasons=["style", "incomplete"], comment=f"seq {i}", correction="Better.")
    dt = time.perf_counter() - t
    out["store_feedback_sequential"] = {"events": seq, "events_per_s": seq / dt}

    # 4. Feedback through the app's group-commit writer, `users` users at once, each waiting
    #    for its own event to be durable before sending the next.
    per_user = events // users
    barrier = threading.Barrier(users + 1)
    before_batches = writer.batches
    waits: list[float] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        mine = []
        barrier.wait()
        for i in range(per_user):
            t0 = time.perf_counter()
            writer.add_feedback(tid, thumbs="up" if i % 2 else "down", reasons=[], comment=f"user {u} event {i}")
            mine.append(time.perf_counter() - t0)
        with lock:
            waits.extend(mine)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for th in threads:
        th.start()
    barrier.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    total = per_user * users
    commits = writer.batches - before_batches
    got = sum(1 for e in store.feedback_events(tid) if (e["comment"] or "").startswith("user "))
    writer.close()
    out["app_feedback_concurrent"] = {
        "users": users, "events": total, "events_per_s": total / dt, "commits": commits,
        "events_per_commit": total / max(1, commits), "all_present": got == total,
        "ack_ms_p50": pct(waits, 0.5) * 1e3, "ack_ms_p99": pct(waits, 0.99) * 1e3,
    }
    store.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "load_avg_1m": os.getloadavg()[0],
              **bench(args.events, args.users, args.turns)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    r = result
    print(f"machine: {r['machine']} (1-min load average at start {r['load_avg_1m']:.1f})")
    print(f"turn logging, store (waits for fsync): p50 {r['store_log_turn_ms']['p50']:.2f} ms, "
          f"p99 {r['store_log_turn_ms']['p99']:.2f} ms")
    print(f"turn logging, app (queued):           p50 {r['app_log_turn_added_ms']['p50']:.3f} ms, "
          f"p99 {r['app_log_turn_added_ms']['p99']:.3f} ms   (target p99 < 5 ms)")
    print(f"  ... until durable:                  p50 {r['app_log_turn_until_durable_ms']['p50']:.2f} ms, "
          f"p99 {r['app_log_turn_until_durable_ms']['p99']:.2f} ms")
    s = r["store_feedback_sequential"]
    print(f"feedback, one writer, fsync each:     {s['events_per_s']:.0f} events/s ({s['events']} events)")
    c = r["app_feedback_concurrent"]
    print(f"feedback, app, {c['users']} users at once:     {c['events_per_s']:.0f} events/s ({c['events']} events, "
          f"{c['events_per_commit']:.1f} per commit, ack p50 {c['ack_ms_p50']:.1f} ms / p99 {c['ack_ms_p99']:.1f} ms, "
          f"all present: {c['all_present']})   (target >= 1000/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
