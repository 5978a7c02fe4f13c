"""The privacy scrub: what is replaced, what is kept, the counts, and that it never goes online."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

import annotation.scrub as scrub_module
from annotation.config import SCRUB_KINDS, AnnotationConfig
from annotation.scrub import KINDS, PLACEHOLDERS, Scrubber, luhn_valid, normalise

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("mail me at john.doe+work@example.co.uk today", "mail me at [EMAIL] today", "email"),
        ("call +44 20 7946 0958 now", "call [PHONE] now", "phone"),
        ("call (555) 123-4567 now", "call [PHONE] now", "phone"),
        ("call 555-123-4567 now", "call [PHONE] now", "phone"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok", "card"),
        ("card 5500-0000-0000-0004 ok", "card [CARD] ok", "card"),
        ("key sk-proj-abcdefghijklmnop1234 end", "key [SECRET] end", "secret"),
        ("token hf_abcdefghijklmnopqrstuvwxyz12 end", "token [SECRET] end", "secret"),
        ("aws AKIAIOSFODNN7EXAMPLE end", "aws [SECRET] end", "secret"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 end", "gh [SECRET] end", "secret"),
        ("hex 0123456789abcdef0123456789abcdef end", "hex [SECRET] end", "secret"),
        ("b64 QWxhZGRpbjpvcGVuIHNlc2FtZQ1234567890abcdXYZ end", "b64 [SECRET] end", "secret"),
        ("Authorization: Bearer abc.def-ghi_jkl1234567", "Authorization: Bearer [SECRET]", "secret"),
        # What passed the home-made scrubber (issue 11, item 13):
        ("pay to DE89 3704 0044 0532 0130 00 today", "pay to [IBAN] today", "iban"),
        ("pay to GB82WEST12345698765432 today", "pay to [IBAN] today", "iban"),
        ("ssh to 192.168.1.10 now", "ssh to [IP] now", "ip"),
        ("ssh to 2001:db8::8a2e:370:7334 now", "ssh to [IP] now", "ip"),
        ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc end", "stripe [SECRET] end", "secret"),
        ("stripe rk_live_51H8abcdefghijklmnopqrst end", "stripe [SECRET] end", "secret"),
        ("gitlab glpat-AbCdEf1234567890ghij end", "gitlab [SECRET] end", "secret"),
        ("authorization: bearer abc123def456ghi789", "authorization: bearer [SECRET]", "secret"),
        ("login with password: hunter2.", "login with password: [SECRET].", "secret"),
        ("card 4111.1111.1111.1111 ok", "card [CARD] ok", "card"),
        ("call 4155552671 now", "call [PHONE] now", "phone"),
        ("call 07700 900123 now", "call [PHONE] now", "phone"),
        ("call 0170/1234567 now", "call [PHONE] now", "phone"),
        ("call +49\u00a0170\u00a01234567 now", "call [PHONE] now", "phone"),
        ("call 202\u00a0555\u00a00143 now", "call [PHONE] now", "phone"),
        ("mail ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ now", "mail [EMAIL] now", "email"),
        ("mail jo\u200bhn@exa\u200bmple.com now", "mail [EMAIL] now", "email"),
        ("db postgres://alice:s3cret@db.example.com:5432/app", "db postgres://[SECRET]@db.example.com:5432/app", "secret"),
        ("btc 1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2 ok", "btc [CRYPTO] ok", "crypto"),
    ],
)
def test_scrub_replaces_each_kind(text, expected, kind):
    result = Scrubber().scrub(text)
    assert result.text == expected
    assert dict(result.counts) == {kind: 1}


def test_ip_addresses_are_personal_data_and_are_scrubbed():
    text = "On 2024-01-15 we met at 192.168.1.10 and fe80::1ff:fe23:4567:890a and counted 1234567 items."
    result = Scrubber().scrub(text)
    assert result.text == "On 2024-01-15 we met at [IP] and [IP] and counted 1234567 items."
    assert dict(result.counts) == {"ip": 2}


@pytest.mark.parametrize(
    "text",
    [
        "On 2024-01-15 we met and counted 1234567 items.",
        "Order 4111-1111-1111-1112 fails the Luhn check, 1234567890123 is an id.",
        "In 2023 2024 2025 we shipped v1.2.3; pi is 3.14159.",
        "a-very-long-word-without-digits-or-capitals-whatsoever-in-it",
        "The user@ sign alone is not an address, nor is @handle.",
        "The password is stored hashed; bearer authentication sends a token.",
        "Latitude 52.5200, longitude 13.4050; the ratio was 3:2 at 10:30.",
        "See https://docs.python.org/3/library/re.html and mailto links.",
        "Ｆｕｌｌ－ｗｉｄｔｈ text and zero\u200bwidth spaces are still just text.",
    ],
)
def test_scrub_keeps_ordinary_text(text):
    result = Scrubber().scrub(text)
    assert result.text == text
    assert sum(result.counts.values()) == 0


def test_output_keeps_the_original_text_outside_the_replaced_spans():
    # Detection runs on the NFKC form without zero-width characters; the output is the original text.
    text = "Ｈｉ！\u200b ｊａｎｅ＠ｅｘａｍｐｌｅ．ｏｒｇ\u200b or ca\u00adll +49\u00a0170\u00a01234567 – ｔｈａｎｋｓ"
    assert Scrubber().text(text) == "Ｈｉ！\u200b [EMAIL]\u200b or ca\u00adll [PHONE] – ｔｈａｎｋｓ"


def test_normalise_maps_every_character_back_to_the_original():
    text = "a\u200bｂ\u00a0ﬁ"
    norm, origin = normalise(text)
    assert norm == "ab fi"
    assert origin == [0, 2, 3, 4, 4, 5]


def test_overlaps_go_to_the_stronger_kind():
    # An IBAN's digit groups can pass the Luhn check, and a card's digits can look like a phone number.
    assert Scrubber().text("IBAN AT61 1904 3002 3457 3201 ok") == "IBAN [IBAN] ok"
    assert Scrubber().text("card 4111 1111 1111 1111 or call +1 415 555 2671") == "card [CARD] or call [PHONE]"
    assert Scrubber().text("connect to root:toor@10.1.2.3") == "connect to [SECRET]@[IP]"
    assert Scrubber().text("mailto:ops@example.org") == "mailto:[EMAIL]"


def test_scrub_totals_accumulate_and_messages_keep_roles():
    s = Scrubber()
    out = s.messages([
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "I am a@b.io and c@d.org, card 4111111111111111"},
    ])
    assert out == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "I am [EMAIL] and [EMAIL], card [CARD]"},
    ]
    s.text("again e@f.net")
    assert dict(s.totals) == {"email": 3, "card": 1}
    assert s.text(None) == "" and s.text("") == ""


def test_scrub_is_configurable():
    text = "mail a@b.io, call 555-123-4567, ticket ACME-12345, acme-7, host 10.0.0.1"
    only_email = Scrubber(kinds=["email"], extra_patterns=[r"ACME-\d+"])
    # Extra patterns mean what Python's re means: case-sensitive unless they say otherwise.
    assert only_email.text(text) == "mail [EMAIL], call 555-123-4567, ticket [REDACTED], acme-7, host 10.0.0.1"
    assert Scrubber(kinds=[], extra_patterns=[r"(?i)acme-\d+"]).text(text) == (
        "mail a@b.io, call 555-123-4567, ticket [REDACTED], [REDACTED], host 10.0.0.1")
    assert Scrubber(enabled=False).text(text) == text
    with pytest.raises(ValueError, match="unknown scrub kind"):
        Scrubber(kinds=["email", "ssn"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Scrubber(extra_patterns=["("])


def test_config_knows_every_scrub_kind_and_keeps_the_reviewers_placeholders():
    assert SCRUB_KINDS == KINDS
    assert AnnotationConfig().scrub_kinds == list(KINDS)
    assert AnnotationConfig(scrub_kinds=["iban", "ip", "name"]).validate() == []
    for kind, placeholder in {"secret": "[SECRET]", "email": "[EMAIL]", "card": "[CARD]", "phone": "[PHONE]",
                              "extra": "[REDACTED]"}.items():
        assert PLACEHOLDERS[kind] == placeholder


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_scrub_never_touches_the_network(monkeypatch):
    # tldextract (Presidio's e-mail check) downloads the public suffix list on first use unless told not to.
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted by the scrub")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    scrub_module._analyzer.cache_clear()  # build the analyzer, too, with the network refused
    try:
        assert Scrubber(ner_model=None).text("write to jane@example.org or bob@mail.example.co.uk") == (
            "write to [EMAIL] or [EMAIL]")
    finally:
        scrub_module._analyzer.cache_clear()
    assert attempts == []


def test_names_are_replaced_where_a_spacy_ner_pipeline_is_installed(tmp_path):
    spacy = pytest.importorskip("spacy")
    # A real spaCy pipeline whose entity ruler tags PERSON, saved and loaded like an installed model.
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Maria Schmidt"}])
    nlp.to_disk(tmp_path / "ner")
    text = "Please ask Maria Schmidt (maria@example.org) to review it."
    with_ner = Scrubber(ner_model=str(tmp_path / "ner"))
    assert with_ner.text(text) == "Please ask [NAME] ([EMAIL]) to review it."
    assert Scrubber(ner_model=None).text(text) == "Please ask Maria Schmidt ([EMAIL]) to review it."
    assert Scrubber(kinds=["email"], ner_model=str(tmp_path / "ner")).text(text) == (
        "Please ask Maria Schmidt ([EMAIL]) to review it.")
    # "auto" uses an installed en_core_web pipeline if there is one, and needs none.
    assert Scrubber().ner_model == scrub_module.installed_ner_model()


def test_labelled_pii_set_recall_and_untouched_negatives():
    spec = importlib.util.spec_from_file_location("pii_recall", REPO / "benchmarks" / "pii_recall.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.load(bench.DATA)
    assert len(rows) >= 200
    result = bench.evaluate(rows, Scrubber(ner_model=None))
    # The figures recorded in benchmarks/RESULTS.md; a change that loses recall must say so there.
    assert result["recall_without_names"] >= 0.98, result["misses"]
    assert result["precision"] >= 0.99, result["false_hits"]
    assert result["negatives_changed"] <= 1, result["false_hits"]
