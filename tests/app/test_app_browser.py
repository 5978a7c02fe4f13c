"""The real thing: `python -m app` in a subprocess, driven by Chromium through Playwright.

Send a message, watch the answer stream in, give thumbs-down with two reasons, a comment and a
correction, reload, and find exactly that in `python -m loop.store export`. Then promote a new
version while the app runs (the next answer comes from it, no restart), stop that answer with the
Stop button, and stop the app with SIGTERM, as a Space restart does: it exits cleanly, and the app
started again on a wiped home (the same mirror directory) restores every turn and feedback event,
exported exactly as before.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Debian's Chromium (scripts/setup.sh installs it); Playwright never downloads a browser here.
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the app did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def running_app(loop_home, tmp_path):
    port = free_port()
    env = {**os.environ, "LOOP_HOME": str(loop_home), "LOOP_APP__MAX_TOKENS": "160", "LOOP_APP__TEMPERATURE": "0.3",
           "LOOP_APP__MIRROR_DIR": str(tmp_path / "mirror"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "app.log"
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    def stop() -> int:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM, as a Space restart sends
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, proc, log)
        yield {"url": url, "env": env, "started": started, "log": log, "stop": stop, "mirror": tmp_path / "mirror"}
    finally:
        stop()


def alnum(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


def export(env: dict) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "loop.store", "export"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_chat_stream_feedback_reload_export(running_app, artifacts_dir, registry, register_copy, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (scripts/setup.sh does)"

    url, env = running_app["url"], running_app["env"]
    comment = "Wrong: two plus two is four."
    correction = "2 + 2 = 4."
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.set_default_timeout(90_000)
            page.goto(url)
            box = page.locator("#message textarea")
            box.wait_for()
            expect(page.locator("#model-header")).to_contain_text("Serving model v1")

            # An empty message: a notice, and nothing reaches the model or the log.
            page.click("#send")
            expect(page.locator("#notice")).to_contain_text("empty message")

            # A real message; the answer streams in (seen part-written), then carries its version.
            box.fill("What is 2+2? Answer briefly.")
            box.press("Enter")
            partial_seen = set()
            deadline = time.time() + 120
            while time.time() < deadline:
                text = page.locator("#chatbot").inner_text()
                if "writing" in text:
                    partial_seen.add(text)
                elif "model v1" in text:
                    break
                time.sleep(0.03)
            first_answer_s = time.time() - running_app["started"]
            final_text = page.locator("#chatbot").inner_text()
            assert "model v1" in final_text and "writing" not in final_text
            assert partial_seen, "never saw the answer part-written: it did not stream"
            page.screenshot(path=str(artifacts_dir / "app-1-answer.png"), full_page=True)

            # Thumbs-down with two reasons, a comment and a corrected answer.
            page.locator("#chatbot button[aria-label='Dislike']").last.click()
            panel = page.locator("#feedback-panel")
            expect(panel).to_be_visible()
            expect(page.locator("#notice")).to_contain_text("Saved thumbs-down")
            panel.get_by_label("not factually correct").check()
            panel.get_by_label("incomplete").check()
            page.fill("#fb-comment textarea", comment)
            suggested = page.locator("#fb-correction textarea")
            assert suggested.input_value().strip(), "the better-answer box should start as a copy of the answer"
            suggested.fill(correction)
            page.screenshot(path=str(artifacts_dir / "app-2-feedback.png"), full_page=True)
            page.click("#fb-send")
            expect(panel).to_be_hidden()
            expect(page.locator("#notice")).to_contain_text("saved")

            # Reload: the conversation comes back, with the thumbs-down still shown.
            page.reload()
            expect(page.locator("#chatbot")).to_contain_text("What is 2+2?")
            expect(page.locator("#chatbot button[aria-label='Disliked']")).to_have_count(1)
            page.screenshot(path=str(artifacts_dir / "app-3-after-reload.png"), full_page=True)

            records = export(env)
            assert len(records) == 1, records  # one turn: the empty message never made one
            turn = records[0]
            assert turn["messages"][-1] == {"role": "user", "content": "What is 2+2? Answer briefly."}
            assert turn["model_version"] == "v1" and turn["answer"]
            assert alnum(turn["answer"]) in alnum(final_text)  # the logged answer is the one shown
            fb = turn["feedback"]
            assert (fb["thumbs"], fb["reasons"], fb["comment"], fb["correction"]) == (
                "down", ["not_factually_correct", "incomplete"], comment, correction)
            assert [e["thumbs"] for e in turn["feedback_events"]] == ["down", "down"]  # the click, then the details

            # Hot-swap with no restart: promote v2, and the next answer says v2. Then Stop it.
            v2 = register_copy()
            registry.promote(v2, reason="browser test: hot-swap")
            box.fill("Write a long story about a dragon who learns to bake bread.")
            box.press("Enter")
            expect(page.locator("#chatbot")).to_contain_text(f"model {v2} · writing")
            page.click("#stop")
            expect(page.locator("#chatbot")).to_contain_text(f"model {v2} · stopped")
            expect(page.locator("#model-header")).to_contain_text(f"Serving model {v2}")
            page.screenshot(path=str(artifacts_dir / "app-4-hot-swap-stopped.png"), full_page=True)

            # New conversation while an answer is being written: the page shows the new, empty
            # chat and the running answer never comes back onto it.
            box.fill("Tell me everything you know about volcanoes.")
            box.press("Enter")
            expect(page.locator("#chatbot")).to_contain_text("writing")
            page.click("#new-conversation")
            expect(page.locator("#chatbot")).not_to_contain_text("volcanoes")
            page.wait_for_timeout(2500)
            expect(page.locator("#chatbot")).not_to_contain_text("volcanoes")
        finally:
            browser.close()

    records = export(env)
    assert len(records) == 3
    assert records[2]["conversation_id"] == records[1]["conversation_id"]  # logged where it was asked
    swapped = records[1]
    assert swapped["model_version"] == v2 and swapped["sampling"]["finish_reason"] == "stopped"
    assert swapped["gguf_sha256"] == registry.get(v2).gguf_sha256
    assert swapped["completion_tokens"] < 160
    assert swapped["conversation_id"] == records[0]["conversation_id"], records
    assert swapped["messages"][-3:-1] == records[0]["messages"][-1:] + [{"role": "assistant", "content": records[0]["answer"]}]

    # SIGTERM, then a restart on an empty home: everything comes back from the mirror.
    assert running_app["stop"]() == 0, running_app["log"].read_text()[-3000:]
    wiped = tmp_path / "wiped-home"
    wiped.mkdir()
    restarted_env = {**env, "LOOP_HOME": str(wiped)}
    port = free_port()
    log = tmp_path / "app-restarted.log"
    with open(log, "w") as out:
        restarted = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=REPO,
                                     env=restarted_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", restarted, log)  # the app restores before it serves
        assert export(restarted_env) == records
    finally:
        restarted.terminate()
        try:
            restarted.wait(timeout=30)
        except subprocess.TimeoutExpired:
            restarted.kill()
            restarted.wait()
    (artifacts_dir / "app-browser-timing.json").write_text(json.dumps(
        {"start_to_first_answer_s": round(first_answer_s, 2), "note": "includes Chromium start and page load"}))
