"""Training snapshots: content-addressed directories of chat examples under $LOOP_HOME/snapshots.

    snapshots/<sha256>/train.jsonl     {"id": ..., "messages": [..., {"role": "assistant", ...}]} per line
    snapshots/<sha256>/eval.jsonl      same format, the held-out examples
    snapshots/<sha256>/manifest.json   hash, counts, eval_percent, held_out_ids, judge, created_at, source
    snapshots/<sha256>/pairs.jsonl     preference pairs {"id", "prompt", "chosen", "rejected"} (training side)
    snapshots/<sha256>/labels.jsonl    unpaired labels {"id", "prompt", "answer", "label", "by"} (training side)
    snapshots/<sha256>/eval_pairs.jsonl, eval_labels.jsonl   the same, held out
    snapshots/LATEST                   the newest snapshot's hash

Pairs and labels (annotation/pull.py says where they come from) split with the judge: one whose id is
held out, or whose prompt is a held-out wording, is held out too, so an example that judges a cycle never
trains any objective. The manifest's ``preference`` lists the files and their counts. The four files
are written always (empty when there is nothing), and the hash covers each one that is not empty, so a
snapshot without preference data keeps the hash it had before these files existed.

``provenance.jsonl`` says, per example id (both splits), where it came from: the Argilla record
and the turn, the reviewers, quality, source (correction or answer) and objective. It is written
when the pull knows them and the hash covers it like the files above (a snapshot without it keeps
its old hash); ``python -m loop.versions lineage`` reads it. ``python -m loop.store forget`` may
later remove examples from a snapshot: the directory keeps its name (the hash of what versions were
trained on) and the manifest's ``forgotten`` lists the ids removed and when.

The hash covers the examples and their split only (not the manifest), so pulling the same
reviews twice gives the same directory. The split holds out whole wordings of taught corrections,
chosen from the text alone (annotation/judge_split.py: the rule, the floor, and why), and every id
that was ever held out stays held out (``held_out_ids`` is carried from snapshot to snapshot), so an
eval example never leaks into training later, even if eval_percent changes or the example drops out
for a while. The manifest's ``judge`` says how the split came out (``judge.notes`` when the data was
too small to reach the floor).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotation.judge_split import split_for_judging, wording_key
from loop.core import paths
from loop.core.io import read_jsonl, utcnow

MANIFEST = "manifest.json"
LATEST = "LATEST"
PROVENANCE = "provenance.jsonl"
PREFERENCE_FILES = ("pairs.jsonl", "labels.jsonl", "eval_pairs.jsonl", "eval_labels.jsonl")


@dataclass
class Snapshot:
    path: Path
    hash: str
    counts: dict[str, int]
    train_path: Path
    eval_path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # the same content existed already; its directory was kept as is

    def examples(self, split: str = "train") -> list[dict[str, Any]]:
        return read_jsonl(self.train_path if split == "train" else self.eval_path)

    @property
    def held_out_ids(self) -> set[str]:
        return set(self.manifest.get("held_out_ids", []))

    def provenance(self) -> dict[str, dict[str, Any]]:
        """Example id -> where it came from (empty for a snapshot written without provenance)."""
        path = self.path / PROVENANCE
        return {row["id"]: row for row in read_jsonl(path)} if path.is_file() else {}

    def preference_path(self, name: str) -> Path:
        """One of PREFERENCE_FILES in this snapshot (it may not exist in snapshots older than them)."""
        return self.path / name


def _lines(examples: list[dict[str, Any]]) -> str:
    return "".join(json.dumps({"id": e["id"], "messages": e["messages"]}, ensure_ascii=False, sort_keys=True) + "\n"
                   for e in sorted(examples, key=lambda e: e["id"]))


def content_hash(train_text: str, eval_text: str, extra: dict[str, str] | None = None) -> str:
    """sha256 of the examples' split and of every non-empty extra file (name and text), in name order."""
    digest = hashlib.sha256()
    digest.update(b"train\n" + train_text.encode("utf-8") + b"eval\n" + eval_text.encode("utf-8"))
    for name, text in sorted((extra or {}).items()):
        if text:
            digest.update(name.encode("utf-8") + b"\n" + text.encode("utf-8"))
    return digest.hexdigest()


def _provenance_lines(examples: list[dict[str, Any]]) -> str:
    """provenance.jsonl's text: one line per example that carries ``provenance`` (annotation.pull)."""
    rows = [{**e["provenance"], "id": e["id"]} for e in examples if e.get("provenance")]
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in sorted(rows, key=lambda r: r["id"]))


def _rows(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                   for r in sorted(rows, key=lambda r: (r["id"], json.dumps(r, sort_keys=True))))


def split_preferences(pairs: list[dict[str, Any]], labels: list[dict[str, Any]], examples: list[dict[str, Any]],
                      held_out: set[str]) -> dict[str, str]:
    """The four preference files' texts: held out when the id is, or when the prompt is a held-out wording."""
    held_wordings = {wording_key(e) for e in examples if e["id"] in held_out}

    def judged(row: dict[str, Any]) -> bool:
        return row["id"] in held_out or wording_key({"messages": row["prompt"] + [{}]}) in held_wordings

    return {"pairs.jsonl": _rows([p for p in pairs if not judged(p)]),
            "labels.jsonl": _rows([lab for lab in labels if not judged(lab)]),
            "eval_pairs.jsonl": _rows([p for p in pairs if judged(p)]),
            "eval_labels.jsonl": _rows([lab for lab in labels if judged(lab)])}


def snapshots_root(home: Path | None = None) -> Path:
    return paths.snapshots_dir(home)


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    return Snapshot(path, manifest["hash"], dict(manifest.get("counts", {})), path / "train.jsonl", path / "eval.jsonl", manifest)


def latest_snapshot(home: Path | None = None) -> Snapshot | None:
    """The snapshot LATEST points at, or None before the first pull."""
    pointer = snapshots_root(home) / LATEST
    if not pointer.is_file():
        return None
    path = snapshots_root(home) / pointer.read_text().strip()
    return load_snapshot(path) if (path / MANIFEST).is_file() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_snapshot(
    examples: list[dict[str, Any]],
    counts: dict[str, int],
    *,
    eval_percent: int,
    min_held_out: int = 2,
    previous: Snapshot | None = None,
    source: dict[str, Any] | None = None,
    home: Path | None = None,
    pairs: list[dict[str, Any]] | None = None,
    labels: list[dict[str, Any]] | None = None,
) -> Snapshot:
    """Split, hash and write ``examples`` ({"id", "messages"}); adds new/changed/removed/train/eval to counts.

    ``pairs`` and ``labels`` (annotation.pull.preference_signals) are split with the same judge and written
    beside the examples (PREFERENCE_FILES)."""
    held_out = set(previous.held_out_ids) if previous else set()
    judge = split_for_judging(examples, eval_percent=eval_percent, min_held_out=min_held_out, carried=held_out)
    held_out |= judge.held_out_ids
    train = [e for e in examples if e["id"] not in held_out]
    evals = [e for e in examples if e["id"] in held_out]
    train_text, eval_text = _lines(train), _lines(evals)
    preference = split_preferences(pairs or [], labels or [], examples, held_out)
    provenance_text = _provenance_lines(examples)
    digest = content_hash(train_text, eval_text, {**preference, PROVENANCE: provenance_text})

    before: dict[str, Any] = {}
    if previous is not None:
        for split in ("train", "eval"):
            before.update({e["id"]: e["messages"] for e in previous.examples(split)})
    now_ids = {e["id"] for e in examples}
    counts = dict(counts)
    counts["new"] = sum(1 for e in examples if e["id"] not in before)
    counts["changed"] = sum(1 for e in examples if e["id"] in before and before[e["id"]] != e["messages"])
    counts["removed"] = sum(1 for i in before if i not in now_ids)
    counts["train"], counts["eval"] = len(train), len(evals)

    root = snapshots_root(home)
    root.mkdir(parents=True, exist_ok=True)
    final = root / digest
    reused = (final / MANIFEST).is_file()
    if not reused:
        manifest = {
            "hash": digest,
            "created_at": utcnow("auto"),
            "format": "chat-jsonl-v1",
            "eval_percent": eval_percent,
            "counts": counts,
            "previous": previous.hash if previous else None,
            "source": source or {},
            "held_out_ids": sorted(held_out),
            "judge": judge.summary(),
            "preference": _preference_summary(preference),
        }
        # Write into a temporary sibling and rename: a reader never sees a half-written snapshot.
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            (tmp / "train.jsonl").write_text(train_text, encoding="utf-8")
            (tmp / "eval.jsonl").write_text(eval_text, encoding="utf-8")
            if provenance_text:
                (tmp / PROVENANCE).write_text(provenance_text, encoding="utf-8")
            for name, text in preference.items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:  # another pull wrote the same content first
                if not (final / MANIFEST).is_file():
                    raise
                reused = True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if reused:
        # Same examples as an older snapshot, but the held-out history may have grown since: keep
        # the union, or a later pull could move a once-held-out id into training.
        manifest = json.loads((final / MANIFEST).read_text())
        if not held_out <= set(manifest.get("held_out_ids", [])):
            manifest["held_out_ids"] = sorted(held_out | set(manifest.get("held_out_ids", [])))
            _write_atomic(final / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(root / LATEST, digest + "\n")
    snap = load_snapshot(final)
    snap.counts, snap.reused = counts, reused
    return snap


def _preference_summary(preference: dict[str, str]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for name, text in preference.items():
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        stem = name.removesuffix(".jsonl")
        counts[stem] = len(rows)
        if "labels" in stem:
            counts[f"{stem}_desirable"] = sum(r["label"] == "desirable" for r in rows)
            counts[f"{stem}_undesirable"] = sum(r["label"] == "undesirable" for r in rows)
    return {"files": list(preference), "counts": counts}
