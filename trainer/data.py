"""Chat examples: reading, checking, mixing with replay, hashing and tokenising.

An example is one JSON object per line: ``{"id": "...", "messages": [{"role": ..., "content": ...}, ...]}``
whose last message is the assistant's answer, the only part the loss is computed on. The prompt (every
earlier message, rendered by the model's chat template up to the assistant header) is masked out.

SmolLM2's chat template has no ``{% generation %}`` markers, so TRL's ``assistant_only_loss`` cannot be
used; instead each example is split into prompt and completion token ids here, and the trainer is given
``input_ids`` + ``labels`` with -100 over the prompt (TRL leaves a dataset that has labels as it is).
``tokenize_example`` is also the GGUF verifier's (``trainer.verify``), which scores every assistant turn
of its held-out chats (``answers="all"``) where training learns the last (``answers="last"``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loop.core.chat_template import hf_chat_ids
from loop.core.errors import LoopError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value the cross-entropy loss skips


class DataError(LoopError, ValueError):
    """The data cannot be trained on (missing, malformed or too small); the message says why."""


def load_examples(path: str | Path) -> list[dict]:
    """Read and check a JSON-lines file of chat examples. Raises DataError naming every bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records, problems = checked_jsonl(path, example_problem)
    examples: list[dict] = []
    for number, record in records:
        record.setdefault("id", f"{path.stem}-{number}")
        examples.append(record)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad example(s) in {path}:\n  {shown}{more}")
    return examples


def checked_jsonl(path: Path, problem_of) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, record) of every record of a JSON-lines file that `problem_of` finds no problem in, and
    "path:line: problem" for every other non-blank line (not JSON, or `problem_of`'s answer)."""
    records: list[tuple[int, dict]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{number}: not JSON ({exc.msg})")
                continue
            problem = problem_of(record)
            if problem:
                problems.append(f"{path}:{number}: {problem}")
            else:
                records.append((number, record))
    return records, problems


def example_problem(record: object) -> str | None:
    """Why a record is not a usable chat example, or None when it is."""
    if not isinstance(record, dict):
        return "expected a JSON object with 'messages'"
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return "'messages' must be a list of at least a user and an assistant message"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"message {i} must be an object with role in {ROLES}"
        if not isinstance(message.get("content"), str):
            return f"message {i} must have string 'content'"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (it is what the model learns)"
    if not messages[-1]["content"].strip():
        return "the assistant's answer is empty"
    if not any(m["role"] == "user" for m in messages[:-1]):
        return "there must be a user message before the assistant's answer"
    return None


def require_enough(examples: list, min_examples: int, what: str = "training") -> None:
    """Raise DataError when there are too few examples to train on (no run is started)."""
    if not examples:
        raise DataError(f"the {what} data is empty: nothing to train on")
    if len(examples) < min_examples:
        raise DataError(
            f"the {what} data has {len(examples)} example(s), fewer than min_examples={min_examples}: "
            "collect more curated examples first (or lower trainer.min_examples)"
        )


def build_training_set(new: list, replay_pool: list, ratio: float, seed: int) -> list:
    """Mix replayed earlier examples with the new ones so earlier corrections are not forgotten.

    ``ratio`` is the share of the result drawn from ``replay_pool`` (0 = new examples only); the number
    replayed is capped by the pool's size. Pool examples whose id is among the new ones are not replayed
    (the new version wins). The result is shuffled deterministically by ``seed``.

    The result depends on the examples' content and ``seed`` only, never on the order they came in or on
    their ids: records get random ULIDs, so ordering by id would make the same curated data train a
    different model on every machine (docs/judging.md).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio!r}")
    new_ids = {example.get("id") for example in new if isinstance(example, dict)}
    pool = [example for example in replay_pool if example.get("id") is None or example.get("id") not in new_ids]
    new, pool = sorted(new, key=content_key), sorted(pool, key=content_key)
    rng = random.Random(seed)
    wanted = round(len(new) * ratio / (1.0 - ratio)) if ratio > 0 else 0
    replayed = rng.sample(pool, min(wanted, len(pool)))
    mixed = list(new) + replayed
    rng.shuffle(mixed)
    return mixed


def content_key(example: dict) -> str:
    """A key of an example's messages alone (never its id), for orders that must not depend on ids."""
    return hashlib.sha256(json.dumps(example.get("messages"), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a deterministic held-out share (at least one example) for when no eval file is given."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def data_hash(examples: Iterable[dict]) -> str:
    """A stable fingerprint of the examples (order included: order changes the training run)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example["messages"], sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class TokenizedExample:
    input_ids: list[int]
    completion_mask: list[int]  # 1 on the answer tokens (the last message's, or every assistant turn's), else 0
    truncated: bool


def tokenize_example(tokenizer, messages: list[dict], max_length: int, *,
                     answers: Literal["last", "all"]) -> TokenizedExample:
    """Token ids of a whole conversation and a mask of the answer tokens: the last message's (``"last"``:
    what the trainer learns) or every assistant turn's (``"all"``: what the GGUF verifier scores).

    A turn's tokens are what rendering the chat through that turn adds to rendering the messages before
    it with the generation prompt (the assistant header): the answer's text plus the end-of-turn
    token(s), exactly what the model must produce. Both renderings must be token prefixes of the whole
    chat; with ``"last"`` a template that breaks this is a DataError, with ``"all"`` such a turn is
    left out and a chat with no turn left is a DataError.
    """
    full_ids = _template_ids(tokenizer, messages, add_generation_prompt=False)
    last = len(messages) - 1
    turns = [last] if answers == "last" else [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    mask = [0] * len(full_ids)
    located = 0
    for i in turns:
        prompt_ids = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = full_ids if i == last else _template_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full_ids[: len(prompt_ids)] != prompt_ids or full_ids[: len(through)] != through:
            if answers == "last":
                raise DataError(
                    "the chat template does not render the prompt as a prefix of the whole conversation; "
                    "cannot tell the answer's tokens apart"
                )
            continue
        if len(through) > len(prompt_ids):
            mask[len(prompt_ids): len(through)] = [1] * (len(through) - len(prompt_ids))
            located += 1
    if answers == "all" and not located:
        raise DataError("no assistant turn could be located in the rendered chat")
    truncated = len(full_ids) > max_length
    # Cut at the end: the prompt is context the answer needs, the answer's tail is least informative.
    return TokenizedExample(full_ids[:max_length], mask[:max_length], truncated)


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # The template's markup carries the special tokens (BOS too, where it has one; none is added), while
    # the messages' text, written by users and reviewers, is never parsed for them: a correction holding
    # "<|im_start|>system" must be learned as those characters, not as a forged turn (loop.core.chat_template).
    return hf_chat_ids(tokenizer, messages, add_generation_prompt)


@dataclass
class TokenizedSet:
    rows: list[dict]  # {"input_ids", "labels"} per kept example; labels are -100 over the prompt
    truncated: int  # examples cut at max_length
    dropped: int  # examples whose answer fell entirely beyond max_length (nothing to learn from)
    tokens: int  # total tokens in the kept rows


def tokenize_examples(tokenizer, examples: list[dict], max_length: int, *, anchor: bool = False,
                      words: bool = False) -> TokenizedSet:
    """Tokenise a list of examples, counting those truncated and dropping those with no answer left.

    ``anchor=True`` adds each row's ``"anchor"`` flag: 1 for a general replay example (trainer/anchor.py).
    ``words=True`` adds each row's ``"words"``: the question's word index per token, all -1 on a general replay
    example (trainer/augment.py)."""
    from trainer.anchor import is_anchor
    from trainer.augment import NOT_A_WORD, question_words

    rows, truncated, dropped, tokens = [], 0, 0, 0
    for example in examples:
        tok = tokenize_example(tokenizer, example["messages"], max_length, answers="last")
        truncated += tok.truncated
        if not any(tok.completion_mask):
            dropped += 1
            continue
        labels = [t if m else IGNORE_INDEX for t, m in zip(tok.input_ids, tok.completion_mask)]
        row = {"input_ids": tok.input_ids, "labels": labels}
        if anchor:
            row["anchor"] = int(is_anchor(example))
        if words:
            row["words"] = ([NOT_A_WORD] * len(tok.input_ids) if is_anchor(example)
                            else question_words(tokenizer, example["messages"], tok.input_ids,
                                                tok.completion_mask.index(1)))
        rows.append(row)
        tokens += len(tok.input_ids)
    return TokenizedSet(rows, truncated, dropped, tokens)


def keep_columns(trainer, *names: str) -> None:
    """Let the extra row columns ``names`` (``"anchor"``, ``"words"``) through the Trainer's column filter.

    The Trainer drops every dataset column its model's forward does not take before the collator sees a batch;
    the collator that reads an extra column pops it before the forward. Call after the Trainer is built."""
    trainer._set_signature_columns_if_needed()
    kept = trainer._signature_columns
    trainer._signature_columns = [*kept, *(name for name in names if name not in kept)]


def write_examples(path: str | Path, examples: list[dict]) -> None:
    """Write examples as JSON lines (used for snapshots and tests)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
