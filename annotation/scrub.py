"""Privacy scrub: personal data and secrets are replaced before any text leaves the store.

Chat users paste e-mails, phone numbers, card numbers and API keys into prompts; reviewers (and
later the training data) must not see them. The scrub runs on every text that is pushed to
Argilla (the conversation, the answer, the user's comment and correction), so the annotation
dataset and every snapshot pulled from it hold only the placeholders.

Each kind is a named detector, switched on or off in ``AnnotationConfig.scrub_kinds``; extra
regular expressions (``scrub_extra_patterns``) are replaced with ``[REDACTED]``. Detectors run in
a fixed order (secrets, e-mails, cards, phones, extra) so that, for example, the digits of a card
are never half-eaten by the phone detector first.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Detector kinds, in the order they run.
KINDS: tuple[str, ...] = ("secret", "email", "card", "phone")

PLACEHOLDERS: dict[str, str] = {
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "card": "[CARD]",
    "phone": "[PHONE]",
    "extra": "[REDACTED]",
}

_SECRET_PATTERNS = [
    # Vendor-prefixed keys: OpenAI/Anthropic style sk-..., Hugging Face hf_..., AWS access key ids,
    # GitHub tokens, Slack tokens, Google API keys.
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{16,}",
    r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}",
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])",
    r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{30,}",
    r"(?<![A-Za-z0-9])github_pat_[A-Za-z0-9_]{30,}",
    r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9\-]{10,}",
    r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_\-]{35}",
    # A "Bearer <token>" header value, whatever the token looks like.
    r"(?<=Bearer )[A-Za-z0-9._~+/\-]{16,}=*",
    # Long hex strings (keys, session ids): 32+ hex digits in one run.
    r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])",
]
_SECRET = re.compile("|".join(f"(?:{p})" for p in _SECRET_PATTERNS))

# Long base64/base64url runs are secret-looking only if they mix upper case, lower case and digits
# (a long plain word or a row of dashes is not a key); checked in _is_base64_secret.
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{40,}={0,2}(?![A-Za-z0-9+/=_\-])")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")

# 13-19 digits, optionally grouped by single spaces or dashes; kept only if the Luhn check passes
# (so order numbers and long integers survive).
_CARD = re.compile(r"(?<![\d\w])\d(?:[ \-]?\d){12,18}(?![\d\w])")

# International or national numbers written with separators: +CC, optional (area), then groups.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,4}(?![\w])")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def luhn_valid(digits: str) -> bool:
    """True when the digit string passes the Luhn checksum used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_card(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn_valid(digits) and len(set(digits)) > 1


def _is_phone(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    if not 7 <= len(digits) <= 15:
        return False
    if _DATE.match(match) or _IPV4.match(match):
        return False
    groups = re.findall(r"\d+", match)
    if not match.startswith("+") and all(len(g) == 4 and g[:2] in ("19", "20") for g in groups):
        return False  # a list of years ("2023 2024 2025"), not a number to dial
    # A bare run of digits is more likely a count or an id than a phone number; a real number is
    # written with a + prefix, an (area) part or at least two separators.
    separators = len(re.findall(r"[ .\-]", match))
    return match.startswith("+") or "(" in match or separators >= 2


def _is_base64_secret(match: str) -> bool:
    body = match.rstrip("=")
    return bool(re.search(r"[A-Z]", body) and re.search(r"[a-z]", body) and re.search(r"\d", body))


@dataclass
class ScrubResult:
    """Scrubbed text plus how many replacements of each kind were made."""

    text: str
    counts: Counter = field(default_factory=Counter)


class Scrubber:
    """Replaces personal data and secrets; one instance is reused for a whole push."""

    def __init__(self, kinds: Iterable[str] = KINDS, extra_patterns: Iterable[str] = (), enabled: bool = True):
        kinds = list(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown scrub kind(s) {unknown}; known: {', '.join(KINDS)}")
        self.enabled = enabled
        self.kinds = [k for k in KINDS if k in kinds]  # fixed order, whatever the config's order
        self.extra = [re.compile(p) for p in extra_patterns]
        self.totals: Counter = Counter()

    def _sub(self, pattern: re.Pattern, text: str, kind: str, keep: Callable[[str], bool] | None, counts: Counter) -> str:
        def repl(m: re.Match) -> str:
            if keep is not None and not keep(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    def scrub(self, text: str | None) -> ScrubResult:
        """Scrub one text; counts are also added to ``self.totals``."""
        counts: Counter = Counter()
        if not text or not self.enabled:
            return ScrubResult(text or "", counts)
        out = text
        for kind in self.kinds:
            if kind == "secret":
                out = self._sub(_SECRET, out, "secret", None, counts)
                out = self._sub(_BASE64, out, "secret", _is_base64_secret, counts)
            elif kind == "email":
                out = self._sub(_EMAIL, out, "email", None, counts)
            elif kind == "card":
                out = self._sub(_CARD, out, "card", _is_card, counts)
            elif kind == "phone":
                out = self._sub(_PHONE, out, "phone", _is_phone, counts)
        for pattern in self.extra:
            out = self._sub(pattern, out, "extra", None, counts)
        self.totals.update(counts)
        return ScrubResult(out, counts)

    def text(self, text: str | None) -> str:
        """Scrub and return only the text (counts still go to ``self.totals``)."""
        return self.scrub(text).text

    def messages(self, messages: list[dict]) -> list[dict]:
        """Scrub the content of every chat message; roles are kept."""
        return [{**m, "content": self.text(m.get("content") or "")} for m in messages]


def scrub_text(text: str, kinds: Iterable[str] = KINDS) -> str:
    """Convenience: scrub one text with the given detectors."""
    return Scrubber(kinds).text(text)
