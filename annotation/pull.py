"""Pull: reviewed Argilla records -> chat training examples -> a hashed snapshot.

The contract (DESIGN.md): a submitted record becomes a training example whose last message is
the assistant's answer: the reviewer's corrected response when one was given (an unchanged
pre-filled answer is not a correction), else the model's own answer when quality >= 4
(``min_quality``). Discarded records never train.

Several reviewers (task distribution ``min_submitted``):
- a record counts once it has at least ``min_submitted`` submitted responses (else ``pending``);
- a discard by any reviewer keeps the record out of training (safety first: one reviewer saw a
  reason not to train on it), counted as a conflict when others submitted it;
- quality = the median rating, the lower middle one for an even count (conservative);
- the most recently submitted correction wins (reviewers refine each other's corrections);
- ``conflicts`` counts records whose reviewers disagree on whether it trains (ratings on both
  sides of ``min_quality``) or gave different corrections; the rules above still resolve them.

Responses are read from the REST listing (through the SDK's HTTP client) because it carries each
response's ``updated_at``, which "latest correction wins" needs and the SDK's objects drop.

Preference signals (``preference_signals``), written beside the examples for DPO/KTO (trainer/preference.py):

- a **pair** for every accepted record whose reviewer correction really differs from the logged answer
  (after ``judge_split.normalise``): chosen = the correction, rejected = the model's logged answer;
- a **label** of the logged answer: once the record resolves, the reviewers' median quality decides
  (>= ``min_quality`` desirable, <= ``UNDESIRABLE_MAX_QUALITY`` undesirable, in between none), whatever
  the user's thumb said; until then (no or too few submitted reviews) the user's thumb decides
  (up desirable, down undesirable). A discarded record never labels nor pairs.

``python -m annotation.pull [--json]`` writes a snapshot with the loop's config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from annotation.config import AnnotationConfig, AnnotationSettings, as_annotation_config, load_annotation_config
from annotation.judge_split import normalise
from annotation.schema import CURRENT, SchemaMismatchError, find_dataset, read_version
from annotation.snapshot import Snapshot, latest_snapshot, load_snapshot, write_snapshot
from loop.core.errors import LoopError, error_exit


@dataclass
class Resolution:
    """How one Argilla record resolved."""

    record_id: str
    state: str  # "pending" | "discarded" | "rejected" | "accepted"
    example: dict[str, Any] | None = None  # {"id", "messages"} when accepted
    quality: int | None = None
    source: str | None = None  # "correction" | "answer" when accepted
    conflict: bool = False
    submitted: int = 0


def _value(response: dict[str, Any], question: str) -> Any:
    entry = (response.get("values") or {}).get(question)
    return entry.get("value") if isinstance(entry, dict) else None


def resolve(record: dict[str, Any], *, min_submitted: int = 1, min_quality: int = 4) -> Resolution:
    """Apply the contract and the multi-reviewer rules to one record as the REST API returns it."""
    rid = str(record.get("external_id") or record.get("id"))
    responses = record.get("responses") or []
    submitted = [r for r in responses if r.get("status") == "submitted"]
    discarded = [r for r in responses if r.get("status") == "discarded"]
    if discarded:
        return Resolution(rid, "discarded", conflict=bool(submitted), submitted=len(submitted))
    if not submitted or len(submitted) < min_submitted:
        return Resolution(rid, "pending", submitted=len(submitted))

    fields = record.get("fields") or {}
    answer = (fields.get("answer") or "").strip()
    ratings = [int(v) for r in submitted if (v := _value(r, "quality")) is not None]
    quality = statistics.median_low(ratings) if ratings else None
    corrections = []
    for r in submitted:
        text = (_value(r, "corrected_response") or "").strip()
        if text and text != answer:  # the pre-filled answer left as is is no correction
            corrections.append((r.get("updated_at") or r.get("inserted_at") or "", str(r.get("user_id")), text))
    corrections.sort()
    conflict = len({q >= min_quality for q in ratings}) > 1 or len({c[2] for c in corrections}) > 1

    if corrections:
        final, source = corrections[-1][2], "correction"
    elif quality is not None and quality >= min_quality:
        final, source = answer, "answer"
    else:
        return Resolution(rid, "rejected", quality=quality, conflict=conflict, submitted=len(submitted))
    conversation = [{"role": m["role"], "content": m["content"]} for m in fields.get("conversation") or []]
    example = {"id": rid, "messages": conversation + [{"role": "assistant", "content": final}],
               "provenance": {"record_id": str(record.get("id")), "turn_id": rid, "objective": "sft",
                              "reviewers": sorted({str(r.get("user_id")) for r in submitted}),
                              "corrected_by": corrections[-1][1] if source == "correction" else None,
                              "quality": quality, "source": source}}
    return Resolution(rid, "accepted", example, quality, source, conflict, len(submitted))


# A reviewer's quality at or below this marks the logged answer undesirable (the guidelines: 2 = wrong or
# unhelpful in an important way, 1 = harmful); 3 ("usable but flawed") labels nothing.
UNDESIRABLE_MAX_QUALITY = 2
# What build_record writes in place of an empty answer: not text the model produced, so never a signal.
_EMPTY_ANSWER = "(empty answer)"


def preference_signals(record: dict[str, Any], resolution: Resolution, *,
                       min_quality: int = 4) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(pair, label) of one record for preference training; either is None where the record gives none.

    pair: {"id", "prompt", "chosen", "rejected"}; label: {"id", "prompt", "answer", "label", "by"} with
    label "desirable"/"undesirable" and by "reviewer"/"user" (the module docstring has the rule).
    """
    if resolution.state == "discarded":
        return None, None
    fields = record.get("fields") or {}
    answer = (fields.get("answer") or "").strip()
    if not answer or answer == _EMPTY_ANSWER:
        return None, None
    prompt = [{"role": m["role"], "content": m["content"]} for m in fields.get("conversation") or []]
    pair = None
    if resolution.state == "accepted" and resolution.source == "correction":
        chosen = resolution.example["messages"][-1]["content"]
        if normalise(chosen) != normalise(answer):
            pair = {"id": resolution.record_id, "prompt": prompt, "chosen": chosen, "rejected": answer}
    label, by = None, None
    if resolution.state in ("accepted", "rejected") and resolution.quality is not None:
        by = "reviewer"
        if resolution.quality >= min_quality:
            label = "desirable"
        elif resolution.quality <= UNDESIRABLE_MAX_QUALITY:
            label = "undesirable"
    else:
        by = "user"
        label = {"up": "desirable", "down": "undesirable"}.get((record.get("metadata") or {}).get("thumbs"))
    labelled = {"id": resolution.record_id, "prompt": prompt, "answer": answer, "label": label, "by": by} \
        if label else None
    return pair, labelled


def iter_records(client, dataset_id, *, batch_size: int = 500, progress: bool = True,
                 total: int | None = None) -> Iterator[dict[str, Any]]:
    """Every record of a dataset with responses and suggestions, as plain JSON, page by page."""
    http = client.api.http_client
    offset = 0
    with tqdm(total=total, desc="pull from Argilla", unit="rec", disable=not progress) as bar:
        while True:
            resp = http.get(
                f"/api/v1/datasets/{dataset_id}/records",
                params={"offset": offset, "limit": batch_size, "include": ["responses", "suggestions"]},
            )
            resp.raise_for_status()
            items = resp.json()["items"]
            if not items:
                return
            yield from items
            offset += len(items)
            bar.update(len(items))
            if len(items) < batch_size:
                return


def _record_total(client, dataset_id) -> int:
    resp = client.api.http_client.get(f"/api/v1/datasets/{dataset_id}/records", params={"offset": 0, "limit": 1})
    resp.raise_for_status()
    return int(resp.json()["total"])


def read_all(client, dataset_id, *, batch_size: int = 500, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every record of a dataset by record id (external id).

    The listing pages by offset ordered by insertion time, and records inserted by one bulk request
    can share that time, so a page boundary could in principle skip or repeat one. Records are kept
    by id (repeats collapse) and the listing is read again, once, if fewer than ``total`` came back.
    """
    total = _record_total(client, dataset_id)
    records: dict[str, dict[str, Any]] = {}
    for attempt in range(2):
        for record in iter_records(client, dataset_id, batch_size=batch_size, progress=progress and attempt == 0, total=total):
            records[str(record.get("external_id") or record["id"])] = record
        if len(records) >= total:
            break
    if len(records) < total:
        raise RuntimeError(f"read {len(records)} distinct records of dataset {dataset_id} but Argilla reports {total}; "
                           "was it being written to? Pull again.")
    return records


def _usernames(client) -> dict[str, str]:
    """User id -> user name, for provenance; empty when this key may not list users (an annotator's)."""
    try:
        resp = client.api.http_client.get("/api/v1/users")
        resp.raise_for_status()
        return {str(u["id"]): u["username"] for u in resp.json()["items"]}
    except Exception:  # provenance keeps the ids, which is what identifies a reviewer
        return {}


def collect(client, config: AnnotationConfig, *, progress: bool = True,
            preferences: dict[str, list] | None = None, skip_ids: set[str] | None = None,
            ) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """Resolve every record of the dataset (and of older schema datasets still present).

    Returns (examples, counts, source). A record id seen in a newer dataset wins over an older one.
    ``preferences``, when given, receives the records' ``preference_signals`` under "pairs" and "labels".
    Records whose id is in ``skip_ids`` (forgotten turns, ``loop.core.forgotten``) are left out and counted
    under "forgotten". Each example's ``provenance`` names its dataset and its reviewers' user names.
    """
    counts = {k: 0 for k in ("records", "submitted", "pending", "discarded", "rejected", "conflicts",
                             "examples", "from_corrections", "from_answers")}
    examples: list[dict[str, Any]] = []
    seen: set[str] = set()
    datasets = []
    usernames = _usernames(client)
    for name in CURRENT.lineage(config.dataset):  # newest first
        dataset = find_dataset(client, config, name)
        if dataset is None:
            continue
        found = read_version(dataset.settings.guidelines)
        if found is not None and found > CURRENT.version:
            raise SchemaMismatchError(f"dataset {config.workspace}/{name} has schema v{found}, newer than this code's "
                                      f"v{CURRENT.version}: upgrade this installation before pulling.")
        datasets.append({"name": name, "id": str(dataset.id), "schema_version": found})
        records = read_all(client, dataset.id, batch_size=config.pull_batch_size, progress=progress)
        for rid in sorted(records):
            if rid in seen:
                continue
            seen.add(rid)
            if skip_ids and rid in skip_ids:
                counts["forgotten"] = counts.get("forgotten", 0) + 1
                continue
            res = resolve(records[rid], min_submitted=config.min_submitted, min_quality=config.min_quality)
            if res.example is not None:
                prov = res.example["provenance"]
                prov["dataset"] = name
                prov["reviewer_names"] = [usernames.get(u) for u in prov["reviewers"]]
            if preferences is not None:
                pair, label = preference_signals(records[rid], res, min_quality=config.min_quality)
                preferences.setdefault("pairs", []).extend([pair] if pair else [])
                preferences.setdefault("labels", []).extend([label] if label else [])
            counts["records"] += 1
            counts["conflicts"] += int(res.conflict)
            if res.state in ("pending", "discarded"):
                counts[res.state] += 1
                continue
            counts["submitted"] += 1
            if res.state == "rejected":
                counts["rejected"] += 1
                continue
            examples.append(res.example)
            counts["from_corrections" if res.source == "correction" else "from_answers"] += 1
    counts["examples"] = len(examples)
    source = {"workspace": config.workspace, "datasets": datasets, "min_submitted": config.min_submitted,
              "min_quality": config.min_quality}
    return examples, counts, source


# --- the reviewer's side (what the UI does; used by tests, demos and scripted reviews) ---------


def review_queue(client, dataset_id, *, limit: int = 1000) -> list[dict[str, Any]]:
    """The records a user sees in the review UI, highest ``priority`` first.

    Uses the per-user search endpoint the UI uses, so it works for annotators (who may not list
    a dataset's records) as well as owners.
    """
    body = {"sort": [{"scope": {"entity": "metadata", "metadata_property": "priority"}, "order": "desc"}]}
    resp = client.api.http_client.post(f"/api/v1/me/datasets/{dataset_id}/records/search",
                                       params={"limit": limit, "include": ["responses", "suggestions"]}, json=body)
    resp.raise_for_status()
    return [item["record"] for item in resp.json()["items"]]


def submit_review(client, record_server_id, *, quality: int | None = None, correction: str | None = None,
                  issues: list[str] | None = None, status: str = "submitted") -> None:
    """Submit (or discard, or save as draft) the calling user's response to one record."""
    from argilla._models import UserResponseModel

    values: dict[str, Any] = {}
    if quality is not None:
        values["quality"] = {"value": int(quality)}
    if correction is not None:
        values["corrected_response"] = {"value": correction}
    if issues:
        values["issues"] = {"value": list(issues)}
    me = client.me
    client.api.records.create_record_response(record_server_id, UserResponseModel(values=values, status=status, user_id=me.id))


def pull_snapshot(config: AnnotationSettings = None, *, client=None, previous: Snapshot | str | Path | None | bool = None,
                  home: Path | None = None, progress: bool = True) -> Snapshot:
    """Pull reviewed records and write a snapshot under $LOOP_HOME/snapshots (see annotation.snapshot).

    ``previous`` is the snapshot counts and the held-out history are relative to: None = the
    latest one under LOOP_HOME, False = none (a first pull), or a Snapshot / its directory.
    """
    started = time.monotonic()
    cfg = as_annotation_config(config)
    if client is None:
        from annotation.client import connect

        client = connect(cfg)
    if previous is None:
        prev = latest_snapshot(home)
    elif previous is False:
        prev = None
    elif isinstance(previous, Snapshot):
        prev = previous
    else:
        prev = load_snapshot(previous)
    preferences: dict[str, list] = {"pairs": [], "labels": []}
    from loop.core.forgotten import forgotten_ids

    examples, counts, source = collect(client, cfg, progress=progress, preferences=preferences,
                                       skip_ids=forgotten_ids(home))
    source["duration_s"] = round(time.monotonic() - started, 3)
    return write_snapshot(examples, counts, eval_percent=cfg.eval_percent, min_held_out=cfg.min_held_out,
                          previous=prev, source=source, home=home, pairs=preferences["pairs"],
                          labels=preferences["labels"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotation.pull", description="Pull reviews into a training snapshot.")
    parser.add_argument("--config", help="TOML config file (default: $LOOP_CONFIG or $LOOP_HOME/config.toml)")
    parser.add_argument("--json", action="store_true", help="print path, hash and counts as JSON")
    args = parser.parse_args(argv)
    try:
        snap = pull_snapshot(load_annotation_config(args.config).annotation, progress=not args.json)
    except LoopError as exc:  # a bad config, Argilla unreachable, a schema mismatch
        return error_exit(exc)
    out = {"path": str(snap.path), "hash": snap.hash, "counts": snap.counts, "reused": snap.reused}
    print(json.dumps(out, indent=2) if args.json else f"snapshot {snap.hash[:12]} at {snap.path}: {snap.counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
