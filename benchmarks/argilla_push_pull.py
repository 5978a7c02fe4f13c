"""Push throughput and pull time against a real Argilla (the local stack by default).

    python benchmarks/argilla_push_pull.py --records 10000 [--batch-size 200] [--reviewed 2000] [--write-results]

Steps, each timed: log N synthetic turns in a fresh store (a quarter with feedback, some with
personal data to scrub); push them all (budget N); push again (nothing changed: the cost of a
no-op cycle); submit reviews for ``--reviewed`` records in bulk as the owner; pull a snapshot of
all N records. Without ARGILLA_API_URL/ARGILLA_API_KEY a local stack is started in a temporary
LOOP_HOME on free ports and stopped afterwards. ``--write-results`` appends a section to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _fill_store(store, n: int, rng: random.Random) -> list[str]:
    from tqdm import tqdm

    cid = store.new_conversation()
    ids = []
    topics = ["python", "cooking", "history", "math", "travel", "music", "health", "finance"]
    for i in tqdm(range(n), desc="log turns", unit="turn"):
        topic = rng.choice(topics)
        question = f"Question {i} about {topic}: how would you explain it to a beginner in a few sentences?"
        if i % 50 == 0:
            question += f" Reach me at user{i}@example.com or +1 415 555 {i % 10000:04d}."
        answer = (f"Here is an explanation of {topic}. " * rng.randint(3, 12)).strip()
        tid = store.log_turn(conversation_id=cid, messages=[{"role": "system", "content": "Be helpful."},
                                                            {"role": "user", "content": question}],
                             answer=answer, model_version="bench-v1", logprob_mean=-rng.random() * 2.5,
                             logprob_min=-rng.random() * 8, latency_s=rng.random() * 3)
        if i % 4 == 0:
            store.add_feedback(tid, thumbs=rng.choice(["up", "down"]), reasons=[], comment=None)
        ids.append(tid)
    return ids


def _review_in_bulk(client, dataset, n: int, rng: random.Random) -> float:
    """The owner submits n responses through bulk upserts (fast; the UI would post them one by one)."""
    import argilla as rg

    started = time.monotonic()
    me = client.me
    offset, done = 0, 0
    while done < n:
        page = client.api.http_client.get(f"/api/v1/datasets/{dataset.id}/records",
                                          params={"offset": offset, "limit": min(500, n - done)})
        page.raise_for_status()
        items = page.json()["items"]
        if not items:
            break
        records = []
        for item in items:
            quality = rng.randint(1, 5)
            responses = [rg.Response("quality", quality, user_id=me.id, status="submitted")]
            if quality <= 2:
                responses.append(rg.Response("corrected_response", "A better answer.", user_id=me.id, status="submitted"))
            records.append(rg.Record(id=item["external_id"], fields=item["fields"], responses=responses))
        dataset.records.log(records)
        offset += len(items)
        done += len(items)
    return time.monotonic() - started


def run(args) -> dict:
    from annotation.client import connect
    from annotation.config import AnnotationConfig
    from annotation.pull import pull_snapshot
    from annotation.push import push
    from annotation.schema import find_dataset
    from loop.core import paths
    from loop.core.store import Store

    rng = random.Random(1234)
    # The argilla-server virtualenv is a setup-time tool: find it before LOOP_HOME moves to a temp dir.
    os.environ.setdefault("LOOP_TOOLS", str(paths.tools_dir()))
    home = Path(tempfile.mkdtemp(prefix="bench-argilla-"))
    os.environ["LOOP_HOME"] = str(home / "loop")
    stack_home = None
    if os.environ.get("ARGILLA_API_URL") and os.environ.get("ARGILLA_API_KEY"):
        url, key = os.environ["ARGILLA_API_URL"], os.environ["ARGILLA_API_KEY"]
    else:
        from annotation.config import StackConfig
        from annotation.server import start_stack

        port, search_port, redis_port = _free_ports(3)
        stack_home = home / "stack"
        info = start_stack(home=stack_home, config=StackConfig(port=port, search_port=search_port, redis_port=redis_port),
                           use_external=False)
        url, key = info.api_url, info.api_key
    try:
        cfg = AnnotationConfig(dataset=f"bench-{args.records}-{int(time.time())}", budget_per_cycle=args.records,
                               push_batch_size=args.batch_size, thumbs_up_sample_rate=1.0)
        client = connect(cfg, api_url=url, api_key=key)
        store = Store.open()
        t0 = time.monotonic()
        _fill_store(store, args.records, rng)
        log_s = time.monotonic() - t0
        first = push(cfg, store, client)
        assert first.sent == args.records and first.failed == 0, first
        noop = push(cfg, store, client, progress=False)
        assert noop.sent == 0
        dataset = find_dataset(client, cfg)
        review_s = _review_in_bulk(client, dataset, args.reviewed, rng) if args.reviewed else 0.0
        t0 = time.monotonic()
        snap = pull_snapshot(cfg, client=client, previous=False)
        pull_s = time.monotonic() - t0
        return {
            "records": args.records, "batch_size": args.batch_size, "log_turns_s": round(log_s, 1),
            "push_s": round(first.duration_s, 1), "push_records_per_s": round(args.records / first.duration_s, 1),
            "scrubbed": first.scrubbed, "noop_push_s": round(noop.duration_s, 1), "reviewed": args.reviewed,
            "review_upload_s": round(review_s, 1), "pull_s": round(pull_s, 1),
            "pull_records_per_s": round(args.records / pull_s, 1), "snapshot_counts": snap.counts,
            "argilla": "local stack" if stack_home else "external",
        }
    finally:
        if stack_home is not None:
            from annotation.server import stop_stack

            stop_stack(stack_home)
        shutil.rmtree(home, ignore_errors=True)


def _append_results(result: dict, command: str) -> None:
    today = dt.date.today().isoformat()
    c = result["snapshot_counts"]
    lines = [
        "",
        f"## Argilla push/pull, {result['records']:,} records ({today}, 2-core CPU machine, 24 GiB)",
        "",
        f"Command: `{command}` against the {result['argilla']} (argilla-server 2.8, SQLite, osmem search). "
        f"1-minute load average before/after: {result['load_avg_1m'][0]} / {result['load_avg_1m'][1]} "
        "(other work shared the two cores).",
        "",
        "| step | time | rate |",
        "| --- | --- | --- |",
        f"| log turns into the store | {result['log_turns_s']} s "
        f"| {result['records'] / max(result['log_turns_s'], 1e-9):.0f} turns/s |",
        f"| push all (batch {result['batch_size']}, scrub, outbox) | {result['push_s']} s "
        f"| **{result['push_records_per_s']} records/s** |",
        f"| push again, nothing changed | {result['noop_push_s']} s | |",
        f"| owner uploads {result['reviewed']:,} reviews in bulk | {result['review_upload_s']} s | |",
        f"| pull {result['records']:,} records into a snapshot | **{result['pull_s']} s** "
        f"| {result['pull_records_per_s']} records/s |",
        "",
        f"Snapshot: {c.get('examples', 0)} examples ({c.get('train', 0)} train / {c.get('eval', 0)} eval), "
        f"{c.get('rejected', 0)} rejected, {c.get('pending', 0)} pending. Scrubbed: {result['scrubbed']}.",
        "",
    ]
    with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--reviewed", type=int, default=2_000, help="records given a (bulk) review before the pull")
    parser.add_argument("--write-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]
    result = run(args)
    result["load_avg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(json.dumps(result, indent=2))
    if args.write_results:
        _append_results(result, "python benchmarks/argilla_push_pull.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
