"""Early stopping on the judge: every epoch gets its held-out loss, the forgetting rules are checked in that order
until an epoch passes, and the adapter of the best eligible epoch is kept."""

from __future__ import annotations

import json
import math
import random

import pytest
from test_trainer_train import FACTS, facts, small_config

from trainer.best_epoch import choose, choose_before_divergence, eligible
from trainer.data import write_examples


def test_an_epoch_that_forgot_beyond_the_tolerance_is_never_eligible():
    assert eligible({"eval_loss": 0.5, "regression_loss": 1.04}, 1.0, 0.05)
    assert not eligible({"eval_loss": 0.1, "regression_loss": 1.06}, 1.0, 0.05)
    assert not eligible({"eval_loss": float("nan"), "regression_loss": 1.0}, 1.0, 0.05)
    assert not eligible({"eval_loss": None, "regression_loss": 1.0}, 1.0, 0.05)
    assert eligible({"eval_loss": 0.3, "regression_loss": None}, None, 0.05)  # no regression set: held-out decides


def test_the_forgetting_rules_are_checked_in_order_of_held_out_loss_until_an_epoch_passes():
    rows = [{"epoch": i + 1, "step": 2 * (i + 1), "eval_loss": e} for i, e in enumerate([0.9, 0.4, 0.5, 0.3])]
    regression = {2: 1.0, 4: 1.01, 6: 1.0, 8: 2.0}  # the lowest held-out loss (step 8) forgot
    checked = []

    def check(row):
        checked.append(row["step"])
        row.update(regression_loss=regression[row["step"]], general_kept=1.0, checked=True)

    assert choose(rows, check, 1.0, 0.05)["step"] == 4
    assert checked == [8, 4]  # epochs 1 and 3 were never checked
    assert choose(rows, check, 1.0, 0.05)["step"] == 4 and checked == [8, 4]  # checks already made are reused


def test_choosing_lazily_keeps_the_epoch_that_scoring_every_epoch_keeps():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 6)
        rows = [{"epoch": i + 1, "step": i + 1, "eval_loss": rng.choice([rng.random(), 0.5, math.nan, None])}
                for i in range(n)]
        full = {r["step"]: (rng.choice([0.9, 1.0, 1.2]), rng.choice([None, 0.5, 0.8, 1.0])) for r in rows}
        every = [dict(r, regression_loss=full[r["step"]][0], general_kept=full[r["step"]][1]) for r in rows]
        eligible_rows = [r for r in every if eligible(r, 1.0, 0.1, 0.7)]
        expected = min(eligible_rows, key=lambda r: (r["eval_loss"], r["step"]))["step"] if eligible_rows else None

        def check(row):
            row.update(regression_loss=full[row["step"]][0], general_kept=full[row["step"]][1], checked=True)

        chosen = choose([dict(r) for r in rows], check, 1.0, 0.1, 0.7)
        assert (chosen or {}).get("step") == expected, rows


def test_an_epoch_whose_weights_cannot_be_judged_is_passed_over():
    rows = [{"epoch": 1, "step": 1, "eval_loss": 0.5}, {"epoch": 2, "step": 2, "eval_loss": 0.2}]

    def check(row):
        if row["step"] == 2:
            return False
        row.update(regression_loss=1.0, general_kept=1.0, checked=True)
        return True

    assert choose(rows, check, 1.0, 0.05)["step"] == 1


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


@pytest.mark.slow
def test_when_the_last_epoch_is_best_and_keeps_the_rules_only_it_is_checked_for_forgetting(base_hf_dir, tmp_path):
    from trainer.train import train

    data = tmp_path / "facts.jsonl"
    write_examples(data, facts())
    run = tmp_path / "run"
    # Held out: the trained facts themselves, so every pass lowers the held-out loss and the last epoch is best.
    config = small_config(tmp_path, max_steps=-1, epochs=3, batch_size=4, save_steps=100, regression_tolerance=10.0)
    metrics = train(data, run, base=base_hf_dir, eval_data=facts()[:3], config=config)

    assert metrics["status"] == "ok", metrics["reason"]
    scores = metrics["epoch_scores"]
    assert [r["step"] for r in scores] == [2, 4, 6] and all(r["eval_loss"] is not None for r in scores)
    assert min(scores, key=lambda r: r["eval_loss"])["step"] == 6 and metrics["best_epoch"] is None
    assert [r["checked"] for r in scores] == [False, False, True]
    assert [r["regression_loss"] is None for r in scores] == [True, True, False]
    assert metrics["regression_loss"] == scores[-1]["regression_loss"]
    assert metrics["general_kept"] == scores[-1]["general_kept"]
    assert not (run / "epoch_adapters").exists()  # the per-epoch weights go once the adapter is saved


@pytest.mark.slow
def test_a_run_that_diverges_after_an_epoch_learned_keeps_that_epoch_and_never_the_diverged_weights(
        base_hf_dir, tmp_path):
    from trainer.evaluate import eval_loss
    from trainer.train import train

    data = tmp_path / "facts.jsonl"
    write_examples(data, facts()[:4])
    run = tmp_path / "run"
    # Two steps an epoch: epochs 1 and 2 end at steps 2 and 4, and the loss turns NaN at step 5, in epoch 3.
    config = small_config(tmp_path, max_steps=-1, epochs=3, batch_size=2, save_steps=100, inject_nan_at_step=5,
                          regression_tolerance=10.0)
    metrics = train(data, run, base=base_hf_dir, eval_data=data, config=config)

    assert metrics["status"] == "ok" and metrics["failure"] is None, metrics["reason"]
    assert "nan" in metrics["reason"].lower() and "judged before it" in metrics["reason"]
    assert metrics["steps"] == 5
    scores = metrics["epoch_scores"]
    assert [r["step"] for r in scores] == [2, 4]  # the stopped epoch's weights were never scored
    kept = metrics["best_epoch"]
    assert kept["step"] == min(scores, key=lambda r: r["eval_loss"])["step"]
    assert kept["eval_loss"] < metrics["eval_loss_start"]
    assert metrics["eval_loss"] == kept["eval_loss"] and math.isfinite(metrics["eval_loss"])
    assert eval_loss(run / "adapter", facts()[:4], max_length=64) == pytest.approx(kept["eval_loss"], rel=1e-4)
    assert json.loads((run / "best_epoch.json").read_text())["diverged"]["step"] == 5
    assert train(data, run, base=base_hf_dir, eval_data=data, config=config) == metrics  # final: not retrained


def test_after_a_divergence_only_an_epoch_that_learned_and_kept_the_rules_can_be_kept():
    rows = [{"step": 2, "eval_loss": 2.9, "checked": True, "regression_loss": 1.0, "general_kept": 1.0},
            {"step": 4, "eval_loss": 3.4, "checked": True, "regression_loss": 1.0, "general_kept": 1.0}]
    start = {"eval_loss": 2.8, "regression_loss": 1.0}
    assert choose_before_divergence(rows, lambda r: True, start, 0.1) is None  # neither is below the start's 2.8
    assert choose_before_divergence(rows, lambda r: True, dict(start, eval_loss=3.0), 0.1)["step"] == 2
    rows[0]["general_kept"] = 0.2  # the one that learned forgot: nothing to keep
    assert choose_before_divergence(rows, lambda r: True, dict(start, eval_loss=3.0), 0.1, min_kept=0.6) is None
    assert choose_before_divergence([], lambda r: True, start, 0.1) is None
