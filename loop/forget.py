"""Forget turns everywhere (``python -m loop.store forget TURN_ID... [--conversation ID] [--client ID]``).

What is forgotten: the named turns, every turn of the named conversations and of the named
clients' conversations, and every *later* turn of a named turn's conversation (the model saw the
whole conversation, so a later turn's ``messages`` carry the named turn's text). The receipt lists
the later turns it added.

Where it is removed from, in this order (each step is safe to repeat, so an interrupted forget is
finished by running it again with the same ids):

1. the forget ledger ``$LOOP_HOME/forgotten.jsonl`` (``loop.core.forgotten``: ids only) is written
   first, so the mirror's restore, the push and the pull never bring the turns back, whatever
   step below is interrupted;
2. the registry: every version whose snapshot's training files or whose cycle's training mix
   held one of the turns is marked ``tainted`` (reason, date, turn ids), and so is every version
   trained from a tainted version's weights; the next cycle trains from the newest untainted
   ancestor (``loop.cycle_stages``);
3. Argilla: the records (external id = turn id) with their responses and suggestions, in the
   dataset and every older schema dataset (``annotation.forget``), and the local stack's SQLite
   file is rebuilt;
4. the store: turns, feedback events, outbox rows (``sync_state``, what the push sends) and the
   conversations left empty; then VACUUM, and the WAL checkpointed and truncated; the app
   writer's fallback files beside the store lose the turns' rows;
5. the durable mirror: every segment holding one of the rows is rewritten (on the Hub, in one
   commit, then the repo's history is squashed) and its watermark lowered;
6. every snapshot's JSON-lines files (examples, provenance, preference pairs and labels) and every
   cycle's (the training mix); a snapshot keeps its directory name and its manifest lists the ids
   under ``forgotten``;
7. any other text file under ``$LOOP_HOME`` (reports, cycle state) that still holds one of the
   turns' texts (at least ``MIN_NEEDLE`` characters: their messages, answers, comments and
   corrections) has it replaced by ``[forgotten]``; then every file under the home (SQLite files
   included, model weights and setup-time tools excepted) is searched once more and whatever
   still holds a text is listed under ``residue``.

Bad input: an id that is neither in the store, nor in a snapshot, nor in the ledger (a forget that
already ran) is reported and nothing at all is changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop.config import LoopConfig
from loop.core import paths
from loop.core.errors import LoopError
from loop.core.forgotten import forgotten_ids, record_forgotten
from loop.core.io import utcnow
from loop.core.registry import Registry
from loop.core.store import Store

# Shorter texts ("ok", "thanks") would match unrelated text elsewhere; they are removed with their
# rows by id, only the free-text sweep skips them.
MIN_NEEDLE = 8
REDACTED = "[forgotten]"
# Never searched: model weights hold no text, setup-time tools hold no user data.
SKIP_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".so")
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".csv", ".log", ".html", ".toml", ".yaml", ".yml")


class ForgetError(LoopError, RuntimeError):
    """Bad input: nothing was changed."""


@dataclass
class Receipt:
    at: str
    turns: list[str]
    conversations: list[str]
    later_turns: list[str] = field(default_factory=list)
    removed: dict[str, Any] = field(default_factory=dict)
    tainted: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    residue: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.errors and not self.residue

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "complete": self.complete, "turns": self.turns, "conversations": self.conversations,
                "later_turns": self.later_turns, "removed": self.removed, "tainted": self.tainted,
                "errors": self.errors, "residue": self.residue}


def _jsonl_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jsonl") if p.is_file()) if root.is_dir() else []


def _row_mentions(row: Any, turns: set[str], conversations: set[str]) -> bool:
    if not isinstance(row, dict):
        return False
    return (row.get("id") in turns or row.get("turn_id") in turns
            or row.get("conversation_id") in conversations or (row.get("kind") == "conversation"
                                                                and row.get("id") in conversations))


def filter_jsonl(path: Path, turns: set[str], conversations: set[str] = frozenset()) -> int:
    """Drop the lines of ``path`` that belong to these turns or conversations; returns how many."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)
            continue
        if not _row_mentions(row, turns, conversations):
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        _replace_file(path, "".join(kept).encode("utf-8"))
    return dropped


def _replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.forget-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def needles(texts: list[str]) -> list[bytes]:
    """Each text as it appears in a file: raw, and JSON-escaped with and without ASCII escapes."""
    out: list[bytes] = []
    for text in texts:
        if len(text) < MIN_NEEDLE:
            continue
        for form in (text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]):
            data = form.encode("utf-8")
            if data not in out:
                out.append(data)
    return sorted(out, key=len, reverse=True)  # longest first: a text inside another is replaced after it


def _walk(home: Path, *, skip: tuple[Path, ...]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(home):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not any((here / d) == s for s in skip)]
        for name in filenames:
            p = here / name
            if p.is_file() and not p.is_symlink() and not name.endswith(SKIP_SUFFIXES):
                out.append(p)
    return out


def _snapshot_ids(snap_dir: Path) -> set[str]:
    ids: set[str] = set()
    for f in _jsonl_files(snap_dir):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                ids.add(row["id"])
    return ids


def _trained_ids(home: Path, version) -> set[str]:
    """Ids a version trained on: its snapshot's training-side files and its cycle's training mix."""
    ids: set[str] = set()
    if version.snapshot_hash:
        snap = paths.snapshots_dir(home) / version.snapshot_hash
        for name in ("train.jsonl", "pairs.jsonl", "labels.jsonl"):
            f = snap / name
            if f.is_file():
                ids |= {json.loads(line).get("id") for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    cycle = (version.variant or {}).get("cycle")
    mix = home / "cycles" / str(cycle) / "train.jsonl" if cycle else None
    if mix is not None and mix.is_file():
        ids |= {json.loads(line).get("id") for line in mix.read_text(encoding="utf-8").splitlines() if line.strip()}
    return ids


def taint_versions(registry: Registry, home: Path, turns: set[str], at: str) -> list[dict[str, Any]]:
    """Mark every version trained on these turns, or from a tainted version's weights; returns the marks."""
    tainted: dict[str, str] = {}
    out = []
    for version in registry.list():  # oldest first: a parent is decided before its children
        hit = sorted(_trained_ids(home, version) & turns)
        if hit:
            reason = f"trained on {len(hit)} forgotten turn(s)"
        elif version.parent in tainted:
            reason = f"trained from {version.parent}'s weights, which were trained on forgotten turns"
        else:
            continue
        tainted[version.id] = reason
        registry.taint(version.id, reason, hit or sorted(turns), at=at)
        out.append({"version": version.id, "reason": reason, "turn_ids": hit})
    return out


def forget(config: LoopConfig, turn_ids: list[str] = (), conversation_ids: list[str] = (), clients: list[str] = (), *,
           argilla_client=None, hub_api=None) -> Receipt:
    """Forget these turns, conversations and clients everywhere (the module docstring has the order).

    Raises ``ForgetError`` before changing anything when an id is unknown or nothing was named.
    ``argilla_client`` / ``hub_api``: an Argilla client and an ``HfApi`` to use instead of connecting.
    """
    if not (turn_ids or conversation_ids or clients):
        raise ForgetError("name at least one turn id, --conversation or --client")
    home = Path(config.home)
    store = Store.open(home)
    ledger = forgotten_ids(home)
    scope = store.forget_scope(turn_ids, conversation_ids, clients)
    snap_root = paths.snapshots_dir(home)
    snap_ids: set[str] | None = None
    unknown = []
    for item in scope["unknown"]:
        if item in ledger:
            continue  # forgotten before: this run finishes whatever that one left
        if ":" not in item:
            if snap_ids is None:
                snap_ids = set().union(*[_snapshot_ids(d) for d in snap_root.iterdir() if d.is_dir()]) \
                    if snap_root.is_dir() else set()
            if item in snap_ids:
                continue  # pruned from the store, still in a snapshot
        unknown.append(item)
    if unknown:
        raise ForgetError("unknown: " + ", ".join(unknown) + " (not in the store, any snapshot or the forget "
                          "ledger); nothing was changed")
    turns = set(scope["turns"]) | {t for t in turn_ids if t not in scope["turns"]}
    conversations = set(scope["conversations"])
    receipt = Receipt(at=utcnow(), turns=sorted(turns), conversations=sorted(conversations),
                      later_turns=scope["later_turns"])
    texts = store.forget_texts(sorted(turns))

    # 1. the ledger, before anything is deleted
    record_forgotten(turns, receipt.at, home)
    receipt.removed["ledger"] = str(home / "forgotten.jsonl")

    # 2. the registry
    registry = Registry(paths.registry_dir(home))
    receipt.tainted = taint_versions(registry, home, turns, receipt.at)

    # 3. Argilla
    try:
        from annotation.forget import delete_records, vacuum_local_database

        client = argilla_client
        if client is None:
            from annotation.client import connect

            client = connect(config.annotation)
        deleted = delete_records(client, config.annotation, turns)
        receipt.removed["argilla"] = {"records": deleted, "responses": sum(r["responses"] for r in deleted),
                                      "local_database": vacuum_local_database(home)}
    except Exception as exc:  # the ledger keeps the pull from taking them back; a second run retries
        receipt.errors.append(f"argilla: {type(exc).__name__}: {exc}")

    # 4. the store, and the app writer's fallback files beside it
    receipt.removed["store"] = store.delete_turns(sorted(turns), sorted(conversations))
    receipt.removed["store"].update(store.vacuum())
    if receipt.removed["store"]["checkpoint_busy"]:
        receipt.errors.append("store: another connection kept the WAL from being truncated; run forget again")
    fallback = {}
    for f in sorted(store.path.parent.glob(store.path.name + ".*.jsonl")):
        if n := filter_jsonl(f, turns, conversations):
            fallback[str(f)] = n
    receipt.removed["store_fallback_files"] = fallback

    # 5. the durable mirror
    try:
        from loop.core.mirror import mirror_from_config

        mirror = mirror_from_config(config, store, api=hub_api)
        receipt.removed["mirror"] = mirror.forget(turns, conversations) if mirror is not None else None
    except Exception as exc:  # restore skips ledger ids meanwhile; a second run retries the rewrite
        receipt.errors.append(f"mirror: {type(exc).__name__}: {exc}")

    # 6. snapshots and cycles
    snapshots: dict[str, int] = {}
    if snap_root.is_dir():
        for d in sorted(p for p in snap_root.iterdir() if p.is_dir()):
            gone = sorted(_snapshot_ids(d) & turns)
            n = sum(filter_jsonl(f, turns) for f in _jsonl_files(d))
            manifest = d / "manifest.json"
            if n and manifest.is_file():
                data = json.loads(manifest.read_text())
                data.setdefault("forgotten", []).append({"at": receipt.at, "ids": gone, "lines": n})
                _replace_file(manifest, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
            if n:
                snapshots[d.name] = n
    receipt.removed["snapshots"] = snapshots
    cycles = {str(f.relative_to(home)): n for f in _jsonl_files(home / "cycles") if (n := filter_jsonl(f, turns))}
    receipt.removed["cycles"] = cycles

    # 7. any other copy of the text, then the check
    found = needles(texts)
    redacted = {}
    skip = (home / "tools", home / "argilla", paths.tools_dir())
    for f in _walk(home, skip=skip):
        if f.suffix not in TEXT_SUFFIXES or f.name.startswith(store.path.name):
            continue
        if f.suffix == ".jsonl" and (snap_root in f.parents or home / "cycles" in f.parents):
            continue  # removed by id above; another person's example with the same words stays theirs
        data = f.read_bytes()
        if any(n in data for n in found):
            for n in found:
                data = data.replace(n, REDACTED.encode())
            _replace_file(f, data)
            redacted[str(f.relative_to(home))] = True
    receipt.removed["redacted_files"] = sorted(redacted)
    receipt.residue = residue(home, texts, skip=(home / "tools", paths.tools_dir()))
    return receipt


def residue(home: Path, texts: list[str], *, skip: tuple[Path, ...] = ()) -> list[str]:
    """Files under ``home`` (binary ones too) that still hold one of ``texts``."""
    found = needles(texts)
    if not found:
        return []
    out = []
    for f in _walk(home, skip=skip):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if any(n in data for n in found):
            out.append(str(f.relative_to(home)))
    return out


def receipt_text(receipt: Receipt) -> str:
    r = receipt.removed
    lines = [f"forgot {len(receipt.turns)} turn(s) and {len(receipt.conversations)} conversation(s) at {receipt.at}"]
    if receipt.later_turns:
        lines.append(f"  with {len(receipt.later_turns)} later turn(s) of the same conversations (they carry the "
                     f"text): {', '.join(receipt.later_turns)}")
    store = r.get("store") or {}
    lines.append(f"  store: {store.get('turns', 0)} turn(s), {store.get('feedback', 0)} feedback event(s), "
                 f"{store.get('sync_state', 0)} outbox row(s), {store.get('conversations', 0)} conversation(s); "
                 f"vacuumed, WAL {store.get('wal_bytes', '?')} bytes")
    for path, n in (r.get("store_fallback_files") or {}).items():
        lines.append(f"  writer fallback {path}: {n} row(s)")
    argilla = r.get("argilla")
    if argilla is not None:
        lines.append(f"  argilla: {len(argilla['records'])} record(s) with {argilla['responses']} response(s)"
                     + "".join(f"\n    {x['dataset']}: record {x['record_id']} (turn {x['turn_id']})"
                               for x in argilla["records"]))
    mirror = r.get("mirror")
    if mirror is not None:
        lines.append(f"  mirror {mirror['target']}: {mirror['rows_removed']} row(s); "
                     f"{len(mirror['segments_rewritten'])} segment(s) rewritten, {len(mirror['segments_deleted'])} deleted")
    elif "mirror" in r:
        lines.append("  mirror: off")
    snapshots = r.get("snapshots") or {}
    lines.append(f"  snapshots: {sum(snapshots.values())} line(s) in {len(snapshots)} snapshot(s)")
    lines.append(f"  cycles: {sum((r.get('cycles') or {}).values())} line(s) in {len(r.get('cycles') or {})} file(s)")
    for f in r.get("redacted_files") or []:
        lines.append(f"  redacted text in {f}")
    for t in receipt.tainted:
        lines.append(f"  tainted {t['version']}: {t['reason']}")
    for e in receipt.errors:
        lines.append(f"  NOT DONE {e}")
    for f in receipt.residue:
        lines.append(f"  STILL FOUND in {f}")
    lines.append("complete: nothing of the text is left under LOOP_HOME" if receipt.complete
                 else "incomplete: fix what is named above and run the same forget again")
    return "\n".join(lines)
