"""Forgetting a turn everywhere: store, mirror, Argilla, snapshots, cycles, reports; the version it trained is tainted.

The acceptance test builds a home with the real store, the real local Argilla stack, a real local mirror and
the real registry (tests/loop/lineage_fixtures.py), forgets the turn that holds a unique marker, then walks
every file under LOOP_HOME (the SQLite store and its WAL included) and asks Argilla's search endpoint for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lineage_fixtures import MARKER, argilla_env, trained_home

from loop import store as store_cli
from loop import versions
from loop.core.mirror import HubDatasetTarget, LocalDirTarget, Mirror
from loop.core.store import Store


def _files_holding(root: Path, needle: str) -> list[str]:
    data = needle.encode()
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and data in p.read_bytes()]


def test_after_forget_the_marker_is_nowhere_under_loop_home_nor_in_argilla_and_the_version_is_tainted(
        argilla_stack, bundled_gguf, loop_home, monkeypatch, capsys):
    import argilla as rg

    from annotation.forget import search_text
    from annotation.pull import read_all
    from annotation.schema import find_dataset

    argilla_env(argilla_stack, monkeypatch, loop_home)
    th = trained_home(argilla_stack, bundled_gguf)
    client = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    assert search_text(client, th.config.annotation, MARKER), "the search endpoint finds the marker before"
    assert {"store.db", "mirror"} & {p.split("/")[0] for p in _files_holding(loop_home, MARKER)}

    assert store_cli.main(["forget", th.marked_turn, "--json"]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["complete"] and receipt["residue"] == []
    assert receipt["later_turns"] == [th.later_turn]  # the later turn's messages carry the marked text
    assert receipt["removed"]["store"]["turns"] == 2 and receipt["removed"]["store"]["sync_state"] >= 1
    assert {r["turn_id"] for r in receipt["removed"]["argilla"]["records"]} >= {th.marked_turn}
    assert receipt["removed"]["argilla"]["responses"] >= 1
    assert receipt["removed"]["mirror"]["rows_removed"] >= 3
    assert receipt["removed"]["snapshots"] and receipt["removed"]["cycles"]

    assert _files_holding(loop_home, MARKER) == []  # every file: store.db, -wal, mirror, snapshots, cycles, reports
    assert search_text(client, th.config.annotation, MARKER) == []
    records = read_all(client, find_dataset(client, th.config.annotation).id, progress=False)
    assert th.marked_turn not in records and th.later_turn not in records and records

    assert [t["version"] for t in receipt["tainted"]] == [th.version.id]
    assert versions.main(["list", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert "tainted" in rows[th.version.id]["marks"] and "tainted" not in rows["v1"]["marks"]
    assert versions.main(["show", th.version.id]) == 0
    assert "tainted" in capsys.readouterr().out

    # Nothing brings it back: the push has nothing to send, the pull has nothing of it, and the next
    # cycle trains from the untainted ancestor although nothing new arrived.
    from annotation.pull import pull_snapshot
    from annotation.push import push
    from loop.cycle_pipeline import CycleContext
    from loop.cycle_stages import stage_decide
    from loop.cycle_state import CycleState

    assert push(th.config, store=Store.open(), progress=False).created == 0
    snap = pull_snapshot(th.config, progress=False)
    assert MARKER not in "".join(p.read_text() for p in snap.path.iterdir() if p.is_file())
    ctx = CycleContext.create(th.config, progress=False)
    state = CycleState.new(loop_home / "cycles", False)
    state.data["stages"]["pull"] = {"status": "done", "result": {
        "hash": snap.hash, "counts": snap.counts, "judge": snap.manifest.get("judge") or {},
        "train_path": str(snap.train_path), "eval_path": str(snap.eval_path)}}
    decided = stage_decide(ctx, state)
    assert decided.trained_from == "v1" and decided.current_version == th.version.id
    assert MARKER not in Path(decided.train_path).read_text()


def test_forgetting_an_unknown_id_says_so_and_changes_nothing(loop_home, capsys):
    store = Store.open()
    conv = store.new_conversation()
    store.log_turn(conversation_id=conv, messages=[{"role": "user", "content": "hello there"}], answer="hi")
    store.close()

    def state() -> dict[str, str]:
        # Opening the store makes SQLite's empty WAL and its shared-memory index: no data in either.
        return {str(p.relative_to(loop_home)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in loop_home.rglob("*") if p.is_file() and not p.name.endswith("-shm")
                and not (p.name.endswith("-wal") and p.stat().st_size == 0)}

    before = state()
    assert store_cli.main(["forget", "01NOSUCHTURN"]) == 1
    assert "unknown: 01NOSUCHTURN" in capsys.readouterr().err
    assert store_cli.main(["forget", "--conversation", "nope", "--client", "nobody"]) == 1
    err = capsys.readouterr().err
    assert "conversation:nope" in err and "client:nobody" in err
    assert store_cli.main(["forget"]) == 1
    assert state() == before
    assert not (loop_home / "forgotten.jsonl").exists()


def _two_turns(store: Store) -> tuple[str, str]:
    a = store.log_turn(conversation_id=store.new_conversation(), messages=[{"role": "user", "content": f"keep {MARKER}"}],
                       answer="kept")
    b = store.log_turn(conversation_id=store.new_conversation(), messages=[{"role": "user", "content": "other"}],
                       answer="fine")
    store.add_feedback(a, thumbs="down", comment=f"about {MARKER}")
    return a, b


def test_a_forgotten_turn_leaves_the_hub_mirror_and_its_history_and_is_never_restored(tmp_path):
    from fake_hub import FakeHubApi

    api = FakeHubApi(tmp_path / "downloads")
    store = Store(tmp_path / "a" / "store.db")
    a, b = _two_turns(store)
    mirror = Mirror(store, HubDatasetTarget("me/mirror", api=api, commit_interval_s=0), tmp_path / "a" / "state.json")
    mirror.flush(force=True)
    conv = store.get_turn(a)["conversation_id"]
    store.delete_turns([a], [conv])
    result = mirror.forget({a}, {conv})
    assert result["rows_removed"] == 3  # the conversation, the turn, its feedback
    repo = api.repos[("dataset", "me/mirror")]
    assert all(MARKER.encode() not in data for _, files in repo.history for data in files.values())
    restored = Store(tmp_path / "b" / "store.db")
    Mirror(restored, HubDatasetTarget("me/mirror", api=api), tmp_path / "b" / "state.json").restore()
    assert restored.get_turn(a) is None and restored.get_turn(b) is not None


def test_a_new_turn_that_reuses_a_forgotten_turns_rowid_is_still_mirrored(tmp_path):
    store = Store(tmp_path / "h" / "store.db")
    target = LocalDirTarget(tmp_path / "mirror")
    mirror = Mirror(store, target, tmp_path / "h" / "state.json")
    a, b = _two_turns(store)
    mirror.flush(force=True)
    # b holds the highest rowid; SQLite gives it to the next row once b is gone.
    store.delete_turns([b])
    mirror.forget({b}, set())
    c = store.log_turn(conversation_id=store.new_conversation(), messages=[{"role": "user", "content": "new"}],
                       answer="new one")
    mirror.flush(force=True)
    fresh = Store(tmp_path / "f" / "store.db")
    Mirror(fresh, target, tmp_path / "f" / "state.json").restore()
    assert fresh.get_turn(c) is not None and fresh.get_turn(b) is None and fresh.get_turn(a) is not None


def test_restore_leaves_out_turns_in_the_forget_ledger(tmp_path):
    from loop.core.forgotten import record_forgotten

    store = Store(tmp_path / "h" / "store.db")
    target = LocalDirTarget(tmp_path / "mirror")
    a, b = _two_turns(store)
    Mirror(store, target, tmp_path / "h" / "state.json").flush(force=True)
    home = tmp_path / "wiped"
    home.mkdir()
    record_forgotten([a], "2099-01-01T00:00:00+00:00", home)  # a forget whose segment rewrite never happened
    fresh = Store(home / "store.db")
    result = Mirror(fresh, target, home / "mirror-state.json").restore()
    assert fresh.get_turn(a) is None and fresh.get_turn(b) is not None
    assert result.forgotten == 2 and result.complete  # the turn and its feedback, left out on purpose
