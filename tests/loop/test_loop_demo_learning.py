"""The demo's scenario promotes, and the served GGUF answers reworded questions, under any id draw.

Each run is a fresh LOOP_HOME, so turn and record ids are new random ULIDs: neither what is reviewed
(the thumbs-up sample), nor the judge, nor the training mix may depend on them, so every draw trains on
the same examples (checked end to end here, through Argilla; tests/annotation/test_annotation_priority.py,
tests/annotation/test_annotation_judge_split.py and tests/trainer/test_trainer_data.py check each rule).
The cycle runs with the shipped defaults (real grid, real gate); the probes are the scenario's held-out
questions, which appear nowhere in the training data. Each draw also checks what a promoting cycle leaves
behind (every stage done, the verified v2 on top of v1, the report with its curves, what was exported) and
that the next cycle finds nothing new and says so. Three draws, ~5-15 min each on 2 cores:
benchmarks/scenarios/run.py measures learning over seeds and unseen scenarios.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from loop.config import load_config
from loop.core.registry import Registry
from loop.core.store import Store
from loop.cycle import Cycle
from loop.demo import load_samples, scripted_review

pytestmark = pytest.mark.slow

FACTS = Path(__file__).resolve().parents[2] / "loop" / "scenario" / "zephyr_facts.jsonl"
# Measured on 2026-12-01: with a 5% regression bound, draws recalled 5/16 to 15/16 (whether the epochs that
# had learned stayed under +5% was chance); the base answers 0/16. The floor catches a loop that stops
# learning; reaching 70% in every run is still open work (benchmarks/RESULTS.md, "Learning").
MIN_PASS = 6 / 16
# What each draw trained on (the examples' text, ids left out), to compare draws.
TRAINED_ON: dict[int, str] = {}


def _content(train_path: str) -> str:
    from trainer.data import content_key, load_examples

    keys = sorted(content_key(example) for example in load_examples(Path(train_path)))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _recall(gguf: Path) -> float:
    from app.probe_runner import greedy_answer
    from loop.core.gguf_model import GgufModel

    facts = [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]
    model = GgufModel.load(gguf, n_ctx=1024)
    try:
        hits = [any(k in greedy_answer(model, [{"role": "user", "content": q}], max_tokens=48).answer.lower()
                    for k in fact["keywords"])
                for fact in facts for q in fact["heldout_questions"]]
    finally:
        model.close()
    return sum(hits) / len(hits)


@pytest.mark.parametrize("draw", [1, 2, 3])
def test_the_demo_promotes_recalls_reworded_facts_then_finds_nothing_new_under_any_id_draw(
        draw, argilla_stack, monkeypatch, base_hf_dir):
    monkeypatch.setenv("ARGILLA_API_URL", argilla_stack.api_url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_stack.api_key)
    monkeypatch.setenv("LOOP_ANNOTATION__DATASET", f"demo-draw-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("LOOP_MODEL__HF_BASE", str(base_hf_dir))
    config = load_config()
    store = Store.open()
    load_samples(store)
    from annotation.push import push

    push(config, store=store, progress=False)
    scripted_review(config, store, argilla_stack)

    summary = Cycle(config, progress=False).run()
    assert summary["outcome"] == "promoted", summary
    decided = summary["stages"]["decide"]["result"]
    assert decided["judge"]["held_out_examples"] == 8  # one reworded question per fact, whatever the ids
    TRAINED_ON[draw] = _content(decided["train_path"])
    assert len(set(TRAINED_ON.values())) == 1, "another id draw trained on other examples"
    _assert_what_a_promoting_cycle_leaves(summary)
    current = Registry().current()
    assert _recall(current.gguf_path) >= MIN_PASS

    again = Cycle(config, progress=False).run()
    assert again["outcome"] == "nothing_new", again
    assert "decide" in again["stages"] and again["stages"]["decide"]["status"] == "stopped"
    assert "train" not in again["stages"]
    assert again["reason"]  # it says why
    assert Registry().current_id() == "v2"
    assert [h["to"] for h in Registry().history() if h["action"] == "promote"] == ["v1", "v2"]


def _assert_what_a_promoting_cycle_leaves(first: dict) -> None:
    assert [s["status"] for s in first["stages"].values()] == ["done"] * 10
    assert first["stages"]["publish"]["result"]["published"]["target"] == "local"
    current = Registry().current()
    assert current.id == first["current_version"] == "v2" and current.parent == "v1"
    assert current.verification["passed"] is True
    assert current.metrics["heldout_loss"] < current.metrics["current_at_gate"]["heldout_loss"]
    # The judged variant was trained again with its held-out examples; what was exported is that refit when
    # it was used, else (with the stated reason) the judged variant's own adapter.
    train = first["stages"]["train"]["result"]
    refit = train["refit"]
    assert refit["status"] in ("used", "refused"), refit
    card = Path(first["stages"]["export"]["result"]["export"]["card_path"]).read_text()  # it names the merged adapter
    if refit["status"] == "used":
        assert f"| adapter | {refit['adapter_dir']} |" in card and refit["examples"] > 0
        assert "## Refit with the held-out wordings" in card
    else:
        judged = next(v["adapter_dir"] for v in train["variants"] if v["name"] == train["best"])
        assert refit["reason"] and f"| adapter | {judged} |" in card
    report = Path(first["report"])
    assert report.is_file() and "promoted" in report.read_text()
    assert "![loss curves]" in report.read_text() and report.with_suffix(".variants.png").is_file()
    data = json.loads(report.with_suffix(".json").read_text())
    assert set(data["timings"]["stages_s"]) == {"canary", "push", "pull", "decide", "train", "export", "gate", "promote",
                                                "publish", "report"}
