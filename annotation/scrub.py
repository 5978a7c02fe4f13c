"""Privacy scrub: personal data and secrets are replaced before any text leaves the store.

Chat users paste e-mails, phone numbers, card numbers, bank accounts, addresses and API keys into
prompts; reviewers (and later the training data) must not see them. The scrub runs on every text
that is pushed to Argilla (the conversation, the answer, the user's comment and correction), so the
annotation dataset and every snapshot pulled from it hold only the placeholders.

Detection is Microsoft Presidio's analyzer with its pattern recognizers (e-mail, payment cards with
the Luhn check, IBANs with their checksum, IPv4/IPv6, crypto addresses, phone numbers through
Google's ``phonenumbers``), plus this module's recognizers for secrets (vendor API keys, bearer
tokens, ``password: ...`` values, the credentials in ``user:pass@host``, long hex or base64 keys).
A spaCy NER pipeline is optional: where one is installed (``en_core_web_lg``/``md``/``sm``) person
names are replaced too; otherwise Presidio runs on a blank English tokenizer and no model is loaded
or downloaded. Nothing here touches the network: e-mail validation uses tldextract's bundled
public-suffix snapshot.

Contract:

* Each kind in ``KINDS`` is switched on or off in ``AnnotationConfig.scrub_kinds``; its placeholder
  is ``PLACEHOLDERS[kind]``. Extra regular expressions (``scrub_extra_patterns``) are replaced with
  ``[REDACTED]``.
* Detection runs on a normalised copy (NFKC, invisible format characters such as zero-width spaces
  removed), so full-width, zero-width and non-breaking-space disguises are caught; the replacement
  is made in the original text, which is kept unchanged everywhere outside the replaced spans.
* Where detections overlap, the earlier kind in ``KINDS`` wins (the digits of a card are never
  reported as a phone number), then the longer span.
* ``ScrubResult.counts`` and ``Scrubber.totals`` count replacements per kind.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Raised whenever what the scrubber removes changes: it is part of every record's push hash
# (annotation/push.py), so records scrubbed by an older scrubber are scrubbed again and re-sent.
SCRUBBER_VERSION = 2

# Detector kinds; on overlapping detections the earlier kind wins.
KINDS: tuple[str, ...] = ("secret", "email", "iban", "card", "crypto", "ip", "phone", "name")

PLACEHOLDERS: dict[str, str] = {
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "card": "[CARD]",
    "crypto": "[CRYPTO]",
    "ip": "[IP]",
    "phone": "[PHONE]",
    "name": "[NAME]",
    "extra": "[REDACTED]",
}

# Presidio entity type for each kind.
ENTITIES: dict[str, str] = {
    "secret": "SECRET",
    "email": "EMAIL_ADDRESS",
    "iban": "IBAN_CODE",
    "card": "CREDIT_CARD",
    "crypto": "CRYPTO",
    "ip": "IP_ADDRESS",
    "phone": "PHONE_NUMBER",
    "name": "PERSON",
    "extra": "SCRUB_EXTRA",
}
_KIND_OF = {entity: kind for kind, entity in ENTITIES.items()}
_RANK = {kind: i for i, kind in enumerate((*KINDS, "extra"))}

# spaCy pipelines tried, in order, for person names; none installed = no name detection.
NER_MODELS: tuple[str, ...] = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm")

# Presidio's default score is 0 for a failed checksum; phone numbers score 0.4, the rest more.
_MIN_SCORE = 0.35
# Regions whose national formats count as phone numbers (numbers with a +CC prefix match in any).
# (US covers Canada and the rest of +1.)
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "AU", "ES", "IT", "NL", "CH", "AT")

# Secrets recognised by shape. Case matters (a lowercase "akia..." is a word, not a key), except in
# the patterns that say (?i). Presidio compiles these with the `regex` module, which allows the
# variable-length look-behinds that keep the label ("Bearer ", "password: ") out of the replacement.
_B = r"(?<![A-Za-z0-9_\-])"  # a key starts at a token boundary
_E = r"(?![A-Za-z0-9_\-])"
SECRET_PATTERNS: list[tuple[str, str]] = [
    ("openai/anthropic key", _B + r"sk-[A-Za-z0-9_\-]{16,}"),
    ("stripe key", _B + r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}" + _E),
    ("stripe webhook secret", _B + r"whsec_[A-Za-z0-9]{20,}" + _E),
    ("hugging face token", _B + r"hf_[A-Za-z0-9]{20,}" + _E),
    ("aws access key id", _B + r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}" + _E),
    ("github token", _B + r"gh[pousr]_[A-Za-z0-9]{30,}" + _E),
    ("github fine-grained token", _B + r"github_pat_[A-Za-z0-9_]{30,}"),
    ("gitlab token", _B + r"gl(?:pat|dt|rt|ptt|cbt|oas|soat|ffct|imt|agent)-[A-Za-z0-9_\-]{20,}"),
    ("slack token", _B + r"xox[abeprs]-[A-Za-z0-9\-]{10,}"),
    ("google api key", _B + r"AIza[0-9A-Za-z_\-]{35}" + _E),
    ("npm token", _B + r"npm_[A-Za-z0-9]{36}" + _E),
    ("pypi token", _B + r"pypi-[A-Za-z0-9_\-]{50,}"),
    ("jwt", _B + r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ("private key block", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    # An Authorization header's token, whatever its vendor; a token has at least one digit, so
    # "bearer authentication" stays prose.
    ("bearer token", r"(?i)(?<=\bbearer\s+)(?=[A-Za-z._~+/\-]*[0-9])[A-Za-z0-9._~+/\-]{8,}=*"),
    # The value after a credential label: "password: hunter2", "api_key=...", "?token=..."; a
    # final "." or ")" ends the sentence, not the password.
    ("labelled credential", r"(?i)(?<=\b(?:password|passwd|passwort|kennwort|passphrase|pass|pwd|pin|api[_\-]?key"
                            r"|secret[_\-]?key|client[_\-]?secret|access[_\-]?token|auth[_\-]?token|refresh[_\-]?token"
                            r"|token|secret|sig|signature)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]*[^\s\"',;&.)]"),
    # "my password is hunter2!": only when the value has a digit or symbol, so "the password is
    # stored hashed" keeps its words.
    ("password is", r"(?i)(?<=\b(?:password|passwort|passphrase)\s+(?:is|was)\s+)(?=\S*[^A-Za-z\s.,;:!?])[^\s\"',;]*[^\s\"',;.)]"),  # noqa: E501 - a regex reads best whole
    # The credentials of user:pass@host, with or without a scheme.
    ("url credentials", r"(?:(?<=://)|(?<![\w.:/@+\-%]))(?!(?i:mailto|sips?|xmpp):)[\w.~%!$&*+=\-]+:[^\s/?#@:]+(?=@[\w\-]+(?:\.[\w\-]+)*)"),
    # 32+ hex digits in one run (keys, session ids).
    ("long hex", r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])"),
]
# Digits, possibly grouped by spaces, brackets, dots, dashes or slashes: where a phone number can be.
_DIGIT_RUN = re.compile(r"\+?\d(?:[ ().\-/]{0,3}\d)+")
# 40+ base64/base64url characters, a key only if they mix upper, lower case and digits (validated).
_BASE64 = r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{40,}={0,2}(?![A-Za-z0-9+/=_\-])"


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


def normalise(text: str) -> tuple[str, list[int]]:
    """NFKC form of ``text`` without invisible format characters, and for each of its characters
    the index of the original character it came from (plus one final entry, ``len(text)``)."""
    if text.isascii():  # nothing to fold, nothing invisible
        return text, list(range(len(text) + 1))
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cf":  # zero-width spaces and joiners, bidi controls, soft hyphen
            continue
        norm = unicodedata.normalize("NFKC", ch) if ord(ch) > 127 else ch
        out.append(norm)
        origin.extend([i] * len(norm))
    origin.append(len(text))
    return "".join(out), origin


@functools.lru_cache(maxsize=4096)
def _phone_numbers_in(chunk: str, regions: tuple[str, ...]) -> tuple[tuple[int, int, str], ...]:
    """(start, end, region) of the phone numbers in a short run of digits (cached: records repeat them)."""
    import phonenumbers

    found = []
    passes = [(region, phonenumbers.Leniency.VALID) for region in regions]
    passes.append(("DE", phonenumbers.Leniency.POSSIBLE))  # any +CC number; "00" dials out from DE
    for region, leniency in passes:
        for match in phonenumbers.PhoneNumberMatcher(chunk, region, leniency=leniency):
            raw = match.raw_string
            if sum(c.isdigit() for c in raw) < 7:
                continue
            if leniency == phonenumbers.Leniency.POSSIBLE and not raw.startswith(("+", "00")):
                continue
            found.append((match.start, match.end, region))
    return tuple(found)


def _offline_tld_extractor():
    import tldextract

    # No suffix-list URLs and no cache: tldextract answers from the snapshot it ships, so the
    # push never blocks on (or leaks a lookup to) the network.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


@functools.lru_cache(maxsize=4)
def _analyzer(ner_model: str | None):
    """Presidio's analyzer with this module's recognizers (one per NER choice, built on first use)."""
    import regex
    import spacy
    from presidio_analyzer import (
        AnalyzerEngine,
        EntityRecognizer,
        Pattern,
        PatternRecognizer,
        RecognizerRegistry,
        RecognizerResult,
    )
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    tld = _offline_tld_extractor()

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return tld(pattern_text).fqdn != ""

    class CardRecognizer(CreditCardRecognizer):
        """Presidio's Luhn-checked cards, any issuer prefix, grouped by spaces, dashes or dots."""

        PATTERNS = [Pattern("card, grouped or not",
                            r"(?<![\d.,\-])\d{4}(?:[ .\-]?\d{3,4}){2}[ .\-]?\d{1,7}(?![\d]|[.,\-]\d)", 0.3)]

        def __init__(self):
            super().__init__(patterns=self.PATTERNS, replacement_pairs=[("-", ""), (" ", ""), (".", "")])

        def validate_result(self, pattern_text: str) -> bool:
            digits = re.sub(r"\D", "", pattern_text)
            return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and super().validate_result(pattern_text)

    class PhoneNumberRecognizer(PhoneRecognizer):
        """Presidio's phone numbers (``phonenumbers``): valid in one of ``PHONE_REGIONS``, or written
        internationally (+CC / 00CC) with a possible length, since reserved ranges such as the UK's
        07700 900xxx are invalid but still somebody's test number; 7+ digits, so "13.4050" is no phone."""

        def analyze(self, text, entities, nlp_artifacts=None):
            results = []
            # The matcher parses every digit group it meets, once per region; only runs of 7+ digits
            # can be a number here, so it reads just those (with a little context for its boundary checks).
            for run in _DIGIT_RUN.finditer(text):
                if sum(c.isdigit() for c in run.group()) < 7:
                    continue
                lo, hi = max(0, run.start() - 3), min(len(text), run.end() + 3)
                for start, end, region in _phone_numbers_in(text[lo:hi], self.supported_regions):
                    results.append(RecognizerResult(
                        entity_type=self.supported_entities[0], start=start + lo, end=end + lo, score=self.SCORE,
                        analysis_explanation=self._get_analysis_explanation(region),
                        recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                              RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
            return EntityRecognizer.remove_duplicates(results)

    class Base64SecretRecognizer(PatternRecognizer):
        def validate_result(self, pattern_text: str):
            body = pattern_text.rstrip("=")
            mixed = re.search(r"[A-Z]", body) and re.search(r"[a-z]", body) and re.search(r"\d", body)
            return bool(mixed) and body.count("/") <= 3  # a long path is not a key

    case_sensitive = regex.DOTALL | regex.MULTILINE
    recognizers = [
        PatternRecognizer(supported_entity="SECRET", name="SecretRecognizer", global_regex_flags=case_sensitive,
                          patterns=[Pattern(name, p, 0.9) for name, p in SECRET_PATTERNS]),
        Base64SecretRecognizer(supported_entity="SECRET", name="Base64SecretRecognizer", global_regex_flags=case_sensitive,
                               patterns=[Pattern("base64 key", _BASE64, 0.5)]),
        OfflineEmailRecognizer(),
        CardRecognizer(),
        IbanRecognizer(),
        CryptoRecognizer(),
        IpRecognizer(),
        PhoneNumberRecognizer(supported_regions=PHONE_REGIONS),
    ]
    nlp = spacy.load(ner_model, exclude=["parser", "lemmatizer", "textcat"]) if ner_model else spacy.blank("en")

    class PipelineEngine(SpacyNlpEngine):
        """Presidio's spaCy engine on a pipeline made here (blank = tokenizer only, nothing to download)."""

        def load(self) -> None:
            self.nlp = {"en": nlp}

    engine = PipelineEngine(models=[{"lang_code": "en", "model_name": ner_model or "blank:en"}])
    engine.load()
    registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
    if ner_model:
        registry.add_nlp_recognizer(nlp_engine=engine)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])


@functools.lru_cache(maxsize=1)
def _anonymizer():
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


def installed_ner_model() -> str | None:
    """The first spaCy pipeline of ``NER_MODELS`` that is installed here, or None."""
    import spacy

    return next((m for m in NER_MODELS if spacy.util.is_package(m)), None)


@dataclass
class ScrubResult:
    """Scrubbed text plus how many replacements of each kind were made."""

    text: str
    counts: Counter = field(default_factory=Counter)


class Scrubber:
    """Replaces personal data and secrets; one instance is reused for a whole push.

    ``ner_model``: ``"auto"`` uses the first installed pipeline of ``NER_MODELS`` for the ``name``
    kind (none installed: no name detection), ``None`` never loads one, any other value is a spaCy
    pipeline name or path.
    """

    def __init__(self, kinds: Iterable[str] = KINDS, extra_patterns: Iterable[str] = (), enabled: bool = True,
                 ner_model: str | None = "auto"):
        kinds = list(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown scrub kind(s) {unknown}; known: {', '.join(KINDS)}")
        self.enabled = enabled
        self.kinds = [k for k in KINDS if k in kinds]
        self.extra_patterns = list(extra_patterns)
        for i, pattern in enumerate(self.extra_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"scrub extra pattern {i} ({pattern!r}) is not a valid regular expression: {exc}") from exc
        self._ner_model_choice = ner_model
        self._extra_recognizer: Any = None
        self.totals: Counter = Counter()

    @functools.cached_property
    def ner_model(self) -> str | None:
        """The spaCy pipeline used for names, or None (no name detection)."""
        if "name" not in self.kinds:
            return None
        return installed_ner_model() if self._ner_model_choice == "auto" else self._ner_model_choice

    def _extra(self):
        if self._extra_recognizer is None and self.extra_patterns:
            import regex
            from presidio_analyzer import Pattern, PatternRecognizer

            self._extra_recognizer = PatternRecognizer(
                supported_entity=ENTITIES["extra"], name="ScrubExtraPatterns",
                global_regex_flags=regex.DOTALL | regex.MULTILINE,  # the patterns mean what re means
                patterns=[Pattern(f"extra {i}", p, 1.0) for i, p in enumerate(self.extra_patterns)])
        return self._extra_recognizer

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping ``(start, end, kind)`` spans of ``text`` to replace, in order."""
        if not text or not self.enabled or not (self.kinds or self.extra_patterns):
            return []
        norm, origin = normalise(text)
        entities = [ENTITIES[k] for k in self.kinds if k != "name" or self.ner_model]
        extra = self._extra()
        if extra is not None:
            entities.append(ENTITIES["extra"])
        if not entities:
            return []
        found = _analyzer(self.ner_model).analyze(
            text=norm, language="en", entities=entities, score_threshold=_MIN_SCORE,
            ad_hoc_recognizers=[extra] if extra is not None else None)
        candidates = sorted(
            ((origin[r.start], origin[r.end - 1] + 1, _KIND_OF[r.entity_type]) for r in found if r.end > r.start),
            key=lambda s: (_RANK[s[2]], -(s[1] - s[0]), s[0]))
        chosen: list[tuple[int, int, str]] = []
        for span in candidates:
            if all(span[1] <= c[0] or span[0] >= c[1] for c in chosen):
                chosen.append(span)
        return sorted(chosen)

    def scrub(self, text: str | None) -> ScrubResult:
        """Scrub one text; counts are also added to ``self.totals``."""
        counts: Counter = Counter()
        spans = self.find(text or "")
        if not spans:
            return ScrubResult(text or "", counts)
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        kinds = {kind for _, _, kind in spans}
        result = _anonymizer().anonymize(
            text=text,
            analyzer_results=[RecognizerResult(ENTITIES[k], s, e, 1.0) for s, e, k in spans],
            operators={ENTITIES[k]: OperatorConfig("replace", {"new_value": PLACEHOLDERS[k]}) for k in kinds})
        counts.update(_KIND_OF[item.entity_type] for item in result.items)
        self.totals.update(counts)
        return ScrubResult(result.text, counts)

    def text(self, text: str | None) -> str:
        """Scrub and return only the text (counts still go to ``self.totals``)."""
        return self.scrub(text).text

    def messages(self, messages: list[dict]) -> list[dict]:
        """Scrub the content of every chat message; roles are kept."""
        return [{**m, "content": self.text(m.get("content") or "")} for m in messages]


def scrub_text(text: str, kinds: Iterable[str] = KINDS) -> str:
    """Convenience: scrub one text with the given detectors."""
    return Scrubber(kinds).text(text)
