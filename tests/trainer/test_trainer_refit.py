"""The refit (trainer/refit.py) on the bundled SmolLM2-135M on the CPU: after the judge has chosen a variant,
that variant is trained again with the held-out examples, and served only when it keeps general ability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trainer_train import facts, small_config

from trainer.data import write_examples
from trainer.refit import FAILED, REFUSED, SKIPPED, USED, refit_variant
from trainer.variants import VariantResult


def chosen(tmp_path: Path, lr: float = 1e-3, objective: str = "sft") -> VariantResult:
    return VariantResult(name=f"lr{lr}_r8", learning_rate=lr, lora_rank=8, lora_alpha=16, run_dir=tmp_path / "v",
                         status="ok", objective=objective)


def split(tmp_path: Path) -> tuple[Path, Path]:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_examples(train, facts()[2:])
    write_examples(held_out, facts()[:2])
    return train, held_out


@pytest.mark.slow
def test_the_chosen_variant_is_trained_again_with_its_held_out_examples_and_served_and_resumes_as_such(
        base_hf_dir, tmp_path):
    train, held_out = split(tmp_path)
    config = small_config(tmp_path, max_steps=2, batch_size=2, save_steps=1, min_general_kept=0.0)
    refit = refit_variant(chosen(tmp_path), train, held_out, base_hf_dir, tmp_path / "refit", config)

    assert refit.status == USED, refit.reason
    metrics = json.loads((tmp_path / "refit" / "metrics.json").read_text())
    assert refit.examples == len(facts()) == metrics["examples"]["train"]
    # the held-out examples are trained on, and also scored by the epoch judge (only its forgetting rules matter)
    assert metrics["examples"]["eval"] == 2
    assert metrics["config"]["learning_rate"] == 1e-3 and metrics["config"]["lora_rank"] == 8
    assert Path(refit.adapter_dir) == tmp_path / "refit" / "adapter"
    assert (Path(refit.adapter_dir) / "adapter_config.json").is_file()
    assert refit.regression_loss == metrics["regression_loss"] and refit.general_kept == metrics["general_kept"]
    again = refit_variant(chosen(tmp_path), train, held_out, base_hf_dir, tmp_path / "refit", config)
    assert again.to_dict() == refit.to_dict()  # the finished run is found by its contract, not trained again


@pytest.mark.slow
def test_a_refit_that_breaks_general_ability_is_not_served(base_hf_dir, tmp_path):
    train, held_out = split(tmp_path)
    config = small_config(tmp_path, max_steps=2, batch_size=2, save_steps=1, regression_tolerance=0.5)
    # lr 1.0 wrecks the weights: the regression loss leaves the tolerance, or the run diverges
    refit = refit_variant(chosen(tmp_path, lr=1.0), train, held_out, base_hf_dir, tmp_path / "refit", config)
    assert refit.status in (REFUSED, FAILED) and refit.reason and refit.adapter_dir is None


def test_refit_is_skipped_with_its_reason_when_off_for_preference_variants_and_without_held_out(tmp_path):
    train, held_out = split(tmp_path)
    empty = tmp_path / "empty.jsonl"
    write_examples(empty, [])
    config = small_config(tmp_path)
    cases = [(chosen(tmp_path), held_out, small_config(tmp_path, refit=False), "trainer.refit is off"),
             (chosen(tmp_path, objective="sft+dpo"), held_out, config, "only sft variants are refit"),
             (chosen(tmp_path), None, config, "no held-out examples"),
             (chosen(tmp_path), empty, config, "no held-out examples")]
    for best, eval_path, run_config, why in cases:
        refit = refit_variant(best, train, eval_path, None, tmp_path / "refit", run_config)
        assert refit.status == SKIPPED and why in refit.reason and refit.adapter_dir is None
    assert not (tmp_path / "refit").exists()


def test_a_refit_kept_at_an_earlier_epoch_than_the_judged_variant_is_not_served(tmp_path):
    from trainer.refit import _stopped_earlier

    config = small_config(tmp_path, epochs=6)
    judged_at_3 = chosen(tmp_path)
    judged_at_3.metrics = {"best_epoch": {"epoch": 3.0}}
    judged_last = chosen(tmp_path)  # best_epoch None: the last epoch was kept
    assert "epoch 2, before the judged variant's epoch 3" in _stopped_earlier(
        judged_at_3, {"best_epoch": {"epoch": 2.0}}, config)
    assert _stopped_earlier(judged_at_3, {"best_epoch": {"epoch": 3.0}}, config) is None
    assert _stopped_earlier(judged_at_3, {"best_epoch": None}, config) is None
    assert "epoch 5, before the judged variant's epoch 6" in _stopped_earlier(
        judged_last, {"best_epoch": {"epoch": 5.0}}, config)
