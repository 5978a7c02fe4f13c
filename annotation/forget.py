"""Forgetting on Argilla's side: delete the records of forgotten turns (``python -m loop.store forget``).

A record's external id is its turn's id (annotation.schema), so the records of a set of turns are
found by external id in the dataset and in every older schema dataset still present
(``CURRENT.lineage``). Deleting a record deletes its responses and suggestions with it and takes
it out of Argilla's search index. ``search_text`` asks the search endpoint for a string, which is
how a forget is checked.

The local stack (``annotation.server``) keeps its database as SQLite under
``$LOOP_HOME/argilla/server``: SQLite leaves a deleted record's bytes in free pages until the file
is rebuilt, so ``vacuum_local_database`` rebuilds it (best effort: a server holding a write lock
makes it report ``busy``, and the next forget tries again).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from annotation.config import AnnotationConfig, AnnotationSettings, as_annotation_config
from annotation.pull import read_all
from annotation.schema import CURRENT, find_dataset

# Ids per DELETE request: the ids travel in the query string, which servers limit in length.
DELETE_BATCH = 100


def find_records(client, config: AnnotationConfig, turn_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The records of these turns in every dataset of the schema's lineage: dataset, ids, response count."""
    wanted = set(turn_ids)
    found = []
    for name in CURRENT.lineage(config.dataset):
        dataset = find_dataset(client, config, name)
        if dataset is None:
            continue
        for external_id, record in read_all(client, dataset.id, progress=False).items():
            if external_id in wanted:
                found.append({"dataset": name, "dataset_id": str(dataset.id), "turn_id": external_id,
                              "record_id": str(record["id"]), "responses": len(record.get("responses") or [])})
    return found


def delete_records(client, config: AnnotationSettings, turn_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Delete the records of these turns (with their responses and suggestions); returns what was deleted."""
    cfg = as_annotation_config(config)
    found = find_records(client, cfg, turn_ids)
    http = client.api.http_client
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for rec in found:
        by_dataset.setdefault(rec["dataset_id"], []).append(rec)
    for dataset_id, recs in by_dataset.items():
        for start in range(0, len(recs), DELETE_BATCH):
            ids = ",".join(r["record_id"] for r in recs[start:start + DELETE_BATCH])
            resp = http.delete(f"/api/v1/datasets/{dataset_id}/records", params={"ids": ids})
            resp.raise_for_status()
    return found


def search_text(client, config: AnnotationSettings, text: str) -> list[dict[str, Any]]:
    """Records of the lineage's datasets whose text matches ``text`` in Argilla's search index."""
    cfg = as_annotation_config(config)
    hits = []
    for name in CURRENT.lineage(cfg.dataset):
        dataset = find_dataset(client, cfg, name)
        if dataset is None:
            continue
        resp = client.api.http_client.post(f"/api/v1/datasets/{dataset.id}/records/search",
                                           params={"limit": 50, "include": ["responses", "suggestions"]},
                                           json={"query": {"text": {"q": text}}})
        resp.raise_for_status()
        hits += [{"dataset": name, **item["record"]} for item in resp.json()["items"]]
    return hits


def vacuum_local_database(home: Path) -> dict[str, Any] | None:
    """Rebuild the local stack's SQLite database; None when this home runs no local stack."""
    db_path = Path(home) / "argilla" / "server" / "argilla.db"
    if not db_path.is_file():
        return None
    try:
        db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
        try:
            db.execute("VACUUM")
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
    except sqlite3.OperationalError as exc:  # the server holds a lock: say so, the rows are deleted anyway
        return {"path": str(db_path), "vacuumed": False, "busy": str(exc)}
    return {"path": str(db_path), "vacuumed": True}
