"""Question word dropout (trainer/augment.py) on the bundled SmolLM2-135M's tokenizer and trainer on the CPU: only the
last question's words go, whole words, anew each step but the same for the same step, and never the answer."""

from __future__ import annotations

import random

import pytest
from test_trainer_anchor import general
from test_trainer_train import facts, small_config

from trainer.augment import NOT_A_WORD, WordDropoutCollator, dropped, question_words
from trainer.config import TrainConfig
from trainer.data import tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(base_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_hf_dir))


def _chat(question: str, answer: str = "The Halvorn T8 costs 2,450 euros.") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_each_token_of_the_last_question_is_numbered_by_its_word_and_nothing_else_is(tokenizer):
    messages = [{"role": "user", "content": "Hi there friend"}, {"role": "assistant", "content": "Hello!"},
                *_chat("How much does the Halvorn T8 cost?")]
    row = tokenize_examples(tokenizer, [{"id": "a", "messages": messages}], 512, words=True).rows[0]
    words = [(tokenizer.decode(t), w) for t, w in zip(row["input_ids"], row["words"]) if w != NOT_A_WORD]
    text = {}
    for piece, w in words:
        text[w] = text.get(w, "") + piece
    assert [t.strip() for t in text.values()] == ["How", "much", "does", "the", "Halvorn", "T8", "cost?"]
    assert len(row["words"]) == len(row["input_ids"])
    answer = [w for w, label in zip(row["words"], row["labels"]) if label != -100]
    assert set(answer) == {NOT_A_WORD}


def test_general_replay_and_questions_too_short_to_spare_a_word_are_never_touched(tokenizer):
    examples = [{"id": "a", "messages": _chat("Price?")}, *general(1)]
    for row in tokenize_examples(tokenizer, examples, 512, words=True).rows:
        assert set(row["words"]) == {NOT_A_WORD}
    assert question_words(tokenizer, [{"role": "assistant", "content": "x"}], [1, 2], 2) == [NOT_A_WORD] * 2


def test_an_answer_that_quotes_its_question_is_never_taken_for_the_question(tokenizer):
    question = "How much does the Halvorn T8 cost?"
    row = tokenize_examples(tokenizer, [{"id": "a", "messages": _chat(question, f"{question} It costs 2,450 euros.")}], 512,
                            words=True).rows[0]
    numbered = [i for i, w in enumerate(row["words"]) if w != NOT_A_WORD]
    first_answer = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert numbered and max(numbered) < first_answer


def test_some_words_go_but_never_all_of_them():
    rng = random.Random(0)
    assert dropped([NOT_A_WORD, 0, 0, 1, 2], 0.0, rng) == set()
    for _ in range(200):
        assert len(dropped([0, 1, 2], 0.999, rng)) == 2
    shares = [len(dropped(list(range(10)), 0.3, rng)) / 10 for _ in range(500)]
    assert sum(shares) / len(shares) == pytest.approx(0.3, abs=0.03)


def test_a_step_drops_whole_words_from_ids_and_labels_alike_and_the_same_step_drops_the_same(tokenizer):
    class State:
        global_step = 0

    row = tokenize_examples(tokenizer, [{"id": "a", "messages": _chat("How much does the Halvorn T8 e-bike "
                                                                      "cost in Norway today?")}], 512,
                            words=True).rows[0]
    collator = WordDropoutCollator(lambda batch: batch, 0.3, seed=42, step=lambda: State.global_step)
    questions = []
    for step in (0, 1, 2, 3, 0):
        State.global_step = step
        (out,) = collator([dict(row)])
        assert "words" not in out and len(out["labels"]) == len(out["input_ids"])
        assert [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100] == \
               [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        questions.append(tokenizer.decode(out["input_ids"]).split("user\n")[-1].split("<|im_end|>")[0])
    assert questions[0] == questions[4]
    assert len(set(questions)) > 2
    whole = "How much does the Halvorn T8 e-bike cost in Norway today?".split()
    for question in questions:
        kept = question.split()
        assert kept and set(kept) <= set(whole) and len(kept) < len(whole) + 1


def test_a_run_with_question_dropout_trains_on_batches_without_the_dropped_words(base_hf_dir, tokenizer, tmp_path):
    from trainer.train import build_trainer

    config = small_config(tmp_path, batch_size=4, kl_weight=1.0, question_dropout=0.9)
    rows = tokenize_examples(tokenizer, facts()[:2] + general(2), 128, anchor=True, words=True).rows
    trainer, _ = build_trainer(str(base_hf_dir), tokenizer, rows, [], tmp_path / "run", config)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "words" not in batch and batch["anchor"].shape == batch["input_ids"].shape
    lengths = {int(flags.max()): [] for flags in batch["anchor"]}
    for flags, mask in zip(batch["anchor"], batch["attention_mask"]):
        lengths[int(flags.max())].append(int(mask.sum()))
    full = {flag: sorted(len(r["input_ids"]) for r in rows if r["anchor"] == flag) for flag in (0, 1)}
    assert sorted(lengths[1]) == full[1]  # general replay keeps every token
    assert all(a < b for a, b in zip(sorted(lengths[0]), full[0]))  # the corrections' questions lost words


def test_the_words_dropped_follow_the_step_of_the_state_the_trainer_trains_with(base_hf_dir, tokenizer, tmp_path):
    from transformers import TrainerState

    from trainer.train import build_trainer

    config = small_config(tmp_path, batch_size=2, question_dropout=0.5)
    rows = tokenize_examples(tokenizer, facts()[:2], 128, words=True).rows
    trainer, _ = build_trainer(str(base_hf_dir), tokenizer, rows, [], tmp_path / "run", config)
    batches = set()
    for step in range(6):
        trainer.state = TrainerState(global_step=step)  # as Trainer.train() replaces it on starting or resuming
        batches.add(tuple(trainer.data_collator([dict(r) for r in rows])["input_ids"].flatten().tolist()))
    assert len(batches) > 1


def test_question_dropout_is_checked_and_part_of_the_contract_only_when_on():
    assert any("question_dropout" in p for p in TrainConfig(question_dropout=1.0).validate())
    assert any("question_dropout" in p for p in TrainConfig(question_dropout=-0.1).validate())
    assert "question_dropout" not in TrainConfig().resume_fields()
    assert TrainConfig(question_dropout=0.2).resume_fields()["question_dropout"] == 0.2
