"""A real browser signs into Argilla as the reviewer and sees the pushed turns in priority order."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest

from annotation.client import connect
from annotation.config import AnnotationConfig
from annotation.push import push
from loop.core.store import Store

QUESTION = re.compile(r"^(disliked|unsure|newer|older) question$")


def _chromium() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(f"Chromium not found at {path}: install Debian's chromium package (apt-get install chromium)")
    return path


def _sign_in(page, url: str, username: str, password: str) -> None:
    page.goto(f"{url}/sign-in", wait_until="networkidle")
    page.locator("input").first.fill(username)
    page.locator("input[type=password]").fill(password)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/$"), timeout=60_000)  # the home page lists the datasets


@pytest.mark.slow
def test_reviewer_sees_the_queue_sorted_by_priority(argilla_stack, artifacts_dir):
    from skips import import_or_skip

    sync_api = import_or_skip("playwright.sync_api")
    owner = connect(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    cfg = AnnotationConfig(dataset=f"ui-{uuid.uuid4().hex[:8]}")
    store = Store.open()
    cid = store.new_conversation()
    turns = {}
    # pushed in an order unlike the priority order, so insertion order cannot pass for priority order
    for name, lp, created in [("older", -0.2, "2025-01-01"), ("newer", -0.1, "2025-02-01"),
                              ("unsure", -3.0, "2025-01-15"), ("disliked", -0.1, "2025-01-02")]:
        turns[name] = store.log_turn(conversation_id=cid, messages=[{"role": "user", "content": f"{name} question"}],
                                     answer=f"answer to the {name} question", model_version="v1", logprob_mean=lp,
                                     created_at=f"{created}T00:00:00+00:00")
    store.add_feedback(turns["disliked"], thumbs="down", reasons=["incomplete"])
    report = push(cfg, store, owner, progress=False)
    assert report.sent == 4 and report.review_url.endswith("sort=metadata.priority.desc")
    expected = ["disliked question", "unsure question", "newer question", "older question"]

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})  # tall: all four records in the shot
            page.set_default_timeout(60_000)  # the UI's first load is slow on a busy 2-core machine
            _sign_in(page, argilla_stack.api_url, argilla_stack.reviewer_username, argilla_stack.reviewer_password)
            page.goto(report.review_url, wait_until="networkidle")
            # focus view: the first record offered is the highest priority one
            sync_api.expect(page.get_by_text(QUESTION)).to_have_text([expected[0]], timeout=60_000)
            page.get_by_label("Switch to Bulk Mode").click()
            questions = page.get_by_text(QUESTION)
            sync_api.expect(questions).to_have_count(4, timeout=60_000)
            page.screenshot(path=str(artifacts_dir / "annotation-priority-queue.png"), full_page=True)
            assert questions.all_inner_texts() == expected
            assert page.get_by_text("Thumbs down").count() == 1
        finally:
            browser.close()
