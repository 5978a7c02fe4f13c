"""The feedback reason lists, shared by the app's widgets and the Argilla `issues` question.

Open WebUI's rating reasons are the anchor. Changing a label here changes the Argilla schema:
bump ``annotation.schema.SCHEMA_VERSION`` with it.
"""

from __future__ import annotations

# Why an answer was bad (offered with thumbs-down).
REASONS_DOWN: tuple[str, ...] = (
    "not_factually_correct",
    "did_not_follow_instructions",
    "refused_wrongly",
    "incomplete",
    "too_verbose",
    "style",
    "unsafe_or_offensive",
    "other",
)

# Why an answer was good (offered with thumbs-up).
REASONS_UP: tuple[str, ...] = (
    "accurate",
    "followed_instructions",
    "thorough",
    "clear",
    "creative",
    "other_positive",
)

ALL_REASONS: tuple[str, ...] = REASONS_DOWN + REASONS_UP

LABELS: dict[str, str] = {r: r.replace("_", " ") for r in ALL_REASONS}
