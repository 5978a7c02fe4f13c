"""The cycle's judge rules: stated stops for data too small to judge, no variant chosen by its grid position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from annotation.snapshot import write_snapshot
from loop.config import load_config
from loop.cycle_pipeline import CycleContext
from loop.cycle_stages import stage_decide
from loop.cycle_stages_build import stage_train
from loop.cycle_state import CycleState, StopCycle

REPO = Path(__file__).resolve().parents[2]


def _ex(i, q, a):
    return {"id": f"turn-{i:03d}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _demo_examples():
    rows = [json.loads(line) for line in (REPO / "loop/scenario/sample_conversations.jsonl").read_text().splitlines()]
    out = []
    for i, row in enumerate(rows):
        fb = row.get("feedback") or {}
        answer = fb.get("correction") or (row["answer"] if fb.get("thumbs") == "up" else None)
        if answer:
            out.append({"id": f"turn-{i:03d}", "messages": row["messages"] + [{"role": "assistant", "content": answer}]})
    return out


def _decide(examples, counts=None):
    config = load_config()
    snap = write_snapshot(examples, counts or {}, eval_percent=config.annotation.eval_percent,
                          min_held_out=config.annotation.min_held_out)
    ctx = CycleContext.create(config, progress=False)
    state = CycleState.new(config.home / "cycles", False)
    state.data["stages"]["pull"] = {"status": "done", "result": {
        "path": str(snap.path), "hash": snap.hash, "counts": snap.counts, "judge": snap.manifest.get("judge"),
        "train_path": str(snap.train_path), "eval_path": str(snap.eval_path)}}
    def decide(force=False):
        ctx.force = force
        return stage_decide(ctx, state)

    return ctx, state, decide


@pytest.mark.parametrize("force", [False, True])
def test_a_snapshot_with_every_record_discarded_stops_with_no_examples(force):
    _, _, decide = _decide([], {"records": 12, "discarded": 12})
    with pytest.raises(StopCycle) as stop:
        decide(force)
    assert stop.value.outcome == "no_examples" and "12 discarded" in stop.value.reason


@pytest.mark.parametrize("examples", [
    [_ex(i, "What is the refund window?", "Thirty days.") for i in range(20)],  # all identical
    [_ex(0, "What is the refund window?", "Thirty days.")],  # a single example
], ids=["all-identical", "single"])
def test_data_too_small_to_judge_stops_before_training_even_when_forced(examples):
    _, _, decide = _decide(examples)
    with pytest.raises(StopCycle) as stop:
        decide(True)
    assert stop.value.outcome == "too_small_to_judge"
    assert "0 held-out example(s)" in stop.value.reason and "annotation.min_held_out" in stop.value.reason


def test_the_demo_data_is_judged_on_a_held_out_wording_of_every_fact():
    _, state, decide = _decide(_demo_examples())
    result = decide()
    assert result.judge["held_out_examples"] == 8 and result.judge["paraphrase_wordings"] == 8
    assert result.curated_eval == 8 and Path(result.train_path).is_file()


def _variant(name, eval_loss, regression, regression_start=1.0):
    from trainer.config import TrainConfig
    from trainer.variants import VariantResult

    metrics = {"status": "ok", "eval_loss": eval_loss, "regression_loss": regression,
               "regression_loss_start": regression_start, "eval_loss_start": 2.0}
    return VariantResult.from_metrics(name, TrainConfig(), Path("/nonexistent") / name, metrics)


def test_no_variant_is_chosen_by_its_place_in_the_grid(monkeypatch):
    monkeypatch.setenv("LOOP_GATE__REGRESSION_TOLERANCE", "0.05")  # the rule under test, whatever the default
    ctx, state, decide = _decide(_demo_examples())
    state.data["stages"]["decide"] = {"status": "done", "result": decide().to_dict()}
    import trainer.variants

    # Every variant forgot more than the gate allows: no candidate, and the reason names each one.
    monkeypatch.setattr(trainer.variants, "run_variants", lambda *a, **k: [
        _variant("first", 0.5, 1.2), _variant("second", None, 1.0)])
    monkeypatch.setattr("loop.cycle_stages_build._current_hf_dir", lambda ctx, vid=None: (Path("/nonexistent"), None))
    with pytest.raises(StopCycle) as stop:
        stage_train(ctx, state)
    assert stop.value.outcome == "no_candidate"
    assert "first: held-out 0.5000, regression +20.0%" in stop.value.reason
    assert "second: no held-out loss" in stop.value.reason

    # Otherwise the lowest held-out loss among those within the tolerance wins, wherever it stands.
    monkeypatch.setattr(trainer.variants, "run_variants", lambda *a, **k: [
        _variant("first", 0.9, 1.0), _variant("forgetful", 0.1, 1.5), _variant("last", 0.4, 1.01)])
    assert stage_train(ctx, state).best == "last"


def _general(answer="SHIPPED ANSWER"):
    return [{"id": "general-01", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                              {"role": "assistant", "content": answer}]}]


def test_without_a_servable_starting_version_the_shipped_replay_answers_stay():
    from types import SimpleNamespace

    from loop.cycle_stages import _answered_by

    out, note = _answered_by(None, _general())
    assert out == _general() and note.startswith("shipped")
    out, _ = _answered_by(SimpleNamespace(id="v9", gguf_path=Path("/nonexistent.gguf")), _general())
    assert out == _general()


@pytest.mark.slow
def test_general_replay_is_answered_by_the_starting_version_itself(bundled_gguf):
    from types import SimpleNamespace

    from app.probe_runner import greedy_answer
    from loop.core.gguf_model import GgufModel
    from loop.cycle_stages import _answered_by

    out, note = _answered_by(SimpleNamespace(id="v1", gguf_path=Path(bundled_gguf)), _general())
    model = GgufModel.load(bundled_gguf, n_ctx=1024)
    try:
        own = greedy_answer(model, _general()[0]["messages"][:1], max_tokens=96).answer
    finally:
        model.close()
    assert out[0]["messages"][-1] == {"role": "assistant", "content": own.strip()}
    assert out[0]["messages"][:-1] == _general()[0]["messages"][:-1] and note == "self (v1, 1 of 1 answered)"
