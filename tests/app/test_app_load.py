"""A short run of benchmarks/load_test.py: users chat and give feedback through the running app's API,
the app is killed with SIGKILL mid-load and restarted, and every acknowledged event is in the export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.load_test import run  # noqa: E402


@pytest.mark.slow
def test_every_acknowledged_feedback_event_survives_a_sigkill_under_load():
    result = run(users=10, duration=15, max_requests=2000, max_tokens=8)
    assert result["acknowledged_feedback"] >= 10 and result["acknowledged_turns"] >= 5
    assert result["lost"] == 0, result["lost_ids"]
    assert result["requests"] <= 2000
