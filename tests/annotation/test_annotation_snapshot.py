"""Snapshots: content hash, a judge split chosen from the text alone, held-out ids never leak into training."""

from __future__ import annotations

import json

from annotation.judge_split import split_for_judging
from annotation.snapshot import latest_snapshot, load_snapshot, write_snapshot


def _ex(i, answer="ok"):
    return {"id": f"turn-{i:04d}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]}


def test_snapshot_layout_hash_and_counts(loop_home):
    examples = [_ex(i) for i in range(200)]
    snap = write_snapshot(examples, {"records": 210, "discarded": 10}, eval_percent=10)
    assert snap.path == loop_home / "snapshots" / snap.hash and len(snap.hash) == 64
    train, evals = snap.examples("train"), snap.examples("eval")
    assert len(train) + len(evals) == 200
    assert {e["id"] for e in evals} == split_for_judging(examples, eval_percent=10, min_held_out=2).held_out_ids
    assert len(evals) == 20  # the floor: 10% of 200 singletons
    for line in snap.train_path.read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"id", "messages"} and row["messages"][-1]["role"] == "assistant"
    manifest = json.loads((snap.path / "manifest.json").read_text())
    assert manifest["hash"] == snap.hash
    assert manifest["counts"] == {"records": 210, "discarded": 10, "new": 200, "changed": 0, "removed": 0,
                                  "train": len(train), "eval": len(evals)}
    assert latest_snapshot().hash == snap.hash


def test_same_content_same_hash_in_any_order(loop_home):
    examples = [_ex(i) for i in range(50)]
    first = write_snapshot(examples, {}, eval_percent=10)
    again = write_snapshot(list(reversed(examples)), {}, eval_percent=10, previous=first)
    assert again.hash == first.hash and again.reused
    assert again.counts["new"] == again.counts["changed"] == again.counts["removed"] == 0
    changed = write_snapshot([_ex(0, "better")] + examples[1:] + [_ex(99)], {}, eval_percent=10, previous=again)
    assert changed.hash != first.hash
    assert (changed.counts["new"], changed.counts["changed"], changed.counts["removed"]) == (1, 1, 0)


def test_split_is_stable_and_held_out_ids_never_move_to_training(loop_home):
    examples = [_ex(i) for i in range(300)]
    first = write_snapshot(examples, {}, eval_percent=10)
    held = {e["id"] for e in first.examples("eval")}
    # more data arrives, the eval share is even lowered, and a held-out example drops out for a while
    gone = sorted(held)[0]
    second = write_snapshot([e for e in examples if e["id"] != gone] + [_ex(i) for i in range(300, 400)], {},
                            eval_percent=5, previous=first)
    third = write_snapshot(examples + [_ex(i) for i in range(300, 400)], {}, eval_percent=5, previous=second)
    for snap in (second, third):
        train_ids = {e["id"] for e in snap.examples("train")}
        assert not (train_ids & held), "a once held-out example leaked into training"
    assert gone in {e["id"] for e in third.examples("eval")}
    assert held <= load_snapshot(third.path).held_out_ids
