"""The preference data of a snapshot: DPO pairs and KTO labels, read and checked, and whether an objective can train.

Contract: a snapshot directory may hold ``pairs.jsonl`` and ``labels.jsonl`` (+ ``eval_pairs.jsonl``,
``eval_labels.jsonl``), split like its examples (annotation/snapshot.py). A pair is ``{"prompt": [messages],
"chosen": str, "rejected": str}``, a label ``{"prompt": [messages], "answer": str, "label": "desirable" |
"undesirable"}``. ``PreferenceData.from_dir`` reads the four (a missing file is empty; a malformed one is a
DataError naming every bad line). ``skip_reason(objective, data)`` says why an objective has nothing to learn
from (no pairs for DPO; no labels, or labels of one class only, for KTO), None when it can train; the
objective then raises ``PreferenceSkipped`` with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer.data import DataError, checked_jsonl

PAIRS, LABELS, EVAL_PAIRS, EVAL_LABELS = "pairs.jsonl", "labels.jsonl", "eval_pairs.jsonl", "eval_labels.jsonl"
LABEL_VALUES = ("desirable", "undesirable")


class PreferenceSkipped(DataError):
    """The objective has nothing to learn from in this data; the message is the stated reason."""


@dataclass
class PreferenceData:
    """Pairs and labels of one snapshot, split like its examples (annotation/snapshot.py)."""

    pairs: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)
    eval_pairs: list[dict] = field(default_factory=list)
    eval_labels: list[dict] = field(default_factory=list)

    @classmethod
    def from_dir(cls, directory: str | Path | None) -> PreferenceData:
        """The four files of a snapshot directory; a missing file is empty, a malformed one a DataError."""
        if directory is None:
            return cls()
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"preference data directory not found: {directory}")
        return cls(*(load_rows(directory / name, "pair" if "pairs" in name else "label")
                     for name in (PAIRS, LABELS, EVAL_PAIRS, EVAL_LABELS)))


def load_rows(path: Path, kind: str) -> list[dict]:
    """Rows of a pairs or labels file ([] when absent); DataError naming every bad line."""
    path = Path(path)
    if not path.is_file():
        return []
    records, problems = checked_jsonl(path, lambda row: _row_problem(row, kind))
    rows = [row for _, row in records]
    if problems:
        raise DataError(f"{len(problems)} bad {kind} row(s) in {path}:\n  " + "\n  ".join(problems[:20]))
    return rows


def _row_problem(row: object, kind: str) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                          "assistant")
            for m in prompt):
        return "'prompt' must be a non-empty list of {role, content} messages"
    texts = ("chosen", "rejected") if kind == "pair" else ("answer",)
    for name in texts:
        if not isinstance(row.get(name), str) or not row[name].strip():
            return f"{name!r} must be a non-empty string"
    if kind == "label" and row.get("label") not in LABEL_VALUES:
        return f"'label' must be one of {LABEL_VALUES}, got {row.get('label')!r}"
    return None


def stage_of(objective: str) -> str | None:
    """The preference trainer an objective uses ("dpo", "kto"), or None for plain SFT."""
    return None if objective == "sft" else objective.split("+")[-1]


def skip_reason(objective: str, data: PreferenceData) -> str | None:
    """Why `objective` cannot train on `data` (None when it can)."""
    stage = stage_of(objective)
    if stage == "dpo" and not data.pairs:
        return ("no preference pairs to train DPO on: no reviewer correction differs from the model's logged "
                "answer outside the held-out set")
    if stage == "kto":
        if not data.labels:
            return "no labelled answers to train KTO on (no thumbs and no quality >= 4 or <= 2 outside the held-out set)"
        kinds = {row["label"] for row in data.labels}
        if len(kinds) < 2:
            (only,) = kinds
            return (f"only {only} labels ({len(data.labels)}): KTO needs desirable and undesirable answers to "
                    "tell apart")
    return None
