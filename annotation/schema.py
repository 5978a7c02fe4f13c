"""The `chat-feedback` dataset: its settings, its recorded schema version, and its migration path.

A store turn becomes one Argilla record (record id = turn id):

- fields: ``conversation`` (chat field: the messages the model saw), ``answer`` (the model's
  answer), ``user_feedback`` (what the chat user said: thumbs, reasons, comment, own correction);
- questions: ``quality`` (rating 1-5), ``corrected_response`` (text, optional), ``issues``
  (multi-label, the app's reason list from ``loop.core.reasons``);
- suggestions: ``corrected_response`` pre-filled with the model's answer, ``issues`` pre-filled
  with the user's reasons, both with the model version as agent;
- metadata: model version, thumbs, reasons, uncertainty (log-prob mean/min), latency, created-at,
  tier and ``priority`` (reviewers sort on it, highest first).

The schema version is written into the guidelines as a marker (Argilla has no free-form dataset
metadata) and into every record's metadata. ``ensure_dataset`` compares the live dataset with the
expected settings: an older version is migrated (in place when the change is additive, else a new
dataset ``<name>-v<N>``), and a same-version dataset whose structure differs is an error, never a
silent mismatch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import argilla as rg

from annotation.config import PRIORITY_TIERS, AnnotationConfig
from annotation.scrub import Scrubber
from loop.core.errors import LoopError
from loop.core.reasons import ALL_REASONS, LABELS, REASONS_DOWN

# Bump when the fields, questions, metadata or the record mapping change, and add a Migration.
SCHEMA_VERSION = 1

# The `issues` question offers the same reasons the app's feedback widgets offer.
ISSUE_LABELS: dict[str, str] = {r: LABELS[r] for r in ALL_REASONS}

QUALITY_VALUES = [1, 2, 3, 4, 5]

_MARKER = re.compile(r"<!--\s*chat-feedback schema v(\d+)\s*-->")

GUIDELINES = """\
# Reviewing chat answers

Each record is one answer of the chat model, with the conversation it answered and what the chat
user said about it. Records are ordered by **priority** (highest first): answers users disliked or
corrected come first, then answers the model itself was unsure about (low token log-probability),
then recent ones, then a sample of answers users liked. Sort by the `priority` metadata to work in
that order.

## What to do
1. **quality** (required): rate the model's answer.
   - 5: correct, complete and well written; 4: good, minor nits;
   - 3: usable but flawed; 2: wrong or unhelpful in an important way; 1: harmful, offensive or nonsense.
2. **corrected_response** (optional): it starts as the model's answer. Edit it into the answer the
   model *should* have given. Leave it untouched if the answer is fine: an unchanged text is not
   a correction.
3. **issues** (optional): pre-filled with the user's reasons; keep, remove or add labels.
4. **Submit**, or **Discard** a record that should never be used for training (spam, a garbled
   conversation, private data the scrub missed).

## What happens with your review
- A submitted record with an edited correction trains the model on your correction.
- Otherwise it trains the model on its own answer only when quality is 4 or more.
- Discarded records never train the model.
- When several reviewers submit the same record: the median rating (the lower middle one for an
  even count) decides, the most recently submitted correction wins, and a discard by anyone keeps
  the record out of training.

Personal data (e-mails, phone numbers, card numbers, keys) was replaced by placeholders such as
`[EMAIL]` before the record reached you. Keep the placeholders in corrections.
"""


class SchemaMismatchError(LoopError, RuntimeError):
    """The live dataset does not match the schema this code writes; the message says what to do."""


# --- settings ---------------------------------------------------------------------------------


def marker(version: int) -> str:
    return f"<!-- chat-feedback schema v{version} -->"


def read_version(guidelines: str | None) -> int | None:
    """The schema version recorded in a dataset's guidelines, or None if it has no marker."""
    match = _MARKER.search(guidelines or "")
    return int(match.group(1)) if match else None


def build_settings(config: AnnotationConfig, client: rg.Argilla, version: int = SCHEMA_VERSION) -> rg.Settings:
    """The settings of schema ``version`` (only the current one is built by this code)."""
    c = client
    return rg.Settings(
        guidelines=GUIDELINES + "\n" + marker(version) + "\n",
        allow_extra_metadata=False,
        distribution=rg.TaskDistribution(min_submitted=config.min_submitted),
        fields=[
            rg.ChatField(name="conversation", title="Conversation so far", use_markdown=True, required=True, _client=c),
            rg.TextField(name="answer", title="Model's answer", use_markdown=True, required=True, client=c),
            rg.TextField(name="user_feedback", title="What the user said", use_markdown=True, required=False, client=c),
        ],
        questions=[
            rg.RatingQuestion(
                name="quality", values=QUALITY_VALUES, required=True, client=c,
                title="How good is the model's answer?", description="1 = harmful or nonsense ... 5 = excellent.",
            ),
            rg.TextQuestion(
                name="corrected_response", required=False, use_markdown=True, client=c,
                title="Corrected answer", description="Edit into the answer the model should have given; leave as is if fine.",
            ),
            rg.MultiLabelQuestion(
                name="issues", labels=ISSUE_LABELS, required=False, visible_labels=len(ISSUE_LABELS), client=c,
                title="What is wrong (or right) with it?",
            ),
        ],
        metadata=[
            rg.IntegerMetadataProperty(name="schema_version", title="Schema version", client=c),
            rg.TermsMetadataProperty(name="model_version", title="Model version", client=c),
            rg.TermsMetadataProperty(name="thumbs", options=["up", "down", "none"], title="User thumbs", client=c),
            rg.TermsMetadataProperty(name="reasons", options=list(ALL_REASONS), title="User reasons", client=c),
            rg.TermsMetadataProperty(name="tier", options=list(PRIORITY_TIERS), title="Priority tier", client=c),
            rg.FloatMetadataProperty(name="priority", title="Priority (higher first)", client=c),
            rg.FloatMetadataProperty(name="logprob_mean", title="Mean token log-prob", client=c),
            rg.FloatMetadataProperty(name="logprob_min", title="Min token log-prob", client=c),
            rg.FloatMetadataProperty(name="latency_s", title="Latency (s)", client=c),
            rg.IntegerMetadataProperty(name="created_at", title="Created at (unix s)", client=c),
        ],
    )


def describe(settings: rg.Settings) -> dict[str, Any]:
    """The structural part of settings (names, kinds, options), comparable across server round-trips."""

    def kind(obj: Any) -> str:
        return type(obj).__name__

    questions = {}
    for q in settings.questions:
        entry: dict[str, Any] = {"kind": kind(q), "required": bool(q.required)}
        if hasattr(q, "labels"):
            entry["labels"] = sorted(q.labels)
        if hasattr(q, "values"):
            entry["values"] = sorted(q.values)
        questions[q.name] = entry
    return {
        "fields": {f.name: {"kind": kind(f), "required": bool(f.required)} for f in settings.fields},
        "questions": questions,
        "metadata": {m.name: kind(m) for m in settings.metadata},
    }


def describe_diff(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences between two ``describe`` results."""
    out = []
    for section in ("fields", "questions", "metadata"):
        exp, act = expected.get(section, {}), actual.get(section, {})
        for name in sorted(set(exp) - set(act)):
            out.append(f"{section[:-1] if section != 'metadata' else 'metadata property'} {name!r} is missing")
        for name in sorted(set(act) - set(exp)):
            out.append(f"{section[:-1] if section != 'metadata' else 'metadata property'} {name!r} is unexpected")
        for name in sorted(set(exp) & set(act)):
            if exp[name] != act[name]:
                out.append(f"{section} {name!r} differs: expected {exp[name]}, found {act[name]}")
    return out


# --- migrations -------------------------------------------------------------------------------


@dataclass
class Migration:
    """How a dataset of schema ``from_version`` becomes ``from_version + 1``.

    ``in_place``: ``apply(dataset, config, client)`` adds what is new (Argilla lets a published
    dataset gain metadata properties and change guidelines, not gain fields or questions); the
    records keep their reviews. ``new_dataset``: the change cannot be made in place, so the new
    version lives in a new dataset named ``<dataset>-v<to_version>``; the old one stays readable.
    """

    from_version: int
    kind: str  # "in_place" | "new_dataset"
    note: str
    apply: Callable[[rg.Dataset, AnnotationConfig, rg.Argilla], None] | None = None

    @property
    def to_version(self) -> int:
        return self.from_version + 1


@dataclass
class Schema:
    """A schema version, how to build its settings, and the migrations that lead to it."""

    version: int = SCHEMA_VERSION
    build: Callable[[AnnotationConfig, rg.Argilla, int], rg.Settings] = build_settings
    migrations: dict[int, Migration] = field(default_factory=dict)

    def dataset_name(self, base: str) -> str:
        """The dataset holding this version: the base name until a migration needed a new dataset."""
        last_new = max((m.to_version for m in self.migrations.values()
                        if m.kind == "new_dataset" and m.to_version <= self.version), default=None)
        return base if last_new is None else f"{base}-v{last_new}"

    def lineage(self, base: str) -> list[str]:
        """Every dataset name this schema's history used, newest first."""
        names = [base] + [f"{base}-v{m.to_version}" for m in sorted(self.migrations.values(), key=lambda m: m.from_version)
                          if m.kind == "new_dataset" and m.to_version <= self.version]
        return list(reversed(names))


# No migrations yet: version 1 is the first published schema. Add entries here, never edit old ones.
MIGRATIONS: dict[int, Migration] = {}
CURRENT = Schema(SCHEMA_VERSION, build_settings, MIGRATIONS)


# --- ensure -----------------------------------------------------------------------------------


def _workspace(client: rg.Argilla, name: str) -> rg.Workspace:
    ws = client.workspaces(name)
    if ws is None:
        try:
            ws = rg.Workspace(name=name, client=client).create()
        except Exception as exc:  # an annotator/admin key may not create workspaces
            raise RuntimeError(
                f"Argilla workspace {name!r} does not exist and could not be created with this API key ({exc}); "
                "create it, or start the local stack with `python -m annotation.server start`"
            ) from exc
    return ws


def find_dataset(client: rg.Argilla, config: AnnotationConfig, name: str | None = None) -> rg.Dataset | None:
    """The dataset ``name`` (default: the current schema's) in the workspace, or None."""
    ws = client.workspaces(config.workspace)
    if ws is None:
        return None
    name = name or CURRENT.dataset_name(config.dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SDK warns when a dataset is not found
        for ds in ws.datasets:
            if ds.name == name:
                return ds.get()
    return None


def ensure_dataset(client: rg.Argilla, config: AnnotationConfig, schema: Schema = CURRENT) -> rg.Dataset:
    """Create the dataset if missing, migrate it if older, and fail loudly if it does not match.

    Idempotent: calling it again on a matching dataset only re-applies the task distribution.
    """
    workspace = _workspace(client, config.workspace)
    name = schema.dataset_name(config.dataset)
    dataset = find_dataset(client, config, name)
    if dataset is None:
        dataset = rg.Dataset(name=name, workspace=workspace, settings=schema.build(config, client, schema.version), client=client)
        return dataset.create()
    found = read_version(dataset.settings.guidelines)
    if found is None:
        raise SchemaMismatchError(
            f"dataset {config.workspace}/{name} exists but carries no schema marker: it was not created by this "
            "project. Rename it in Argilla or set annotation.dataset to another name."
        )
    if found > schema.version:
        raise SchemaMismatchError(
            f"dataset {config.workspace}/{name} has schema v{found}, newer than this code's v{schema.version}: "
            "upgrade this installation before pushing or pulling."
        )
    while found < schema.version:
        migration = schema.migrations.get(found)
        if migration is None:
            raise SchemaMismatchError(
                f"dataset {config.workspace}/{name} has schema v{found} and no migration to v{found + 1} is defined "
                "in annotation.schema.MIGRATIONS"
            )
        if migration.kind != "in_place" or migration.apply is None:
            raise SchemaMismatchError(  # dataset_name() would have pointed at the new dataset
                f"migration v{found}->v{migration.to_version} needs a new dataset but {name!r} was found"
            )
        migration.apply(dataset, config, client)
        found = migration.to_version
        dataset.settings.guidelines = schema.build(config, client, found).guidelines
        dataset.update()
        dataset = find_dataset(client, config, name)
    expected = describe(schema.build(config, client, schema.version))
    actual = describe(dataset.settings)
    diff = describe_diff(expected, actual)
    if diff:
        raise SchemaMismatchError(
            f"dataset {config.workspace}/{name} says schema v{found} but its structure differs from this code's: "
            + "; ".join(diff)
            + ". Bump annotation.schema.SCHEMA_VERSION and add a Migration instead of changing the schema in place."
        )
    if dataset.settings.distribution.min_submitted != config.min_submitted:
        dataset.settings.distribution = rg.TaskDistribution(min_submitted=config.min_submitted)
        try:
            dataset.update()
        except Exception as exc:  # Argilla refuses a distribution change once responses exist
            warnings.warn(f"could not change min_submitted of {name!r} to {config.min_submitted}: {exc}", stacklevel=2)
    return dataset


def review_url(api_url: str, dataset_id) -> str:
    """The dataset's review page with the queue sorted by priority, highest first."""
    return f"{api_url.rstrip('/')}/dataset/{dataset_id}/annotation-mode?page=1&status=pending&sort=metadata.priority.desc"


# --- records ----------------------------------------------------------------------------------


def epoch_seconds(iso: str | None) -> int | None:
    if not iso:
        return None
    when = dt.datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


def _finite(value: Any) -> float | None:
    """A float Argilla and its index accept: -inf log-probs (llama.cpp gives them) and NaN become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _user_feedback_text(fb: dict[str, Any] | None, scrubber: Scrubber) -> str:
    if not fb:
        return "_No feedback from the user._"
    parts = []
    # Plain words, no emoji: the UI's markdown renderer garbles emoji inside bold text.
    thumbs = {"up": "Thumbs up", "down": "Thumbs down"}.get(fb.get("thumbs") or "", "No thumbs")
    reasons = ", ".join(LABELS.get(r, r) for r in fb.get("reasons") or [])
    parts.append(f"**{thumbs}**" + (f" · {reasons}" if reasons else ""))
    if fb.get("comment"):
        parts.append("**Comment:** " + scrubber.text(fb["comment"]))
    if fb.get("correction"):
        parts.append("**The user's corrected answer:**\n\n" + scrubber.text(fb["correction"]))
    return "\n\n".join(parts)


def build_record(turn: dict[str, Any], *, scrubber: Scrubber, tier: str, priority: float) -> dict[str, Any]:
    """The plain record payload for one store turn (scrubbed); its hash decides whether to re-push."""
    fb = turn.get("feedback") or {}
    agent = turn.get("model_version") or "unknown"
    answer = scrubber.text(turn.get("answer") or "")
    reasons = [r for r in (fb.get("reasons") or []) if r in ISSUE_LABELS]
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "model_version": agent,
        "thumbs": fb.get("thumbs") or "none",
        "reasons": reasons or None,
        "tier": tier,
        "priority": round(float(priority), 12),
        "logprob_mean": _finite(turn.get("logprob_mean")),
        "logprob_min": _finite(turn.get("logprob_min")),
        "latency_s": _finite(turn.get("latency_s")),
        "created_at": epoch_seconds(turn.get("created_at")),
    }
    suggestions = [{"question_name": "corrected_response", "value": answer, "agent": agent, "type": "model"}]
    if reasons:
        suggestions.append({"question_name": "issues", "value": reasons, "agent": agent, "type": "human"})
    conversation = [
        {"role": m.get("role") or "user", "content": c}
        for m in scrubber.messages(turn.get("messages") or [])
        if (c := m["content"])  # Argilla rejects empty chat messages
    ] or [{"role": "user", "content": "(empty)"}]
    return {
        "id": turn["id"],
        "fields": {"conversation": conversation, "answer": answer or "(empty answer)",
                   "user_feedback": _user_feedback_text(fb, scrubber)},
        "metadata": {k: v for k, v in metadata.items() if v is not None},
        "suggestions": suggestions,
    }


def payload_hash(payload: dict[str, Any]) -> str:
    """Content hash of a record payload (what Argilla would hold)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def to_argilla(payload: dict[str, Any]) -> rg.Record:
    return rg.Record(
        id=payload["id"],
        fields=payload["fields"],
        metadata=payload["metadata"],
        suggestions=[rg.Suggestion(**s) for s in payload["suggestions"]],
    )


def is_negative(feedback: dict[str, Any] | None) -> bool:
    """Thumbs-down, a user correction, or a down-reason: the user says the answer needs work."""
    fb = feedback or {}
    return fb.get("thumbs") == "down" or bool(fb.get("correction")) or any(r in REASONS_DOWN for r in fb.get("reasons") or [])
