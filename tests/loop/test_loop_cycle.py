"""The loop end to end: real Argilla, the real small model, real training, export and promotion.

A grid of two objectives trains from one snapshot and is reported side by side. A cycle killed (SIGKILL)
mid-training is resumed by the next invocation and promotes exactly once. A cycle with the shipped defaults
that promotes and then finds nothing new: tests/loop/test_loop_demo_learning.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.config import load_config
from loop.core.registry import Registry
from loop.core.store import Store
from loop.cycle import Cycle
from loop.demo import load_samples, scripted_review

pytestmark = pytest.mark.slow

# Small and fast, but a real run of every stage: one variant, few steps, short sequences.
FAST = {
    "LOOP_TRAINER__LEARNING_RATES": "1e-3",
    "LOOP_TRAINER__LORA_RANKS": "16",
    "LOOP_TRAINER__MAX_STEPS": "12",
    "LOOP_TRAINER__SAVE_STEPS": "4",
    "LOOP_TRAINER__MAX_LENGTH": "160",
    "LOOP_TRAINER__BATCH_SIZE": "4",
    "LOOP_CYCLE__MIN_NEW_EXAMPLES": "4",
    "LOOP_ANNOTATION__EVAL_PERCENT": "25",
    # The unit under test is the loop, not the learning: accept a small regression here
    # (tests/loop/test_loop_demo_learning.py and benchmarks/scenarios/ measure learning against the real gate).
    "LOOP_GATE__REGRESSION_TOLERANCE": "0.5",
    # The shipped general replay answers, not the starting version's own (~40 s of llama.cpp per cycle):
    # tests/loop/test_loop_cycle_judge.py and the demo learning test cover the self-answered replay.
    "LOOP_TRAINER__GENERAL_REPLAY_ANSWERS": "shipped",
    # The refit of the chosen variant (~100 s here) is not what these tests are about: the demo learning test
    # runs it in every draw, tests/trainer/test_trainer_refit.py checks its rules.
    "LOOP_TRAINER__REFIT": "false",
}


@pytest.fixture
def loop_env(argilla_stack, monkeypatch, base_hf_dir):
    monkeypatch.setenv("ARGILLA_API_URL", argilla_stack.api_url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_stack.api_key)
    import uuid

    monkeypatch.setenv("LOOP_ANNOTATION__DATASET", f"cycle-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("LOOP_MODEL__HF_BASE", str(base_hf_dir))  # derived once per session
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    return argilla_stack


def _seed_and_review(stack):
    config = load_config()
    store = Store.open()
    assert load_samples(store) > 20
    from annotation.push import push

    report = push(config, store=store, progress=False)
    # Every thumbs-down/corrected turn goes; thumbs-up turns are sampled (annotation.priority).
    assert report.failed == 0 and report.tiers["negative"] == 25
    counts = scripted_review(config, store, stack)
    assert counts["accepted_correction"] >= 20
    return config


def test_a_cycle_trains_every_objective_of_its_grid_from_one_snapshot_and_reports_them_side_by_side(
        loop_env, monkeypatch):
    monkeypatch.setenv("LOOP_TRAINER__OBJECTIVES", "sft,sft+dpo")
    monkeypatch.setenv("LOOP_TRAINER__PREFERENCE_LEARNING_RATE", "2e-5")
    config = _seed_and_review(loop_env)

    summary = Cycle(config, progress=False).run()
    assert summary["outcome"] == "promoted", summary
    train = summary["stages"]["train"]["result"]
    by_objective = {v["objective"]: v for v in train["variants"]}
    assert list(by_objective) == ["sft", "sft+dpo"]
    for v in by_objective.values():  # both judged on the same held-out and regression sets, from the same start
        assert v["status"] == "ok", v
        assert v["eval_loss_start"] == by_objective["sft"]["eval_loss_start"]
        assert v["regression_loss_start"] == by_objective["sft"]["regression_loss_start"]
    dpo = by_objective["sft+dpo"]
    assert dpo["preference"]["pairs"] > 0 and dpo["metrics"]["stages"]["sft"]["status"] == "ok"
    assert dpo["metrics"]["stages"]["sft"]["reused"] == by_objective["sft"]["run_dir"]  # one SFT run, not two
    assert train["best"] in {v["name"] for v in train["variants"]}
    report = Path(summary["report"]).read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| lr0.001_r16 |", "| lr0.001_r16_sft+dpo |"))]
    assert [row.split(" | ")[1] for row in rows] == ["sft", "sft+dpo"]
    assert "## Gate" in report


def test_killed_mid_training_resumes_and_promotes_once(loop_env):
    _seed_and_review(loop_env)
    home = Path(os.environ["LOOP_HOME"])
    env = {**os.environ, "LOOP_TRAINER__MAX_STEPS": "16"}
    proc = subprocess.Popen([sys.executable, "-m", "loop.cycle", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = sorted(home.glob("cycles/*/variants/*/checkpoint-*/trainer_state.json"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.5)
    assert checkpoint is not None, \
        f"no checkpoint appeared (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    cycle_dirs = list(home.glob("cycles/*"))
    assert len(cycle_dirs) == 1
    state = json.loads((cycle_dirs[0] / "state.json").read_text())
    assert state["outcome"] is None and state["stages"]["train"]["status"] == "running"

    out = subprocess.run([sys.executable, "-m", "loop.cycle", "--json"], env=env, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["cycle"] == cycle_dirs[0].name  # the same cycle, resumed
    assert summary["outcome"] == "promoted"
    assert "resuming unfinished cycle" in out.stderr
    # The trainer resumed from the checkpoint rather than starting over.
    metrics = json.loads(next(home.glob("cycles/*/variants/*/metrics.json")).read_text())
    assert (metrics.get("resumed_from") or "").startswith("checkpoint-"), metrics.get("resumed_from")
    registry = Registry()
    promotions = [h for h in registry.history() if h["action"] == "promote"]
    assert [h["to"] for h in promotions] == ["v1", "v2"]
    assert [v.id for v in registry.list()] == ["v1", "v2"]
