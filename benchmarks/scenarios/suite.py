"""The learning scenarios in this folder: loading and validation.

A scenario is one JSON file, ``<name>.json``, holding one object:

    name, kind (facts | faq | behaviour | multiturn | restyle | thumbs), split (tune | unseen), description,
    thumbs_down_review (optional): what the scripted reviewer does with a thumbs-down that has no correction:
                    "discard" (the default, the demo's reviewer) or "rate_low" (rated 1 and kept, so the thumb
                    becomes an undesirable label that preference training can learn from; a "thumbs" scenario
                    teaches through such labels alone, with no correction written),
    settings (optional): the deployment's config for this scenario, ``{"section.key": value}`` (set for the
                    run as LOOP_SECTION__KEY; for example a thumbs scenario pushes every thumbs-up for review:
                    ``{"annotation.thumbs_up_sample_rate": 1.0}``),
    chats:          what users did in the app. Each has ``messages`` (ending with a user turn; earlier turns
                    may include the assistant) and ``feedback`` ({thumbs, reasons, comment, correction}; the
                    reasons come from the app's list, loop/core/reasons.py; null: nobody rated the turn). An
                    optional ``answer`` is the answer the user saw; without it the runner has the base GGUF
                    answer, as the app would have.
    probes:         held-out ``{"messages", "check"}``: the taught things asked in words no chat used.
    general_probes: ``{"messages", "check"}``: general knowledge the base model should keep; none of them
                    may be (nearly) a question the trainer already uses (trainer/regression_set.jsonl,
                    general_replay.jsonl, and the probe set loop/core/probes.jsonl), else "kept" would
                    measure memorised training data.

``validate_scenario`` returns every problem at once; ``load_scenarios`` raises ``ScenarioError`` listing
them all, so a bad file never half-runs. Questions count as the same when their normalised words
(lower case, punctuation dropped) are equal or at least ``NEAR_DUPLICATE`` similar as word sequences
(difflib's ratio): "How many days are in a week?" and "How many days are there in a week?" collide,
"What is the capital of Peru?" and "What is the capital of Spain?" do not.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loop.core.errors import LoopError

from . import checks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KINDS = ("facts", "faq", "behaviour", "multiturn", "restyle", "thumbs")
THUMBS_DOWN_REVIEWS = ("discard", "rate_low")
SPLITS = ("tune", "unseen")
NEAR_DUPLICATE = 0.9
TRAINER_SETS = ("regression_set.jsonl", "general_replay.jsonl")
PROBE_SET = REPO / "loop" / "core" / "probes.jsonl"  # the exporter's probe set (shared with the versions CLI)


class ScenarioError(LoopError, ValueError):
    """One or more scenario files are malformed; the message lists every problem."""


def question_key(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", checks.normalise(text))).strip()


def same_question(a: str, b: str) -> bool:
    # Word-level, not character-level: "capital of Poland" and "capital of Japan" are different
    # questions although their characters mostly agree.
    wa, wb = question_key(a).split(), question_key(b).split()
    return wa == wb or difflib.SequenceMatcher(None, wa, wb, autojunk=False).ratio() >= NEAR_DUPLICATE


def last_user(messages: list[dict[str, str]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def trainer_questions(trainer_dir: Path | None = None) -> list[str]:
    """Every user turn in the trainer's regression, general-replay and probe sets."""
    trainer_dir = trainer_dir or REPO / "trainer"
    out: list[str] = []
    for path in [trainer_dir / name for name in TRAINER_SETS] + [PROBE_SET]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                out += [m["content"] for m in row["messages"] if m.get("role") == "user"]
            else:
                out.append(row["prompt"])
    return out


def _valid_reasons() -> set[str]:
    from loop.core.reasons import ALL_REASONS

    return set(ALL_REASONS)


def _messages_problems(messages: Any, where: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{where}: messages must be a non-empty list"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system") \
                or not isinstance(m.get("content"), str) or not m["content"].strip():
            problems.append(f"{where}: messages[{i}] must be {{'role': user|assistant|system, 'content': text}}")
    if not problems and messages[-1]["role"] != "user":
        problems.append(f"{where}: the last message must be the user's")
    return problems


def _feedback_problems(fb: Any, where: str, reasons: set[str], thumbs_down_review: str) -> list[str]:
    if fb is None:  # a turn nobody rated: pushed like any other, the reviewer discards it
        return []
    if not isinstance(fb, dict):
        return [f"{where}: feedback must be an object or null"]
    problems = []
    if fb.get("thumbs") not in ("up", "down"):
        problems.append(f"{where}: feedback.thumbs must be 'up' or 'down', got {fb.get('thumbs')!r}")
    bad = [r for r in fb.get("reasons") or [] if r not in reasons]
    if bad:
        problems.append(f"{where}: unknown reason(s) {bad} (the app's list: loop/core/reasons.py)")
    correction = fb.get("correction")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        problems.append(f"{where}: feedback.correction must be null or a non-empty string")
    if fb.get("thumbs") == "down" and not correction and thumbs_down_review == "discard" \
            and "unsafe_or_offensive" not in (fb.get("reasons") or []):
        problems.append(f"{where}: a thumbs-down teaches nothing without a correction (the reviewer discards it; "
                        "thumbs_down_review = 'rate_low' keeps it as an undesirable label)")
    return problems


def _probe_problems(probe: Any, where: str) -> list[str]:
    if not isinstance(probe, dict):
        return [f"{where}: a probe is an object with messages and check"]
    return _messages_problems(probe.get("messages"), where) + checks.validate(probe.get("check"), f"{where}.check")


def validate_scenario(data: Any, where: str = "scenario", trainer: Iterable[str] | None = None) -> list[str]:
    """Every problem in one scenario object (empty when it is sound)."""
    if not isinstance(data, dict):
        return [f"{where}: a scenario is a JSON object"]
    problems: list[str] = []
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            problems.append(f"{where}: {key} must be a non-empty string")
    if data.get("kind") not in KINDS:
        problems.append(f"{where}: kind must be one of {KINDS}, got {data.get('kind')!r}")
    if data.get("split") not in SPLITS:
        problems.append(f"{where}: split must be one of {SPLITS}, got {data.get('split')!r}")
    thumbs_down_review = data.get("thumbs_down_review", "discard")
    if thumbs_down_review not in THUMBS_DOWN_REVIEWS:
        problems.append(f"{where}: thumbs_down_review must be one of {THUMBS_DOWN_REVIEWS}, got {thumbs_down_review!r}")
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[a-z_]+\.[a-z_]+", k) and isinstance(v, (str, int, float, bool))
            for k, v in settings.items()):
        problems.append(f"{where}: settings must map 'section.key' to a string, number or boolean, got {settings!r}")
    reasons = _valid_reasons()
    groups = {}
    for key in ("chats", "probes", "general_probes"):
        items = data.get(key)
        if not isinstance(items, list) or not items:
            problems.append(f"{where}: {key} must be a non-empty list")
            items = []
        groups[key] = items
    for i, chat in enumerate(groups["chats"]):
        at = f"{where}: chats[{i}]"
        if not isinstance(chat, dict):
            problems.append(f"{at}: a chat is an object with messages and feedback")
            continue
        problems += _messages_problems(chat.get("messages"), at)
        problems += _feedback_problems(chat.get("feedback"), at, reasons, thumbs_down_review)
        if "answer" in chat and (not isinstance(chat["answer"], str) or not chat["answer"].strip()):
            problems.append(f"{at}: answer, when given, must be a non-empty string")
    for key in ("probes", "general_probes"):
        for i, probe in enumerate(groups[key]):
            problems += _probe_problems(probe, f"{where}: {key}[{i}]")
    if problems:
        return problems
    chat_questions = [m["content"] for c in groups["chats"] for m in c["messages"] if m["role"] == "user"]
    for key in ("probes", "general_probes"):
        for i, probe in enumerate(groups[key]):
            asked = last_user(probe["messages"])
            clash = next((q for q in chat_questions if same_question(asked, q)), None)
            if clash is not None:
                problems.append(f"{where}: {key}[{i}] {asked!r} is (nearly) a chat's question {clash!r}")
            given = [k for k in checks.keywords(probe["check"])
                     if any(checks.normalise(k) in checks.normalise(m["content"]) for m in probe["messages"])]
            if given:
                problems.append(f"{where}: {key}[{i}] gives its own answer away: {given} in the question")
    taught = [last_user(p["messages"]) for p in groups["probes"]]
    for i, probe in enumerate(groups["general_probes"]):
        asked = last_user(probe["messages"])
        clash = next((q for q in taught if same_question(asked, q)), None)
        if clash is not None:
            problems.append(f"{where}: general_probes[{i}] {asked!r} is (nearly) a probe {clash!r}")
        clash = next((q for q in (trainer or []) if same_question(asked, q)), None)
        if clash is not None:
            problems.append(f"{where}: general_probes[{i}] {asked!r} is (nearly) the trainer's {clash!r}")
    return problems


def scenario_files(folder: Path = HERE) -> list[Path]:
    return sorted(folder.glob("*.json"))


def load_scenarios(folder: Path = HERE, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every scenario in ``folder`` (or the ones named), validated; ScenarioError lists all problems."""
    files = scenario_files(folder)
    wanted = list(names or [])
    known = {p.stem for p in files}
    problems = [f"no scenario named {n!r} (known: {', '.join(sorted(known))})" for n in wanted if n not in known]
    trainer = trainer_questions()
    scenarios = []
    for path in files:
        if wanted and path.stem not in wanted:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            problems.append(f"{path.name}: not valid JSON: {exc}")
            continue
        found = validate_scenario(data, path.name, trainer)
        if not found and data["name"] != path.stem:
            found = [f"{path.name}: name {data['name']!r} must match the file name"]
        problems += found
        scenarios.append(data)
    if problems:
        raise ScenarioError("\n".join(problems))
    return scenarios
