"""Question word dropout: each pass over a correction sees its question with some words left out.

A curated correction is taught by two or three wordings of one question, and a model that learns them as exact
token strings answers a fourth wording with another fact's answer. Leaving a random share of the question's words
out, anew at every optimizer step, keeps any one word from being the whole cue; the answer is never touched, and
neither are general replay examples (the KL anchor holds those to the starting weights token for token).

Contract:
  - ``question_words(tokenizer, messages, input_ids, prompt_length)``: per token of ``input_ids`` (a chat as
    trainer/data.py tokenises it, its answer starting at ``prompt_length``), the index of the word of the last
    user message it belongs to, -1 elsewhere; all -1 when that message cannot be found token for token in the
    prompt (the row then trains unchanged).
  - ``WordDropoutCollator(inner, rate, seed, step)``: wraps the trainer's collator. A row's ``"words"`` column
    is popped; each of its words is left out with probability ``rate`` (at least one word stays), its tokens
    taken out of ``input_ids`` and ``labels`` alike, before ``inner`` pads the batch. Which words go depends on
    ``seed``, the optimizer step (``step()``, read at each batch: the Trainer replaces its state object when
    training starts or resumes, so a state captured earlier would stay at step 0) and the row's tokens alone,
    so a resumed run drops the same words as one that never stopped. Nothing here imports torch at module level.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

from loop.core.chat_template import hf_content_ids

NOT_A_WORD = -1
MIN_WORDS = 3  # a question of one or two words has nothing to spare


def question_words(tokenizer: Any, messages: list[dict], input_ids: list[int], prompt_length: int) -> list[int]:
    words = [NOT_A_WORD] * len(input_ids)
    users = [m for m in messages[:-1] if m.get("role") == "user"]
    if not users or not str(users[-1].get("content") or "").strip():
        return words
    content = hf_content_ids(tokenizer, str(users[-1]["content"]))
    start = _last_occurrence(input_ids[:prompt_length], content)  # an answer may quote its question
    if start is None:
        return words
    word = -1
    for offset, token in enumerate(content):
        text = tokenizer.decode([token])
        if word < 0 or text[:1].isspace():
            word += 1
        words[start + offset] = word
    return words if word + 1 >= MIN_WORDS else [NOT_A_WORD] * len(input_ids)


def _last_occurrence(ids: list[int], needle: list[int]) -> int | None:
    n = len(needle)
    for start in range(len(ids) - n, -1, -1):
        if ids[start:start + n] == needle:
            return start
    return None


def dropped(words: list[int], rate: float, rng: random.Random) -> set[int]:
    """The words of one row to leave out: each with probability ``rate``, never all of them."""
    present = sorted({w for w in words if w != NOT_A_WORD})
    if not present or rate <= 0:
        return set()
    out = {w for w in present if rng.random() < rate}
    if len(out) == len(present):
        out.discard(rng.choice(present))
    return out


class WordDropoutCollator:
    def __init__(self, inner, rate: float, seed: int, step: Callable[[], int]):
        self.inner, self.rate, self.seed, self.step = inner, rate, seed, step

    def __call__(self, examples: list[dict]) -> dict:
        step = int(self.step())
        for example in examples:
            words = example.pop("words", None)
            if not words or self.rate <= 0:
                continue
            digest = hashlib.sha256(f"{self.seed}:{step}:{list(example['input_ids'])}".encode()).digest()
            gone = dropped(words, self.rate, random.Random(digest))
            if gone:
                keep = [i for i, w in enumerate(words) if w not in gone]
                example["input_ids"] = [example["input_ids"][i] for i in keep]
                example["labels"] = [example["labels"][i] for i in keep]
        return self.inner(examples)
