"""Active-learning priority and the push plan (budget, sampling, outbox), on a real store; no Argilla."""

from __future__ import annotations

import datetime as dt

import pytest

from annotation.config import AnnotationConfig
from annotation.priority import hash_fraction, rank_turn, sample_key, sampled, select
from annotation.push import PushReport, plan, source_hash
from loop.core.store import Store

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
TARGET = "argilla:test"


def _turn(tid, *, lp=None, created="2025-01-01T00:00:00+00:00", fb=None):
    return {"id": tid, "logprob_mean": lp, "created_at": created, "feedback": fb}


def test_tiers_and_priority_order():
    cfg = AnnotationConfig(uncertainty_threshold=-1.0)
    down = rank_turn(_turn("a", fb={"thumbs": "down", "reasons": []}), cfg)
    corrected = rank_turn(_turn("b", fb={"thumbs": None, "reasons": [], "correction": "better"}), cfg)
    reason_only = rank_turn(_turn("c", fb={"thumbs": None, "reasons": ["too_verbose"]}), cfg)
    unsure = rank_turn(_turn("d", lp=-3.0), cfg)
    less_unsure = rank_turn(_turn("e", lp=-1.5), cfg)
    confident = rank_turn(_turn("f", lp=-0.1), cfg)
    old = rank_turn(_turn("g", created="2024-01-01T00:00:00+00:00"), cfg)
    up = rank_turn(_turn("h", lp=-3.0, fb={"thumbs": "up", "reasons": ["clear"]}), cfg)
    assert [r.tier for r in (down, corrected, reason_only, unsure, confident, up)] == [
        "negative", "negative", "negative", "uncertain", "recent", "positive"]
    # tiers are ordered by the integer part; inside a tier least confident / newest first
    assert down.priority > unsure.priority > less_unsure.priority > confident.priority > old.priority > up.priority
    assert int(down.priority) == 4 and int(unsure.priority) == 3 and int(confident.priority) == 2 and int(up.priority) == 1


def test_priority_order_is_configurable():
    cfg = AnnotationConfig(priority_order=["uncertain", "negative"])
    unsure = rank_turn(_turn("d", lp=-3.0), cfg)
    down = rank_turn(_turn("a", fb={"thumbs": "down", "reasons": []}), cfg)
    recent = rank_turn(_turn("f", lp=-0.1), cfg)
    assert unsure.priority > down.priority
    assert not recent.eligible and recent.priority < 1


def _up(question, answer="a", tid=None):
    return {"id": tid or question, "messages": [{"role": "user", "content": question}], "answer": answer,
            "feedback": {"thumbs": "up"}}


def test_thumbs_up_sampling_is_deterministic_and_near_the_rate():
    turns = [_up(f"question {i}") for i in range(2000)]
    chosen = [t["messages"][0]["content"] for t in turns if sampled(t, 0.2)]
    # Pinned, not recomputed: the sample must be the same in every process, on every machine.
    assert len(chosen) == 403 and chosen[:3] == ["question 0", "question 18", "question 20"]
    assert hash_fraction("turn-0") == pytest.approx(0.6974343859647273, abs=1e-15)
    assert all(0.0 <= hash_fraction(sample_key(t)) < 1.0 for t in turns[:50])
    assert not any(sampled(t, 0.0) for t in turns) and all(sampled(t, 1.0) for t in turns)


def test_the_thumbs_up_sample_follows_the_text_not_the_random_turn_id():
    turns = [_up(f"question {i}") for i in range(200)]
    again = [_up(f"question {i}", tid=f"01J{i:023d}") for i in range(200)]  # the same chats, other ids
    assert [sampled(t, 0.2) for t in turns] == [sampled(t, 0.2) for t in again]
    # The answer is part of what was liked: the same question answered otherwise is another draw.
    assert [sampled(_up("q", answer=f"answer {i}"), 0.5) for i in range(40)].count(True) not in (0, 40)


def test_select_respects_budget_and_priority():
    cfg = AnnotationConfig()
    ranked = [rank_turn(_turn(f"r{i}", lp=-1.5 - i), cfg) for i in range(5)]
    ranked.append(rank_turn(_turn("up", fb={"thumbs": "up", "reasons": []}), AnnotationConfig(thumbs_up_sample_rate=0)))
    chosen, left = select(ranked, 2)
    assert [r.turn_id for r in chosen] == ["r4", "r3"]  # least confident first
    assert [r.turn_id for r in left] == ["r2", "r1", "r0"]  # the unsampled thumbs-up is in neither


def _store_with_turns():
    store = Store.open()
    cid = store.new_conversation()
    ids = {}
    for name, lp in [("down", -0.2), ("unsure", -2.5), ("recent1", -0.2), ("recent2", -0.1), ("up_a", -0.1),
                     ("up_b", -0.1), ("up_c", -0.1), ("up_d", -0.1)]:
        ids[name] = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": name}], answer="a",
                                   model_version="v1", logprob_mean=lp)
    store.add_feedback(ids["down"], thumbs="down", reasons=["incomplete"])
    for name in ("up_a", "up_b", "up_c", "up_d"):
        store.add_feedback(ids[name], thumbs="up")
    return store, ids


def test_plan_fills_the_budget_by_priority_and_samples_thumbs_up():
    store, ids = _store_with_turns()
    cfg = AnnotationConfig(budget_per_cycle=3, thumbs_up_sample_rate=0.5)
    report = PushReport()
    jobs = plan(store, TARGET, cfg, NOW, report)
    assert [j.turn["id"] for j in jobs] == [ids["down"], ids["unsure"], ids["recent2"]]
    ups = [store.get_turn(ids[n]) for n in ("up_a", "up_b", "up_c", "up_d")]
    n_sampled = sum(sampled(t, 0.5) for t in ups)
    assert report.considered == 8
    assert report.not_eligible == 4 - n_sampled
    assert report.over_budget == 1 + n_sampled  # recent1 and the sampled thumbs-up wait for a later cycle
    assert report.unchanged == report.deferred == 0


def test_plan_uses_the_outbox():
    store, ids = _store_with_turns()
    cfg = AnnotationConfig(budget_per_cycle=1, thumbs_up_sample_rate=0.0)
    turns = {t["id"]: t for t in store.iter_turns()}
    # already in Argilla and unchanged -> skipped
    store.sync_mark(TARGET, ids["down"], content_hash=source_hash(turns[ids["down"]], cfg), status="sent")
    # failed, backoff not over -> deferred
    store.sync_mark(TARGET, ids["unsure"], content_hash=None, status="failed",
                    next_attempt_at=(NOW + dt.timedelta(minutes=5)).isoformat())
    # pending from an interrupted run -> sent whatever the budget
    store.sync_mark(TARGET, ids["recent1"], content_hash=None, status="pending")
    # in Argilla with older content (the user gave feedback since) -> updated whatever the budget
    store.sync_mark(TARGET, ids["up_a"], content_hash="old-content", status="sent")
    report = PushReport()
    jobs = plan(store, TARGET, cfg, NOW, report)
    got = {j.turn["id"]: j for j in jobs}
    assert set(got) == {ids["recent1"], ids["up_a"], ids["recent2"]}  # 2 owed + 1 new within budget
    assert got[ids["up_a"]].acked_hash == "old-content"
    assert report.unchanged == 1 and report.deferred == 1
    # once the backoff is over the failed one is due again
    later = plan(store, TARGET, cfg, NOW + dt.timedelta(hours=1), PushReport())
    assert ids["unsure"] in {j.turn["id"] for j in later}


@pytest.mark.parametrize("field, value", [("thumbs_up_sample_rate", 0.3), ("uncertainty_threshold", -2.0),
                                          ("scrub_kinds", ["email"]), ("priority_order", ["negative"])])
def test_source_hash_changes_with_settings_that_change_the_record(field, value):
    turn = {"id": "t", "messages": [], "answer": "a", "feedback": None}
    assert source_hash(turn, AnnotationConfig()) != source_hash(turn, AnnotationConfig(**{field: value}))
    # Pinned: the hash decides what is re-pushed, so it must not change between processes or releases.
    assert source_hash(dict(turn), AnnotationConfig()) == PINNED_HASH


def test_a_new_scrubber_version_changes_every_record_hash_so_old_records_are_scrubbed_again(monkeypatch):
    import annotation.push

    turn = {"id": "t1", "messages": [{"role": "user", "content": "hi"}], "answer": "hello"}
    before = source_hash(turn, AnnotationConfig())
    monkeypatch.setattr(annotation.push, "SCRUBBER_VERSION", annotation.push.SCRUBBER_VERSION + 1)
    assert source_hash(turn, AnnotationConfig()) != before


# source_hash of the parametrised test's turn under the default config (scrubber version 2).
PINNED_HASH = "356556ea7804735fa4aac4acf5febbbddf143f819048c6b6b9a2735ff8a413cf"
