"""Early stopping on the judge: every epoch is scored, and the adapter of the best eligible epoch is kept."""

from __future__ import annotations

import json

import pytest
from test_trainer_train import FACTS, facts, small_config

from trainer.best_epoch import eligible
from trainer.data import write_examples


def test_an_epoch_that_forgot_beyond_the_tolerance_is_never_eligible():
    assert eligible({"eval_loss": 0.5, "regression_loss": 1.04}, 1.0, 0.05)
    assert not eligible({"eval_loss": 0.1, "regression_loss": 1.06}, 1.0, 0.05)
    assert not eligible({"eval_loss": float("nan"), "regression_loss": 1.0}, 1.0, 0.05)
    assert not eligible({"eval_loss": None, "regression_loss": 1.0}, 1.0, 0.05)
    assert eligible({"eval_loss": 0.3, "regression_loss": None}, None, 0.05)  # no regression set: held-out decides


@pytest.mark.slow
def test_the_best_epoch_is_kept_when_later_epochs_judge_worse(base_hf_dir, tmp_path):
    from trainer.evaluate import eval_loss
    from trainer.train import train

    data = tmp_path / "facts.jsonl"
    write_examples(data, facts())
    # The judge asks the same questions but wants another answer, so every further pass over the
    # training facts makes the held-out answers less likely: an early epoch must win.
    held_out = [{"id": f"judge-{i}", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": q},
                                                  {"role": "assistant", "content": "I do not know."}]}
                for i, (q, _) in enumerate(FACTS)]
    run = tmp_path / "run"
    config = small_config(tmp_path, max_steps=-1, epochs=3, batch_size=4, save_steps=100, regression_tolerance=10.0)
    metrics = train(data, run, base=base_hf_dir, eval_data=held_out, config=config)

    assert metrics["status"] == "ok", metrics["reason"]
    scores = metrics["epoch_scores"]
    assert [round(r["epoch"]) for r in scores] == [1, 2, 3] and [r["step"] for r in scores] == [2, 4, 6]
    best = min(scores, key=lambda r: r["eval_loss"])
    assert best["step"] < 6 and metrics["best_epoch"]["step"] == best["step"]
    # What was saved is the best epoch's adapter, not the last epoch's.
    assert metrics["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    assert metrics["general_kept"] == best["general_kept"]  # the judged epoch's general answers, reported as judged
    assert eval_loss(run / "adapter", held_out, max_length=64) == pytest.approx(best["eval_loss"], rel=1e-4)
    assert json.loads((run / "best_epoch.json").read_text())["best"]["step"] == best["step"]


@pytest.mark.slow
def test_without_selection_the_last_epoch_stands_and_nothing_is_scored(base_hf_dir, tmp_path):
    from trainer.train import train

    data = tmp_path / "facts.jsonl"
    write_examples(data, facts()[:4])
    config = small_config(tmp_path, max_steps=2, batch_size=2, select_best_epoch=False)
    metrics = train(data, tmp_path / "run", base=base_hf_dir, eval_data=data, config=config)
    assert metrics["status"] == "ok" and metrics["best_epoch"] is None and not metrics["epoch_scores"]
    assert not (tmp_path / "run" / "best_epoch.json").exists()


@pytest.mark.slow
def test_a_judged_runs_final_losses_are_the_epoch_judges_figures_not_computed_again(base_hf_dir, tmp_path,
                                                                                   monkeypatch):
    import trainer.run_report as run_report
    from trainer.evaluate import eval_loss
    from trainer.train import train

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("disable_adapter", False))
        return eval_loss(*args, **kwargs)

    monkeypatch.setattr(run_report, "eval_loss", counted)
    data = tmp_path / "facts.jsonl"
    write_examples(data, facts()[2:])
    config = small_config(tmp_path, max_steps=-1, epochs=2, batch_size=4, save_steps=100, regression_tolerance=10.0)
    metrics = train(data, tmp_path / "run", base=base_hf_dir, eval_data=facts()[:2], config=config)

    assert metrics["status"] == "ok", metrics["reason"]
    assert calls == []  # the report scored nothing itself
    scores = json.loads((tmp_path / "run" / "best_epoch.json").read_text())
    kept = metrics["best_epoch"] or scores["epochs"][-1]
    for name in ("eval_loss", "regression_loss"):
        assert metrics[name] == kept[name] and metrics[f"{name}_start"] == scores["start"][name]
    assert eval_loss(tmp_path / "run" / "adapter", facts()[:2], max_length=64) == pytest.approx(kept["eval_loss"],
                                                                                                rel=1e-4)
