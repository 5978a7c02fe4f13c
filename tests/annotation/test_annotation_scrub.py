"""The privacy scrub: what is replaced, what is kept, and the counts."""

from __future__ import annotations

import pytest

from annotation.scrub import KINDS, Scrubber, luhn_valid


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
    ],
)
def test_scrub_replaces_each_kind(text, expected, kind):
    result = Scrubber().scrub(text)
    assert result.text == expected
    assert dict(result.counts) == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "On 2024-01-15 we met at 192.168.1.10 and counted 1234567 items.",
        "Order 4111-1111-1111-1112 fails the Luhn check, 1234567890123 is an id.",
        "In 2023 2024 2025 we shipped v1.2.3; pi is 3.14159.",
        "a-very-long-word-without-digits-or-capitals-whatsoever-in-it",
        "The user@ sign alone is not an address, nor is @handle.",
    ],
)
def test_scrub_keeps_ordinary_text(text):
    result = Scrubber().scrub(text)
    assert result.text == text
    assert sum(result.counts.values()) == 0


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


def test_scrub_is_configurable():
    text = "mail a@b.io, call 555-123-4567, ticket ACME-12345"
    only_email = Scrubber(kinds=["email"], extra_patterns=[r"ACME-\d+"])
    assert only_email.text(text) == "mail [EMAIL], call 555-123-4567, ticket [REDACTED]"
    assert Scrubber(enabled=False).text(text) == text
    with pytest.raises(ValueError, match="unknown scrub kind"):
        Scrubber(kinds=["email", "ssn"])


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert set(KINDS) == {"secret", "email", "card", "phone"}
