"""Push: store turns -> Argilla records, idempotent, prioritised, scrubbed, resumable.

The store's ``sync_state`` table is the outbox. For each turn and target it holds:

- ``content_hash``: the hash of the record content Argilla **acknowledged** last (None if never);
- ``status``: ``sent`` (Argilla has that content), ``pending`` (chosen by a cycle's budget, not
  yet acknowledged) or ``failed`` (a send failed; ``next_attempt_at`` says when to retry, with
  exponential backoff ``retry_base_s * 2**(attempts-1)`` capped at ``retry_max_s``).

A run sends, in priority order: outbox items (pending, or failed and due), records already in
Argilla whose content changed (new feedback), and up to ``budget_per_cycle`` new turns chosen by
``annotation.priority``. Records are upserted by id (= turn id), so a send that Argilla applied but
whose reply was lost is simply applied again: nothing doubles. A turn is marked ``sent`` only after
Argilla acknowledged its batch, so a crash, a kill or a dead server loses nothing: the next run
sees the same hashes and finishes the job.

``python -m annotation.push [--json]`` runs one push with the loop's config.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from annotation.config import AnnotationConfig, AnnotationSettings, as_annotation_config, load_annotation_config
from annotation.priority import Ranked, rank_turn, select
from annotation.schema import SCHEMA_VERSION, build_record, ensure_dataset, review_url, to_argilla
from annotation.scrub import SCRUBBER_VERSION, Scrubber
from loop.core.errors import LoopError, error_exit

# Stop a run after this many consecutive failed batches (the server is down, not one bad record);
# everything left is marked failed with backoff instead of hammering a dead server.
MAX_CONSECUTIVE_BATCH_FAILURES = 2


@dataclass
class PushReport:
    """What one push did. ``sent`` = records Argilla acknowledged (``created`` + ``updated``)."""

    target: str = ""
    dataset: str = ""
    review_url: str = ""  # the review page, sorted by priority
    considered: int = 0  # turns in the store
    sent: int = 0
    created: int = 0  # records Argilla had never acknowledged before
    updated: int = 0  # acknowledged before, content replaced (reviews are kept)
    failed: int = 0  # chosen but not acknowledged; in the outbox for the next run
    skipped: int = 0  # not sent this run: the sum of the four below
    unchanged: int = 0  # Argilla already has this content
    over_budget: int = 0  # eligible new turns left for a later cycle
    not_eligible: int = 0  # unsampled thumbs-up, or a tier left out of priority_order
    deferred: int = 0  # failed before, waiting for their backoff
    tiers: dict[str, int] = field(default_factory=dict)  # sent records per tier
    scrubbed: dict[str, int] = field(default_factory=dict)  # replacements per kind
    errors: list[str] = field(default_factory=list)  # first few distinct errors
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse(ts: str | None) -> dt.datetime | None:
    if not ts:
        return None
    when = dt.datetime.fromisoformat(ts)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def source_hash(turn: dict[str, Any], config: AnnotationConfig) -> str:
    """Hash of everything a record is built from (turn, latest feedback, scrub and priority settings).

    Cheaper than building the record (no scrubbing), and equal inputs give an equal record.
    """
    fb = turn.get("feedback") or {}
    keys = ("id", "messages", "answer", "model_version", "logprob_mean", "logprob_min", "latency_s", "created_at")
    basis = {
        "schema": SCHEMA_VERSION,
        "turn": {k: turn.get(k) for k in keys},
        "feedback": {k: fb.get(k) for k in ("thumbs", "reasons", "comment", "correction")},
        "scrub": [config.scrub, sorted(config.scrub_kinds), list(config.scrub_extra_patterns), SCRUBBER_VERSION],
        "priority": [list(config.priority_order), config.uncertainty_threshold, config.thumbs_up_sample_rate],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def target_name(dataset) -> str:
    """Sync-state target: a recreated dataset has a new id, so everything is pushed to it afresh."""
    return f"argilla:{dataset.workspace.name}/{dataset.name}:{dataset.id}"


def _backoff(attempts: int, config: AnnotationConfig, now: dt.datetime) -> str:
    delay = min(config.retry_base_s * 2 ** max(attempts - 1, 0), config.retry_max_s)
    return (now + dt.timedelta(seconds=delay)).isoformat()


def _mark_many(store, target: str, items: list[dict[str, Any]]) -> None:
    """Write outbox rows; one transaction when the store offers ``sync_mark_many``."""
    many = getattr(store, "sync_mark_many", None)
    if many is not None:
        many(target, items)
        return
    for item in items:
        store.sync_mark(target, item["turn_id"], content_hash=item["content_hash"], status=item["status"],
                        error=item.get("error"), next_attempt_at=item.get("next_attempt_at"))


@dataclass
class _Job:
    turn: dict[str, Any]
    ranked: Ranked
    new_hash: str
    acked_hash: str | None  # what Argilla has (None: never acknowledged)
    attempts: int  # failed attempts so far
    status: str | None  # outbox status before this run (None: never chosen)
    payload: dict[str, Any] | None = None  # built (and scrubbed) once, on first send


def _is_record_error(exc: Exception) -> bool:
    """A 400/422 from Argilla: something in the records, not the server, is wrong."""
    return getattr(exc, "status_code", None) in (400, 422)


class _Sender:
    """Sends jobs in batches; bisects a batch Argilla rejects to isolate the bad records."""

    def __init__(self, client, dataset, store, target, config, scrubber, report, now):
        self.client, self.dataset, self.store, self.target = client, dataset, store, target
        self.config, self.scrubber, self.report, self.now = config, scrubber, report, now

    def _fail(self, jobs: list[_Job], exc: BaseException | str) -> None:
        message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        message = message[:500]
        if message not in self.report.errors and len(self.report.errors) < 5:
            self.report.errors.append(message)
        _mark_many(self.store, self.target, [
            {"turn_id": j.turn["id"], "content_hash": j.acked_hash, "status": "failed", "error": message,
             "next_attempt_at": _backoff(j.attempts + 1, self.config, self.now)}
            for j in jobs
        ])
        self.report.failed += len(jobs)

    def send(self, jobs: list[_Job]) -> bool:
        """Send one batch; True if Argilla acknowledged every record of it."""
        for j in jobs:
            if j.payload is None:
                j.payload = build_record(j.turn, scrubber=self.scrubber, tier=j.ranked.tier, priority=j.ranked.priority)
        try:
            models = []
            for j in jobs:
                record = to_argilla(j.payload)
                record.dataset = self.dataset  # suggestions resolve their question ids through it
                models.append(record.api_model())
            self.client.api.records.bulk_upsert(dataset_id=self.dataset.id, records=models)
        except Exception as exc:
            if _is_record_error(exc) and len(jobs) > 1:
                mid = len(jobs) // 2
                first, second = self.send(jobs[:mid]), self.send(jobs[mid:])
                return first and second
            self._fail(jobs, exc)
            return _is_record_error(exc)  # a bad record is not a reason to stop the run
        _mark_many(self.store, self.target, [
            {"turn_id": j.turn["id"], "content_hash": j.new_hash, "status": "sent"} for j in jobs
        ])
        # The bulk reply does not say which records existed; the outbox does: acknowledged before = update.
        updated = sum(1 for j in jobs if j.acked_hash is not None)
        self.report.sent += len(jobs)
        self.report.updated += updated
        self.report.created += len(jobs) - updated
        for j in jobs:
            self.report.tiers[j.ranked.tier] = self.report.tiers.get(j.ranked.tier, 0) + 1
        return True


def plan(store, target: str, config: AnnotationConfig, now: dt.datetime, report: PushReport) -> list[_Job]:
    """Decide what this run sends (outbox, updates, budgeted new turns) and fill the skip counts."""
    state = store.sync_state(target)
    must: list[_Job] = []  # outbox items and updates: always sent
    new: dict[str, _Job] = {}
    from loop.core.forgotten import forgotten_ids

    # A forgotten turn brought back into the store by any route (a restored backup) is never sent again.
    forgotten = forgotten_ids(Path(store.path).parent) if getattr(store, "path", None) else set()
    for turn in store.iter_turns():
        if turn["id"] in forgotten:
            continue
        report.considered += 1
        tid = turn["id"]
        h = source_hash(turn, config)
        st = state.get(tid)
        acked = st["content_hash"] if st else None
        attempts = (st.get("attempts") or 0) if st else 0
        if st and st["status"] == "sent" and acked == h:
            report.unchanged += 1
            continue
        ranked = rank_turn(turn, config)
        job = _Job(turn, ranked, h, acked, attempts, st["status"] if st else None)
        if st and st["status"] == "failed":
            due = _parse(st.get("next_attempt_at"))
            if due is not None and due > now:
                report.deferred += 1
                continue
            must.append(job)
        elif st and (st["status"] == "pending" or acked is not None):
            must.append(job)  # chosen by an earlier cycle, or already in Argilla with new content
        elif ranked.eligible:
            new[tid] = job
        else:
            report.not_eligible += 1
    chosen, left = select([j.ranked for j in new.values()], config.budget_per_cycle)
    report.over_budget = len(left)
    jobs = must + [new[r.turn_id] for r in chosen]
    jobs.sort(key=lambda j: (-j.ranked.priority, j.turn["id"]))  # most important first, should the run die
    return jobs


def push(config: AnnotationSettings = None, store=None, client=None, *, now: dt.datetime | None = None,
         progress: bool = True) -> PushReport:
    """Push what changed to Argilla and return what happened.

    Raises ``annotation.client.ArgillaUnavailable`` only when Argilla cannot be reached at all
    before anything was chosen (then nothing changed). Failures after that are counted in the
    report and left in the outbox.
    """
    started = time.monotonic()
    cfg = as_annotation_config(config)
    if store is None:
        from loop.core.store import Store

        store = Store.open()
    if client is None:
        from annotation.client import connect

        client = connect(cfg)
    now = now or dt.datetime.now(dt.UTC)
    dataset = ensure_dataset(client, cfg)
    report = PushReport(target=target_name(dataset), dataset=f"{cfg.workspace}/{dataset.name}",
                        review_url=review_url(client.api_url, dataset.id))
    jobs = plan(store, report.target, cfg, now, report)
    # Budgeted new turns enter the outbox before the first send: if this run dies, the next one
    # still owes them, whatever arrived in between.
    _mark_many(store, report.target, [
        {"turn_id": j.turn["id"], "content_hash": None, "status": "pending"}
        for j in jobs if j.status is None
    ])
    scrubber = Scrubber(cfg.scrub_kinds, cfg.scrub_extra_patterns, enabled=cfg.scrub)
    sender = _Sender(client, dataset, store, report.target, cfg, scrubber, report, now)
    size = cfg.push_batch_size
    consecutive_failures = 0
    with tqdm(total=len(jobs), desc="push to Argilla", unit="rec", disable=not progress or not jobs) as bar:
        for start in range(0, len(jobs), size):
            batch = jobs[start:start + size]
            if consecutive_failures >= MAX_CONSECUTIVE_BATCH_FAILURES:
                sender._fail(batch, "not attempted: Argilla kept failing earlier in this run")
            elif sender.send(batch):
                consecutive_failures = 0
            else:
                consecutive_failures += 1
            bar.update(len(batch))
    report.skipped = report.unchanged + report.over_budget + report.not_eligible + report.deferred
    report.scrubbed = dict(Counter(scrubber.totals))
    report.duration_s = round(time.monotonic() - started, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotation.push", description="Push new feedback to Argilla.")
    parser.add_argument("--config", help="TOML config file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = push(load_annotation_config(args.config).annotation, progress=not args.json)
    except LoopError as exc:  # a bad config, Argilla unreachable, a schema mismatch
        return error_exit(exc)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{report.dataset}: sent {report.sent} (created {report.created}, updated {report.updated}), "
              f"failed {report.failed}, skipped {report.skipped}, scrubbed {report.scrubbed} in {report.duration_s}s\n"
              f"review at {report.review_url}")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
