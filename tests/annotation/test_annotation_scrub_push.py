"""What reaches the real Argilla: PII in every text a user can write (prompt, comment, correction) is scrubbed."""

from __future__ import annotations

import json
import uuid

import pytest

from annotation.client import connect
from annotation.config import AnnotationConfig
from annotation.push import push
from annotation.schema import find_dataset
from loop.core.store import Store

# One of each kind the scrub knows (names need a spaCy NER model and are not part of this test).
PII = {
    "email": "jane.roe@example.org",
    "phone": "+44 7700 900123",
    "card": "4111.1111.1111.1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ip": "203.0.113.42",
    "secret": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "crypto": "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2",
}
DISGUISED_EMAIL = "ｊｏｈｎ＠ｅｘａｍｐｌｅ．ｃｏｍ"  # full-width


@pytest.fixture
def owner(argilla_stack):
    return connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)


def _all_records(client, cfg) -> list[dict]:
    ds = find_dataset(client, cfg)
    resp = client.api.http_client.get(f"/api/v1/datasets/{ds.id}/records",
                                      params={"limit": 1000, "include": ["responses", "suggestions"]})
    resp.raise_for_status()
    return resp.json()["items"]


def test_pii_in_the_feedback_comment_and_correction_never_reaches_argilla(owner):
    cfg = AnnotationConfig(dataset=f"scrub-{uuid.uuid4().hex[:10]}")
    store = Store.open()
    cid = store.new_conversation()
    turn = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": "How do I pay my bill?"}],
                          answer="Use the payment page.", model_version="v1")
    comment = f"Wrong. Mail {PII['email']} or {DISGUISED_EMAIL}, call {PII['phone']}."
    correction = (f"Pay with card {PII['card']} or transfer to {PII['iban']}; the server is {PII['ip']}, "
                  f"the key is {PII['secret']}, tips to {PII['crypto']}, login password: hunter2.")
    store.add_feedback(turn, thumbs="down", reasons=["incomplete"], comment=comment, correction=correction)

    report = push(cfg, store, owner, progress=False)
    assert report.sent == 1 and report.failed == 0

    records = _all_records(owner, cfg)
    assert len(records) == 1
    raw = json.dumps(records, ensure_ascii=False)
    for kind, value in {**PII, "disguised email": DISGUISED_EMAIL, "password": "hunter2"}.items():
        assert value not in raw, f"{kind} {value!r} reached Argilla"
    feedback = records[0]["fields"]["user_feedback"]
    assert "**Comment:** Wrong. Mail [EMAIL] or [EMAIL], call [PHONE]." in feedback
    assert ("Pay with card [CARD] or transfer to [IBAN]; the server is [IP], the key is [SECRET], "
            "tips to [CRYPTO], login password: [SECRET].") in feedback
    assert report.scrubbed == {"email": 2, "phone": 1, "card": 1, "iban": 1, "ip": 1, "secret": 2, "crypto": 1}
