"""The judge split: held-out wordings of taught corrections, chosen from the text alone, never empty."""

from __future__ import annotations

import json
import random
from pathlib import Path

from annotation.judge_split import answer_key, split_for_judging, wording_key

REPO = Path(__file__).resolve().parents[2]


def _ex(i, question, answer):
    return {"id": str(i), "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _demo_examples(ids):
    """The demo's 34 sample chats as curated examples, with the given ids (the demo's review rule)."""
    rows = [json.loads(line) for line in (REPO / "loop/scenario/sample_conversations.jsonl").read_text().splitlines()]
    out = []
    for i, row in zip(ids, rows):
        fb = row.get("feedback") or {}
        answer = fb.get("correction") or (row["answer"] if fb.get("thumbs") == "up" else None)
        if answer:
            out.append({"id": i, "messages": row["messages"] + [{"role": "assistant", "content": answer}]})
    return out


def _held_wordings(examples, split):
    return sorted({wording_key(e) for e in examples if e["id"] in split.held_out_ids})


def test_one_wording_of_every_correction_taught_three_ways_judges_it():
    facts = [(f"fact {k}", [f"question {k} {w}?" for w in "abc"]) for k in range(8)]
    examples = [_ex(f"{k}{w}", q, a) for k, (a, qs) in enumerate(facts) for w, q in zip("abc", qs)]
    split = split_for_judging(examples, eval_percent=10, min_held_out=2)
    held = [e for e in examples if e["id"] in split.held_out_ids]
    assert len(held) == 8 and {answer_key(e) for e in held} == {f"fact {k}" for k in range(8)}
    assert split.paraphrase_wordings == 8 and split.groups_taught == 8


def test_the_split_depends_on_the_text_not_on_the_ids():
    base = _demo_examples([f"a{i}" for i in range(40)])
    first = split_for_judging(base, eval_percent=10, min_held_out=2)
    for seed in range(20):
        ids = [f"{random.Random(seed).getrandbits(80):020x}-{i}" for i in range(40)]
        other = _demo_examples(ids)
        again = split_for_judging(other, eval_percent=10, min_held_out=2)
        assert _held_wordings(other, again) == _held_wordings(base, first)


def test_the_demo_scenario_is_judged_on_a_held_out_wording_of_every_fact():
    examples = _demo_examples([f"id{i}" for i in range(40)])
    split = split_for_judging(examples, eval_percent=10, min_held_out=2)
    held = [e for e in examples if e["id"] in split.held_out_ids]
    # 8 facts taught by 3 wordings each: one of each judges; the general thumbs-up chats all train.
    assert len(held) == 8 and split.paraphrase_wordings == 8
    assert all("Zephyr" in e["messages"][0]["content"] for e in held)


def test_a_held_out_wording_never_also_trains_even_as_a_duplicate_or_with_another_answer():
    examples = [_ex(i, f"q{i % 5}", f"a{i % 5}") for i in range(10)]  # each wording twice
    examples.append(_ex(99, "q0", "a different answer to q0"))
    split = split_for_judging(examples, eval_percent=20, min_held_out=2)
    held = {wording_key(e) for e in examples if e["id"] in split.held_out_ids}
    trained = {wording_key(e) for e in examples if e["id"] not in split.held_out_ids}
    assert held and not held & trained


def test_the_floor_takes_wordings_whose_correction_a_sibling_still_teaches_first():
    pairs = [_ex(f"p{k}{w}", f"pair question {k} {w}", f"pair answer {k}") for k in range(3) for w in "ab"]
    singles = [_ex(f"s{k}", f"single question {k}", f"single answer {k}") for k in range(10)]
    split = split_for_judging(pairs + singles, eval_percent=10, min_held_out=2)
    held = [e for e in pairs + singles if e["id"] in split.held_out_ids]
    assert len(held) == 2 and all(e["id"].startswith("p") for e in held)
    assert len({answer_key(e) for e in held}) == 2  # from two different pairs: each keeps a teaching sibling


def test_ids_held_out_before_stay_held_out_and_take_their_wording_along():
    examples = [_ex(i, f"q{i}", f"a{i}") for i in range(30)] + [_ex("dup", "q3", "a3")]
    split = split_for_judging(examples, eval_percent=10, min_held_out=2, carried={"3", "gone-id"})
    assert {"3", "dup"} <= split.held_out_ids


def test_data_too_small_to_judge_is_said_not_hidden():
    same = [_ex(i, "the same question", "the same answer") for i in range(12)]
    split = split_for_judging(same, eval_percent=10, min_held_out=2)
    assert split.held_out_ids == set()  # one wording: holding it out would leave nothing to teach
    assert "could be held out" in split.reasons[0]
    assert split_for_judging([_ex(0, "q", "a")], eval_percent=10, min_held_out=2).held_out_ids == set()
    assert split_for_judging([], eval_percent=10, min_held_out=2).held_out_ids == set()


def test_the_split_is_pinned_across_processes_and_machines():
    # A fixed input must give this exact held-out set everywhere (sha256 of the normalised text decides).
    examples = [_ex(i, f"How do I reset device number {i}?", f"Hold the button for {i} seconds.") for i in range(20)]
    split = split_for_judging(examples, eval_percent=10, min_held_out=2)
    assert sorted(split.held_out_ids, key=int) == PINNED


PINNED = ["15", "19"]
