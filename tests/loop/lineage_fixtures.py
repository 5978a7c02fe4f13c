"""A home with reviewed feedback, a snapshot and a promoted version trained on it (for lineage and forget tests).

Real parts throughout: the real store, the real local Argilla stack (push, a scripted reviewer, pull),
the real registry. No training runs: the bundled GGUF stands in for the version's exported file, and
the cycle's training mix is the snapshot's training split plus the marked example, as ``decide`` writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from loop.config import LoopConfig, load_config
from loop.core.registry import Registry, Version
from loop.core.store import Store

MARKER = "QUOKKA-7Z3-UNIQUE-MARKER"


@dataclass
class TrainedHome:
    config: LoopConfig
    home: Path
    store: Store
    registry: Registry
    version: Version
    snapshot: object
    marked_turn: str
    later_turn: str
    cycle_id: str


def argilla_env(stack, monkeypatch, home: Path) -> None:
    monkeypatch.setenv("ARGILLA_API_URL", stack.api_url)
    monkeypatch.setenv("ARGILLA_API_KEY", stack.api_key)
    monkeypatch.setenv("LOOP_ANNOTATION__DATASET", f"lineage-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("LOOP_ANNOTATION__EVAL_PERCENT", "25")
    monkeypatch.setenv("LOOP_APP__MIRROR_DIR", str(home / "mirror"))  # inside the home: the walk covers it


def trained_home(stack, bundled_gguf: Path) -> TrainedHome:
    from annotation.pull import pull_snapshot
    from annotation.push import push
    from loop.core.bootstrap import ensure_base_version
    from loop.core.mirror import mirror_from_config
    from loop.demo import load_samples, scripted_review

    config = load_config()
    home = Path(config.home)
    store = Store.open(home)
    assert load_samples(store) > 20
    conv = store.new_conversation(client="client-marker")
    first = [{"role": "user", "content": f"My locker code is {MARKER}. Can you remember it for me?"}]
    marked = store.log_turn(conversation_id=conv, messages=first, answer=f"Sure, your code is {MARKER}.",
                            model_version="v1")
    store.add_feedback(marked, thumbs="down", comment=f"never repeat {MARKER} back",
                       correction=f"I can't store secrets such as {MARKER}; keep it in a password manager.")
    later = store.log_turn(conversation_id=conv, messages=first + [
        {"role": "assistant", "content": f"Sure, your code is {MARKER}."},
        {"role": "user", "content": "And what is the capital of France?"}], answer="Paris.", model_version="v1")
    mirror = mirror_from_config(config, store)
    mirror.flush(force=True)
    report = push(config, store=store, progress=False)
    assert report.failed == 0, report.errors
    scripted_review(config, store, stack)
    snap = pull_snapshot(config, progress=False)
    snap_text = "".join((snap.path / n).read_text() for n in ("train.jsonl", "eval.jsonl"))
    assert MARKER in snap_text, "the marked turn's correction must be in the snapshot"

    # A cycle's files as decide writes them: the mix it trained (here: the training split and the marked
    # example), and a report that quotes the text, as a human-written note or an error message might.
    cycle_id = "20990101T000000Z-lineag"
    cycle_dir = home / "cycles" / cycle_id
    cycle_dir.mkdir(parents=True)
    train_rows = [json.loads(line) for line in snap.train_path.read_text().splitlines() if line.strip()]
    marked_rows = [json.loads(line) for line in snap_text.splitlines() if line.strip() and MARKER in line]
    mix = {r["id"]: r for r in train_rows + marked_rows}
    (cycle_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mix.values()))
    (cycle_dir / "state.json").write_text(json.dumps({"id": cycle_id, "push": {"errors": [
        f"422: field answer: Sure, your code is {MARKER}."]}}))
    reports = home / "reports"
    reports.mkdir(exist_ok=True)
    (reports / f"{cycle_id}.md").write_text(f"# cycle\nan example: {first[0]['content']}\n")

    registry = Registry()
    ensure_base_version(config, registry)
    candidate = home / "export-model.gguf"
    try:
        os.link(bundled_gguf, candidate)
    except OSError:
        shutil.copyfile(bundled_gguf, candidate)
    version = registry.register(candidate, base_model=config.model.name, parent=registry.current_id(),
                                variant={"name": "lr0.001_r16", "cycle": cycle_id}, snapshot_hash=snap.hash,
                                snapshot_counts=snap.counts, verification={"passed": True}, link=True)
    candidate.unlink()
    registry.promote(version.id, reason="test: trained on the snapshot")
    return TrainedHome(config, home, store, registry, version, snap, marked, later, cycle_id)
