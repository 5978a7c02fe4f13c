"""`python -m app` through its real HTTP API: internal errors stay in the log, oversized system prompts are refused.

The app runs in a subprocess on a free loopback port, exactly as a user starts it; `gradio_client` calls
its `/chat` endpoint as any program would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(loop_home, tmp_path):
    port = free_port()
    env = {**os.environ, "LOOP_HOME": str(loop_home), "LOOP_APP__MAX_TOKENS": "16", "LOOP_APP__MIRROR_DIR": "off",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"the app exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, f"the app did not come up:\n{log.read_text()[-3000:]}"
                time.sleep(0.3)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_running_app_hides_internal_errors_from_users_and_logs_them(app_url):
    from gradio_client import Client

    url, log = app_url
    client = Client(url, verbose=False)
    # A temperature that is not a number fails inside Gradio's input processing.
    with pytest.raises(Exception) as failure:
        client.predict("Hello", "Be brief.", "not-a-number", 0.9, 16, api_name="/chat")
    shown = str(failure.value)
    assert "not-a-number" not in shown and "TypeError" not in shown and "slider" not in shown
    deadline = time.time() + 10
    while "not-a-number" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert "'not-a-number'" in log.read_text()  # the operator sees it


def test_a_handler_that_fails_inside_shows_a_generic_notice_and_logs_the_traceback(engine, caplog):
    """Even where Gradio would show error text (show_error=True), the handlers' own wrapper hides it."""
    from gradio_client import Client

    from app.errors import GENERIC_ERROR
    from app.ui import build_app

    def broken_chat(**_kwargs):
        raise RuntimeError("secret detail from /internal/path")
        yield  # a generator, like the real one

    engine.chat = broken_chat  # a fault injected where nothing real fails on demand
    demo = build_app(engine)
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, show_error=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        with caplog.at_level("ERROR", logger="app"), pytest.raises(Exception) as failure:
            client.predict("Hello", "Be brief.", 0.7, 0.9, 16, api_name="/chat")
    finally:
        demo.close()
    assert GENERIC_ERROR in str(failure.value) and "secret" not in str(failure.value)
    assert any("secret detail" in (r.exc_text or "") or "secret detail" in str(r.exc_info) for r in caplog.records)


def test_a_10_mb_system_prompt_is_refused_with_a_clear_notice(app_url):
    from gradio_client import Client

    url, _ = app_url
    client = Client(url, verbose=False)
    started = time.perf_counter()
    chat, box, notice, *_ = client.predict("Hello", "x" * (10 * 2**20), 0.7, 0.9, 16, api_name="/chat")
    assert "system prompt is 10,485,760 characters; the limit is 8,000" in notice
    assert time.perf_counter() - started < 60
    # the app still answers with an ordinary system prompt
    chat, box, notice, *_ = client.predict("Hello", "Be brief.", 0.7, 0.9, 16, api_name="/chat")
    assert "⚠️" not in (notice or "") and "Hello" in str(chat)
