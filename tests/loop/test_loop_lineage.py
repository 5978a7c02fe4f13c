"""Lineage: a version back to the reviewed records that trained it, read from the registry and the snapshot alone.

The home is built with the real store, the real local Argilla stack (push, a scripted reviewer, pull)
and the real registry (tests/loop/lineage_fixtures.py).
"""

from __future__ import annotations

import json

from lineage_fixtures import argilla_env, trained_home

from annotation.snapshot import content_hash, write_snapshot
from loop import versions


def _jsonl_ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_lineage_of_a_promoted_version_lists_exactly_its_snapshots_training_split(argilla_stack, bundled_gguf,
                                                                                   loop_home, monkeypatch, capsys):
    argilla_env(argilla_stack, monkeypatch, loop_home)
    th = trained_home(argilla_stack, bundled_gguf)
    snap_dir = th.snapshot.path
    # The store is not needed: lineage reads the registry and the snapshot only.
    th.store.close()
    for f in loop_home.glob("store.db*"):
        f.unlink()

    assert versions.main(["lineage", th.version.id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in data["training"]] == _jsonl_ids(snap_dir / "train.jsonl")
    assert data["held_out"] == _jsonl_ids(snap_dir / "eval.jsonl")
    assert data["snapshot"]["hash"] == th.snapshot.hash and data["snapshot"]["present"]
    assert [c["id"] for c in data["chain"]] == [th.version.id, "v1"]
    assert data["objective"] == "sft"

    provenance = {json.loads(line)["id"]: json.loads(line) for line in (snap_dir / "provenance.jsonl").read_text().splitlines()}
    assert set(provenance) == set(_jsonl_ids(snap_dir / "train.jsonl")) | set(_jsonl_ids(snap_dir / "eval.jsonl"))
    for row in data["training"]:
        assert row["turn_id"] == row["id"]  # a record's external id is its turn's id
        assert row["record_id"] == provenance[row["id"]]["record_id"] and row["record_id"] != row["id"]
        assert row["reviewers"] and row["reviewer_names"] == [argilla_stack.reviewer_username] * len(row["reviewers"])
        assert row["source"] in ("correction", "answer") and row["quality"] in (1, 2, 3, 4, 5)
        assert row["objective"] == "sft"
        assert row["in_training_mix"] is True  # the fixture's mix holds the whole training split

    # The Argilla record ids are the server's own ids of those records.
    import argilla as rg

    from annotation.pull import read_all
    from annotation.schema import find_dataset

    client = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    records = read_all(client, find_dataset(client, th.config.annotation).id, progress=False)
    for row in data["training"]:
        assert str(records[row["id"]]["id"]) == row["record_id"]

    assert versions.main(["lineage", th.version.id]) == 0
    text = capsys.readouterr().out
    assert f"chain: {th.version.id} <- v1" in text and th.snapshot.hash in text


def test_lineage_of_the_base_version_has_no_feedback(loop_home, capsys):
    from loop.config import load_config
    from loop.core.bootstrap import ensure_base_version

    ensure_base_version(load_config())
    assert versions.main(["lineage", "v1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["snapshot"] is None and data["training"] == [] and data["held_out"] == []
    assert versions.main(["lineage", "v9"]) == 1  # an unknown version is an error, not a traceback
    assert "no version 'v9'" in capsys.readouterr().err


def test_snapshot_hash_covers_provenance_and_is_unchanged_without_it(loop_home):
    example = {"id": "t1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    plain = write_snapshot([dict(example)], {}, eval_percent=0, min_held_out=0, home=loop_home)
    train = (plain.path / "train.jsonl").read_text()
    assert plain.hash == content_hash(train, (plain.path / "eval.jsonl").read_text())  # the old definition
    assert not (plain.path / "provenance.jsonl").exists()
    with_prov = write_snapshot([{**example, "provenance": {"record_id": "r-1", "turn_id": "t1", "objective": "sft"}}],
                               {}, eval_percent=0, min_held_out=0, home=loop_home)
    assert with_prov.hash != plain.hash
    assert (with_prov.path / "train.jsonl").read_text() == train  # train.jsonl's format is unchanged
    assert with_prov.provenance()["t1"]["record_id"] == "r-1"
