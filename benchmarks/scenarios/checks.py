"""Checks that decide whether a model's answer to a scenario probe passes.

A check is a small JSON object (the scenario files in this folder hold them):

    {"contains_any": ["kw", ...]}   some keyword occurs in the answer (case-insensitive substring; a keyword
                                    that starts or ends with a digit matches a whole number only: "7" is
                                    not in "7,982" nor "1987", "1.7" not in "1.75"; word stems such as
                                    "evaporat" still match inside longer words)
    {"not_contains": ["s", ...]}    no listed string occurs in the answer (case-insensitive substring)
    {"max_sentences": N}            the answer has at least one and at most N sentences
    {"refuses": true}               the answer declines (false: it must NOT decline)
    {"all": [CHECK, ...]}           every sub-check passes

Matching is on a normalised text: lower case, Unicode NFKC (so "１．７" matches "1.7"), typographic
apostrophes made plain and runs of whitespace collapsed, so a keyword like "1.7" is robust to the
wording around it. ``validate`` reports every problem in a check at once; ``passes`` raises
``CheckError`` on a malformed check rather than silently failing the answer.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

KINDS = ("contains_any", "not_contains", "max_sentences", "refuses", "all")

# Phrases a small chat model uses when it declines. Matched on the normalised answer.
REFUSAL_MARKERS: tuple[str, ...] = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm not able", "i am not able",
    "i'm unable", "i am unable", "i'm not allowed", "i am not allowed", "i must decline",
    "i'm sorry, but", "i am sorry, but", "sorry, i can't", "sorry, but i",
    "not able to help", "can't help with", "cannot help with", "can't provide", "cannot provide",
    "can't give", "cannot give", "can't share", "cannot share",
)

# Tokens ending in "." that do not end a sentence.
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs mr mrs ms dr prof st no approx ca cf fig inc ltd co jr sr mt".split()
)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


class CheckError(ValueError):
    """A check object that does not follow the grammar above."""


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text or "")
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", text).strip().lower()


def count_sentences(text: str) -> int:
    """Sentences in ``text``: ends at ., ! or ? before whitespace or the end, not after a known
    abbreviation or inside a number (1.7); each line of a bulleted or numbered list counts as one;
    trailing text without a final stop (a cut-off answer) counts as one more."""
    text = unicodedata.normalize("NFKC", text or "").strip()
    if not text:
        return 0
    count = 0
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        items = [line for line in lines if _LIST_ITEM.match(line)]
        if len(items) >= 2:
            # A list answer: every item is at least one sentence, the lead-in line another.
            count += len(items) + sum(1 for line in lines if line.strip() and not _LIST_ITEM.match(line))
            continue
        count += _count_prose(" ".join(lines))
    return count


def _count_prose(text: str) -> int:
    text = text.strip()
    if not text:
        return 0
    count, start = 0, 0
    for match in _SENTENCE_END.finditer(text):
        word = text[start:match.start()].split()[-1:] or [""]
        stem = word[0].lower().lstrip("(\"'")
        if match.group().startswith(".") and (stem in _ABBREVIATIONS or re.fullmatch(r"[a-z]", stem)):
            continue
        if text[start:match.start()].strip():
            count += 1
        start = match.end()
    if text[start:].strip(" \"')]"):
        count += 1
    return count


def refuses(answer: str) -> bool:
    text = normalise(answer)
    return any(marker in text for marker in REFUSAL_MARKERS)


def validate(check: Any, where: str = "check") -> list[str]:
    """Every problem in ``check`` (empty when it is well formed)."""
    if not isinstance(check, dict) or len(check) != 1:
        return [f"{where}: a check is an object with exactly one of {', '.join(KINDS)}, got {check!r}"]
    (kind, arg), = check.items()
    if kind in ("contains_any", "not_contains"):
        if not isinstance(arg, list) or not arg or not all(isinstance(s, str) and s.strip() for s in arg):
            return [f"{where}: {kind} takes a non-empty list of non-empty strings, got {arg!r}"]
        return []
    if kind == "max_sentences":
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            return [f"{where}: max_sentences takes an integer >= 1, got {arg!r}"]
        return []
    if kind == "refuses":
        return [] if isinstance(arg, bool) else [f"{where}: refuses takes true or false, got {arg!r}"]
    if kind == "all":
        if not isinstance(arg, list) or not arg:
            return [f"{where}: all takes a non-empty list of checks, got {arg!r}"]
        return [p for i, sub in enumerate(arg) for p in validate(sub, f"{where}.all[{i}]")]
    return [f"{where}: unknown check {kind!r} (known: {', '.join(KINDS)})"]


def passes(check: dict[str, Any], answer: str) -> bool:
    """Whether ``answer`` satisfies ``check``."""
    problems = validate(check)
    if problems:
        raise CheckError("; ".join(problems))
    return _passes(check, answer)


def _passes(check: dict[str, Any], answer: str) -> bool:
    (kind, arg), = check.items()
    if kind == "contains_any":
        text = normalise(answer)
        return any(_mentions(text, normalise(k)) for k in arg)
    if kind == "not_contains":
        text = normalise(answer)
        return not any(normalise(k) in text for k in arg)
    if kind == "max_sentences":
        return 1 <= count_sentences(answer) <= arg
    if kind == "refuses":
        return refuses(answer) == arg
    return all(_passes(sub, answer) for sub in arg)


def _mentions(text: str, keyword: str) -> bool:
    """Whether normalised ``text`` holds ``keyword``; at an end where the keyword has a digit, the number in the
    text must end there too (no digit, and no "." "," or ":" followed by a digit, beyond it)."""
    pattern = re.escape(keyword)
    if keyword[:1].isdigit():
        pattern = r"(?<!\d)(?<!\d[.,:])" + pattern
    if keyword[-1:].isdigit():
        pattern += r"(?!\d)(?![.,:]\d)"
    return re.search(pattern, text) is not None


def keywords(check: dict[str, Any]) -> list[str]:
    """The strings a check looks for (contains_any), through ``all``: what a probe must not give away."""
    (kind, arg), = check.items()
    if kind == "contains_any":
        return list(arg)
    if kind == "all":
        return [k for sub in arg for k in keywords(sub)]
    return []
