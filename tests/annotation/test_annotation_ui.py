"""A real browser signs into the local Argilla UI and sees a dataset.

Playwright (from PyPI) drives Debian's Chromium (/usr/bin/chromium, or $CHROMIUM_PATH); no browser is downloaded.
Screenshots go to test-artifacts/ in the repository root.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real browser against the real server (see the `slow` marker in pyproject.toml)

from skips import import_or_skip  # noqa: E402

rg = import_or_skip("argilla")
sync_api = import_or_skip("playwright.sync_api")

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(f"Chromium not found at {path}: install Debian's chromium package (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)  # the UI's first load compiles a large JS bundle on a busy 2-core machine
    try:
        yield page
    finally:
        context.close()


def login(page, url: str, username: str, password: str) -> None:
    """Sign into the Argilla UI at `url` as username/password and wait until the sign-in page is left."""
    page.goto(f"{url.rstrip('/')}/sign-in", wait_until="domcontentloaded")
    page.locator("input[name='Username']").fill(username)
    page.locator("input[name='Password']").fill(password)
    page.locator("button[type='submit']").click()  # enabled once both fields hold text
    page.wait_for_url(lambda u: "/sign-in" not in u)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_owner_signs_in_and_sees_the_dataset(argilla_stack, page):
    client = rg.Argilla(api_url=argilla_stack.api_url, api_key=argilla_stack.api_key)
    name = f"ui-check-{uuid.uuid4().hex[:6]}"
    settings = rg.Settings(fields=[rg.TextField(name="text")],
                           questions=[rg.RatingQuestion(name="quality", values=[1, 2, 3, 4, 5])])
    dataset = rg.Dataset(name=name, workspace=argilla_stack.workspace, settings=settings, client=client).create()
    dataset.records.log([{"text": "a record the reviewer will see"}])
    try:
        login(page, argilla_stack.api_url, argilla_stack.owner_username, argilla_stack.owner_password)
        listed = page.get_by_text(name, exact=True)
        listed.first.wait_for(state="visible")
        shot = screenshot(page, "argilla-ui-datasets")
        assert shot.stat().st_size > 10_000

        listed.first.click()  # open the annotation view: the record's text must be rendered
        page.get_by_text("a record the reviewer will see").first.wait_for(state="visible")
        screenshot(page, "argilla-ui-record")
    finally:
        dataset.delete()


def test_wrong_password_is_refused(argilla_stack, page):
    page.goto(f"{argilla_stack.api_url}/sign-in", wait_until="domcontentloaded")
    page.locator("input[name='Username']").fill(argilla_stack.owner_username)
    page.locator("input[name='Password']").fill("definitely-not-the-password")
    with page.expect_response(lambda r: r.url.endswith("/api/v1/token")) as answer:
        page.locator("button[type='submit']").click()
    assert answer.value.status == 401
    page.wait_for_timeout(500)  # give a (wrong) redirect the chance to happen before checking it did not
    assert "/sign-in" in page.url
