"""Corrections at answer time: what retrieving them into the prompt, or routing by relevance, would buy.

A measure for ``learning_sweep.py --memory``, not a serving feature. After a sweep run has trained its
adapter, each probe is matched against the scenario's curated examples (all of them, as a served memory
would hold them) and the best ``k`` distinct corrections are put in front of the question, either as a
system message of "known facts" (``sys``) or as earlier chat turns, question and corrected answer
(``shots``). Reported per format and ``k``:

- ``recall_ctx``, ``kept_ctx``: the trained adapter answering with the retrieved corrections in the prompt
  (a probe that retrieves nothing is asked as it is);
- ``recall_routed``, ``kept_routed``: routing by relevance, where a question that retrieves nothing is
  answered by the starting model (its general answers are then kept by definition, and a probe that
  retrieves nothing is a miss, as the starting model knows none of the taught things);
- ``retrieved``, ``g_retrieved``: how many probes and general probes matched anything.

Under ``none`` (no memory in the prompt, so ``k`` does not matter) the ``*_routed`` figures are routing alone:
the adapter answers what matches a correction as it is, the starting model everything else.

Relevance is the summed inverse document frequency of the content words a question shares with a curated
question, document frequencies counted over the curated questions and the trainer's general replay prompts
(so a scenario's own entity names weigh most and "capital" weighs little). It is the simplest lexical
retriever that separates the suite's questions; a served memory would use a maintained one (BM25).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

# Question words and glue: shared by every question, they say nothing about which correction applies.
STOP_WORDS = frozenset(
    "a an the of to in on at by for with and or is are was were be been what which who whom whose how why when "
    "where do does did can could you me my i it its this that these those tell about from as there their they "
    "your we our us please name give make any many much long get has have had up into over than then so if not "
    "no yes one".split())
FORMATS = ("none", "sys", "shots")
KS = (1, 2, 3)


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in STOP_WORDS and len(w) > 1}


def user_text(messages: list[dict]) -> str:
    return " ".join(m["content"] for m in messages if m["role"] == "user")


class CorrectionIndex:
    """The curated examples' questions, scored against a new question by shared rare words."""

    def __init__(self, examples: list[dict], background: list[list[dict]]):
        self.entries = [(content_words(user_text(e["messages"][:-1])), user_text(e["messages"][:-1]),
                         e["messages"][-1]["content"]) for e in examples]
        bags = [words for words, _, _ in self.entries] + [content_words(user_text(m)) for m in background]
        self.n = len(bags)
        self.df: dict[str, int] = {}
        for bag in bags:
            for word in bag:
                self.df[word] = self.df.get(word, 0) + 1

    def retrieve(self, messages: list[dict], k: int) -> list[tuple[str, str]]:
        """Up to `k` (question, corrected answer) pairs with distinct answers, best first; [] when none shares
        a content word with the question."""
        words = content_words(user_text(messages))
        scored = sorted(((sum(math.log(self.n / self.df[w]) for w in words & bag), question, answer)
                         for bag, question, answer in self.entries), key=lambda row: -row[0])
        hits: list[tuple[str, str]] = []
        for score, question, answer in scored:
            if score <= 0 or len(hits) >= k:
                break
            if answer not in [a for _, a in hits]:
                hits.append((question, answer))
        return hits


def with_memory(messages: list[dict], hits: list[tuple[str, str]], fmt: str) -> list[dict]:
    """`messages` with the retrieved corrections in front: a system message, or earlier turns (best last)."""
    if fmt == "sys":
        facts = "\n".join(f"- {answer}" for _, answer in hits)
        return [{"role": "system", "content": f"Known facts:\n{facts}"}, *messages]
    shots: list[dict] = []
    for question, answer in reversed(hits):
        shots += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return shots + messages


def measure(scenario: dict, index: CorrectionIndex, answer: Callable[[list[dict]], list[str]],
            passes: Callable[[dict, str], bool], probe_answers: list[str], general_answers: list[str],
            base_ok: list[bool]) -> dict:
    """The measures above per "<format><k>"; `answer` answers a list of probes (dicts with "messages") with
    the trained adapter, `probe_answers`/`general_answers` are its answers without memory, `base_ok` which
    general probes the starting model answers right."""
    out: dict[str, dict] = {}
    for fmt in FORMATS:
        for k in (KS[:1] if fmt == "none" else KS):
            row: dict = {}
            for kind, plain in (("probes", probe_answers), ("general_probes", general_answers)):
                items = scenario[kind]
                hits = [index.retrieve(p["messages"], k) for p in items]
                asked = [{"messages": with_memory(p["messages"], h, fmt)} for p, h in zip(items, hits)
                         if h and fmt != "none"]
                fresh = iter(answer(asked) if asked else [])
                answers = [next(fresh) if h and fmt != "none" else a for h, a in zip(hits, plain)]
                ok = [passes(p["check"], a) for p, a in zip(items, answers)]
                if kind == "probes":
                    row.update(retrieved=sum(bool(h) for h in hits), recall_ctx=sum(ok) / len(items),
                               recall_routed=sum(o for o, h in zip(ok, hits) if h) / len(items))
                else:
                    right = [i for i, b in enumerate(base_ok) if b]
                    row.update(g_retrieved=sum(bool(h) for h in hits),
                               kept_ctx=sum(ok[i] for i in right) / len(right) if right else None,
                               kept_routed=sum(ok[i] or not hits[i] for i in right) / len(right) if right else None)
            out[fmt if fmt == "none" else f"{fmt}{k}"] = row
    return out
