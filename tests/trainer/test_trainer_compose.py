"""Paired questions (trainer/compose.py): two single-turn corrections with different answers asked in one turn and
answered by both, in the same order; never from general replay or multi-turn chats; the same set whatever the
order or ids of the examples."""

from __future__ import annotations

import random

import pytest

from trainer.anchor import GENERAL_REPLAY_PREFIX
from trainer.compose import PAIR_PREFIX, with_pairs
from trainer.config import TrainConfig


def _example(i: str, question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": i, "messages": ([{"role": "system", "content": system}] if system else []) + messages}


FACTS = [
    _example("a1", "Who founded Ostlyn?", "Ostlyn was founded by Maren Ostby."),
    _example("a2", "Who started Ostlyn", "Ostlyn was founded by Maren Ostby."),
    _example("b1", "Who leads Ostlyn now?", "Ostlyn is led by Ilse Varr."),
    _example("b2", "Who heads Ostlyn today?", "Ostlyn is led by Ilse Varr."),
    _example("c1", "When was Ostlyn founded?", "Ostlyn was founded in 1987"),
    _example("c2", "What year did Ostlyn start?", "Ostlyn was founded in 1987"),
]


def _pairs(examples: list[dict]) -> list[dict]:
    return [e for e in examples if e["id"].startswith(PAIR_PREFIX)]


def test_a_pair_asks_both_questions_and_answers_both_in_the_same_order():
    out = with_pairs(FACTS, 1.0, seed=0)
    pairs = _pairs(out)
    assert len(pairs) == len(FACTS) and len(out) == 2 * len(FACTS)
    by_question = {e["messages"][0]["content"]: e["messages"][1]["content"] for e in FACTS}
    for pair in pairs:
        (user, answer) = (m["content"] for m in pair["messages"])
        found = [(q, a) for q, a in by_question.items() if user.startswith(q) or user.startswith(q + ".")]
        assert len(found) == 1, user
        first_q, first_a = found[0]
        second_q = user[len(first_q):].lstrip(". ")
        assert second_q in by_question and by_question[second_q] != first_a
        assert answer == f"{first_a.rstrip('.')}. {by_question[second_q]}"


def test_a_question_without_a_full_stop_does_not_run_into_the_next():
    out = _pairs(with_pairs(FACTS[:3], 1.0, seed=3))
    for pair in out:
        user = pair["messages"][0]["content"]
        assert "Ostlyn Who" not in user and "Ostlyn When" not in user


def test_the_share_sets_how_many_pairs_are_added_and_zero_changes_nothing():
    assert with_pairs(FACTS, 0.0, seed=0) is FACTS
    assert len(_pairs(with_pairs(FACTS, 0.5, seed=0))) == 3


def test_general_replay_and_multi_turn_chats_are_never_paired():
    general = _example(GENERAL_REPLAY_PREFIX + "1", "What is the capital of France?", "Paris.")
    multi = {"id": "m", "messages": [{"role": "user", "content": "Tell me about Ostlyn."},
                                     {"role": "assistant", "content": "It is a seed collective."},
                                     {"role": "user", "content": "Who runs it?"},
                                     {"role": "assistant", "content": "Ilse Varr."}]}
    out = with_pairs([*FACTS[:2], general, multi], 1.0, seed=0)
    assert _pairs(out) == []  # the two single-turn corrections share one answer: nothing to tell apart
    out = with_pairs([*FACTS, general, multi], 1.0, seed=0)
    assert all("capital" not in p["messages"][0]["content"] and "runs it" not in p["messages"][0]["content"]
               for p in _pairs(out))
    assert len(_pairs(out)) == len(FACTS)


def test_pairs_keep_a_shared_system_message_and_never_mix_two():
    a = [_example(f"s{i}", q, ans, system="Be brief.") for i, (q, ans) in
         enumerate([("Q one?", "A one."), ("Q two?", "A two.")])]
    b = [_example("t0", "Q three?", "A three.", system="Be formal.")]
    for pair in _pairs(with_pairs(a + b, 1.0, seed=1)):
        assert pair["messages"][0] == {"role": "system", "content": "Be brief."}
        assert "three" not in pair["messages"][1]["content"]


def test_the_pairs_depend_on_content_and_seed_not_on_order_or_ids():
    shuffled = list(FACTS)
    random.Random(7).shuffle(shuffled)
    renamed = [dict(e, id=f"x{i}") for i, e in enumerate(shuffled)]
    contents = sorted(p["messages"][0]["content"] for p in _pairs(with_pairs(FACTS, 1.0, seed=0)))
    assert sorted(p["messages"][0]["content"] for p in _pairs(with_pairs(renamed, 1.0, seed=0))) == contents
    assert sorted(p["messages"][0]["content"] for p in _pairs(with_pairs(FACTS, 1.0, seed=1))) != contents


def test_pair_share_is_checked_and_part_of_the_contract_only_when_on():
    assert any("pair_share" in p for p in TrainConfig(pair_share=1.5).validate())
    assert any("pair_share" in p for p in TrainConfig(pair_share=-0.1).validate())
    assert "pair_share" not in TrainConfig().resume_fields()
    assert TrainConfig(pair_share=0.5).resume_fields()["pair_share"] == 0.5


@pytest.mark.slow
def test_a_run_with_pair_share_trains_on_the_pairs_and_a_run_without_does_not(base_hf_dir, tmp_path):
    from test_trainer_train import facts, small_config

    from trainer.train import train

    with_them = train(facts()[:4], tmp_path / "pairs", base=base_hf_dir, eval_data=facts()[4:6],
                      config=small_config(tmp_path, max_steps=1, batch_size=2, pair_share=1.0))
    without = train(facts()[:4], tmp_path / "plain", base=base_hf_dir, eval_data=facts()[4:6],
                    config=small_config(tmp_path, max_steps=1, batch_size=2))
    assert with_them["status"] == without["status"] == "ok"
    assert with_them["examples"]["train"] == 8 and without["examples"]["train"] == 4
    assert with_them["examples"]["paired"] == 4 and with_them["examples"]["replayed"] == 0  # pairs are not replay
    assert with_them["examples"]["train_tokens"] > 1.5 * without["examples"]["train_tokens"]
    assert with_them["config"]["pair_share"] == 1.0


def test_pairs_never_make_up_the_minimum_number_of_examples(tmp_path):
    from test_trainer_train import facts, small_config

    from trainer.data import DataError
    from trainer.train import train

    with pytest.raises(DataError, match="min_examples=4"):
        train(facts()[:3], tmp_path / "run", eval_data=facts()[4:6],
              config=small_config(tmp_path, max_steps=1, pair_share=1.0))
