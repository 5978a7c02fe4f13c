"""Paired questions: two corrections asked in one turn, answered by both answers.

The misses of a small model taught a handful of facts about one subject are mostly one fact answered for another
("who leads it now?" answered with the founder): every correction says "the subject -> a name", and two or three
wordings per fact do not teach which part of the question picks the name. A turn that asks two of them at once,
answered by both corrections in the order asked, makes the model tell them apart inside one context: the same
subject, two questions, two different answers.

Contract:
  - ``with_pairs(examples, share, seed)``: ``examples`` plus ``round(share x eligible)`` composed examples,
    shuffled. Eligible: single-turn examples (an optional system message, one user question, one answer) that are
    not general replay (trainer/anchor.py). A composed example joins two eligible examples with different answers:
    its user turn is both questions, its answer both answers, in the same order, and it carries the first one's
    system message (pairs whose system messages differ are not formed). Its id is ``pair-`` plus a hash of its
    content (``is_pair``), so it is never a general replay example and never a held-out one. No pair is added twice, so a set
    with few distinct pairs gets fewer.
  - The result depends on the examples' content and ``seed`` alone, never on their order or ids (like
    trainer.data.build_training_set), so a resumed run sees the same set. ``share = 0`` returns ``examples``
    unchanged; fewer than two distinct answers compose nothing.
"""

from __future__ import annotations

import random

from trainer.anchor import is_anchor
from trainer.data import content_key

PAIR_PREFIX = "pair-"


def is_pair(example: dict) -> bool:
    return str(example.get("id") or "").startswith(PAIR_PREFIX)


def with_pairs(examples: list[dict], share: float, seed: int) -> list[dict]:
    if share <= 0:
        return examples
    eligible = sorted((e for e in examples if _single_turn(e) and not is_anchor(e)), key=content_key)
    wanted = round(share * len(eligible))
    if wanted == 0 or len({_answer(e) for e in eligible}) < 2:
        return examples
    rng = random.Random(f"pairs-{seed}")
    pairs: dict[str, dict] = {}
    attempts = 0
    while len(pairs) < wanted and attempts < 20 * wanted:
        attempts += 1
        first, second = rng.sample(eligible, 2)
        if _answer(first) == _answer(second) or _system(first) != _system(second):
            continue
        pair = _joined(first, second)
        pairs.setdefault(pair["id"], pair)
    mixed = list(examples) + list(pairs.values())
    rng.shuffle(mixed)
    return mixed


def _joined(first: dict, second: dict) -> dict:
    question = f"{_sentence(_user(first))} {_user(second).strip()}"
    answer = f"{_sentence(_answer(first))} {_answer(second).strip()}"
    system = [m for m in first["messages"] if m.get("role") == "system"]
    messages = [*system, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"id": PAIR_PREFIX + content_key({"messages": messages})[:16], "messages": messages}


def _sentence(text: str) -> str:
    """`text` ending as a sentence, so the second part does not run into it."""
    text = text.strip()
    return text if text[-1:] in ".?!:;" else text + "."


def _single_turn(example: dict) -> bool:
    roles = [m.get("role") for m in example.get("messages") or []]
    return roles in (["user", "assistant"], ["system", "user", "assistant"]) and all(
        str(m.get("content") or "").strip() for m in example["messages"] if m.get("role") != "system")


def _user(example: dict) -> str:
    return str(example["messages"][-2]["content"])


def _answer(example: dict) -> str:
    return str(example["messages"][-1]["content"])


def _system(example: dict) -> str | None:
    first = example["messages"][0]
    return str(first.get("content")) if first.get("role") == "system" else None
