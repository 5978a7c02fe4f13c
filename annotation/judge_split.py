"""Which curated examples judge a cycle instead of training it: held-out *wordings* of taught corrections.

A reviewer's correction usually arrives several times, once per way users asked the question. The judge
holds out whole wordings, never ids, so what it scores is the question the model must generalise to:

1. An example's **wording** is its normalised prompt (every message before the answer); its **answer
   group** is its normalised answer. All examples of one wording travel together, so a held-out
   question never also appears in training (duplicates, or the same question with another answer).
2. Every answer group taught by at least ``MIN_GROUP_WORDINGS`` wordings gives one wording (more for
   large groups, ``eval_percent`` of them) to the judge: the model still learns that correction from
   the other wordings, and the judge asks whether it learned the fact or the sentence.
3. **Floor**: while fewer than ``max(min_held_out, ceil(eval_percent% of the examples))`` examples are
   held out, wordings are added from two-wording groups first (a sibling still teaches them), then
   from corrections taught once; never more than half of all wordings.
4. Ids held out by an earlier snapshot stay held out (and pull their wording along with them), so an
   example that judged one cycle never trains a later one.

Every choice is a function of the text alone (sha256 of the wording breaks ties), so every machine and
every id draw splits the same reviews the same way. ``eval_percent = 0`` turns the judge off; a cycle
then refuses to train (nothing could judge it). The split may come out smaller than ``min_held_out``
when the data is too small to judge: the cycle reads that from the manifest and stops with a stated
reason instead of training blind (loop/cycle_stages.py).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MIN_GROUP_WORDINGS = 3  # a group must keep >= 2 teaching wordings after giving one to the judge
_WORD = re.compile(r"[^\w]+", re.UNICODE)


def normalise(text: str) -> str:
    """Case-, width-, punctuation- and whitespace-insensitive form of a text."""
    return _WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def wording_key(example: dict[str, Any]) -> str:
    """The normalised prompt: every message before the final answer, with its role."""
    prompt = example["messages"][:-1]
    return "\n".join(f"{m.get('role')}: {normalise(str(m.get('content', '')))}" for m in prompt)


def answer_key(example: dict[str, Any]) -> str:
    return normalise(str(example["messages"][-1].get("content", "")))


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class JudgeSplit:
    """The held-out ids and how they were chosen (the manifest keeps ``summary()``)."""

    held_out_ids: set[str]
    wordings: int  # distinct wordings in the snapshot
    held_out_wordings: int
    paraphrase_wordings: int  # held out from a group that still teaches the same answer
    groups_taught: int  # answer groups with at least one training wording
    target: int  # examples the floor asked for
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"rule": "held-out wordings of taught corrections", "wordings": self.wordings,
                "held_out_wordings": self.held_out_wordings, "paraphrase_wordings": self.paraphrase_wordings,
                "answer_groups_taught": self.groups_taught, "floor_examples": self.target,
                "notes": list(self.reasons)}


def split_for_judging(examples: Iterable[dict[str, Any]], *, eval_percent: int, min_held_out: int,
                      carried: Iterable[str] = ()) -> JudgeSplit:
    """Choose the held-out ids of ``examples`` ({"id", "messages"}); see the module docstring for the rule."""
    examples = list(examples)
    by_wording: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ex in examples:
        by_wording[wording_key(ex)].append(ex)
    # A wording's answer group: the most common answer among its examples (ties: the smallest key).
    group_of: dict[str, str] = {}
    for w, members in by_wording.items():
        answers = sorted(answer_key(e) for e in members)
        group_of[w] = max(sorted(set(answers)), key=answers.count)
    groups: dict[str, list[str]] = defaultdict(list)
    for w, g in group_of.items():
        groups[g].append(w)
    for g in groups:
        groups[g].sort(key=_rank)

    carried = set(carried)
    held: set[str] = {w for w, members in by_wording.items() if any(e["id"] in carried for e in members)}
    paraphrase: set[str] = set()
    notes: list[str] = []
    if eval_percent <= 0:
        notes.append("eval_percent is 0: only earlier held-out examples judge")
        return _result(by_wording, groups, held, paraphrase, 0, notes)

    def teaching(g: str) -> list[str]:
        return [w for w in groups[g] if w not in held]

    # 2. one wording (or eval_percent of them) from every group taught by >= MIN_GROUP_WORDINGS wordings.
    for g in sorted(groups, key=_rank):
        ws = groups[g]
        if len(ws) < MIN_GROUP_WORDINGS:
            continue
        want = max(1, math.floor(len(ws) * eval_percent / 100))
        for w in ws:
            if sum(1 for x in ws if x in held) >= want or len(teaching(g)) <= 2:
                break
            if w not in held:
                held.add(w)
                paraphrase.add(w)
    paraphrase |= {w for w in held if len(groups[group_of[w]]) > 1 and teaching(group_of[w])}

    # 3. the floor.
    target = max(min_held_out, math.ceil(len(examples) * eval_percent / 100))
    cap = len(by_wording) // 2
    n_held = sum(len(by_wording[w]) for w in held)
    # Two passes, so that a wording whose group still has a sibling to teach it is taken first.
    ordered = sorted((w for w in by_wording if w not in held), key=_rank)
    for keep_sibling in (True, False):
        for w in ordered:
            if n_held >= target or len(held) >= cap:
                break
            if w in held or (keep_sibling and len(teaching(group_of[w])) < 2):
                continue
            if len(teaching(group_of[w])) >= 2:
                paraphrase.add(w)
            held.add(w)
            n_held += len(by_wording[w])
    if n_held < target:
        notes.append(f"only {n_held} example(s) could be held out (floor {target}): "
                     f"{len(by_wording)} distinct wording(s) in the snapshot")
    return _result(by_wording, groups, held, paraphrase, target, notes)


def _result(by_wording, groups, held, paraphrase, target, notes) -> JudgeSplit:
    ids = {e["id"] for w in held for e in by_wording[w]}
    taught = sum(1 for ws in groups.values() if any(w not in held for w in ws))
    return JudgeSplit(held_out_ids=ids, wordings=len(by_wording), held_out_wordings=len(held),
                      paraphrase_wordings=len(paraphrase & held), groups_taught=taught, target=target,
                      reasons=notes)
