"""Active learning: which turns reviewers see first, and which are pushed at all.

Every turn falls in one tier:

- ``negative``: the user gave thumbs-down, a corrected answer or a down-reason: the clearest
  signal that the model needs a better answer here;
- ``uncertain``: no such signal, but the model's mean token log-probability is below
  ``uncertainty_threshold``: the model itself was unsure, so a review is most informative;
- ``recent``: everything else without a thumbs-up (newest first: closest to today's traffic);
- ``positive``: thumbs-up. Only a deterministic sample (``thumbs_up_sample_rate``, by a hash of
  the turn's conversation and answer) is pushed: they confirm good behaviour but are plentiful and
  cheap. The hash is of the text, not of the turn id: ids are random ULIDs, so a sample by id would
  send different chats to review, and so train a different model, from the same chat logs on every
  machine (the judge split follows the same rule, ``annotation.judge_split``).

``priority`` is a float reviewers sort on (highest first): its integer part is the tier's rank in
``priority_order`` (first tier highest) and its fraction orders turns inside the tier (newest
first; for ``uncertain``, least confident first: ``1 - exp(logprob_mean)``). A tier missing from
``priority_order`` is never pushed. The push takes the highest priorities up to the budget.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from annotation.config import AnnotationConfig
from annotation.schema import is_negative

# Recency fraction in [0, 1): (epoch seconds - _EPOCH_START) / _EPOCH_SPAN, covering 2020-09 to
# 2083. Argilla indexes float metadata as 32-bit floats (about 22 bits for the fraction), so a span
# of 2e9 s still orders turns a few minutes apart correctly when reviewers sort in the UI.
_EPOCH_START = 1.6e9
_EPOCH_SPAN = 2e9


def hash_fraction(key: str) -> float:
    """A uniform number in [0, 1) derived from ``key`` (same on every run and machine)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / 16**15


def sample_key(turn: dict[str, Any]) -> str:
    """What a thumbs-up's sample is drawn from: the conversation and the answer, never the id."""
    return json.dumps([turn.get("messages") or [], turn.get("answer") or ""], sort_keys=True, ensure_ascii=False)


def sampled(turn: dict[str, Any], rate: float) -> bool:
    """Whether a thumbs-up turn is in the pushed sample."""
    return hash_fraction(sample_key(turn)) < rate


def tier_of(turn: dict[str, Any], config: AnnotationConfig) -> str:
    fb = turn.get("feedback")
    if is_negative(fb):
        return "negative"
    if (fb or {}).get("thumbs") == "up":
        return "positive"
    lp = turn.get("logprob_mean")
    if lp is not None and lp < config.uncertainty_threshold:
        return "uncertain"
    return "recent"


def _recency(turn: dict[str, Any]) -> float:
    created = turn.get("created_at")
    if not created:
        return 0.0
    when = dt.datetime.fromisoformat(created)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return min(max((when.timestamp() - _EPOCH_START) / _EPOCH_SPAN, 0.0), 0.999999)


def priority_of(turn: dict[str, Any], tier: str, config: AnnotationConfig) -> float:
    order = list(config.priority_order)
    base = float(len(order) - order.index(tier)) if tier in order else 0.0
    if tier == "uncertain":
        lp = turn.get("logprob_mean")
        within = 1.0 - math.exp(min(lp, 0.0)) if lp is not None else 0.0
    else:
        within = _recency(turn)
    return base + min(max(within, 0.0), 0.999999)


@dataclass(frozen=True)
class Ranked:
    """A turn's place in the queue."""

    turn_id: str
    tier: str
    priority: float
    eligible: bool  # False: its tier is not in priority_order, or an unsampled thumbs-up


def rank_turn(turn: dict[str, Any], config: AnnotationConfig) -> Ranked:
    tier = tier_of(turn, config)
    eligible = tier in config.priority_order and (tier != "positive" or sampled(turn, config.thumbs_up_sample_rate))
    return Ranked(turn["id"], tier, priority_of(turn, tier, config), eligible)


def select(candidates: list[Ranked], budget: int) -> tuple[list[Ranked], list[Ranked]]:
    """Split eligible new candidates into (chosen, left for a later cycle) by priority."""
    ordered = sorted((c for c in candidates if c.eligible), key=lambda r: (-r.priority, r.turn_id))
    return ordered[:budget], ordered[budget:]
