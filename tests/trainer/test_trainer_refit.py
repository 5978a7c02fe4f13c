"""The refit (trainer/refit.py) on the bundled SmolLM2-135M on the CPU: after the judge has chosen a variant,
that variant is trained again with the held-out examples, and served only when it keeps general ability."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_trainer_train import facts, small_config

from trainer.data import write_examples
from trainer.general_kept import PROBE_FILE
from trainer.refit import FAILED, REFUSED, SKIPPED, USED, refit_variant
from trainer.variants import VariantResult


def chosen(tmp_path: Path, lr: float = 1e-3, objective: str = "sft") -> VariantResult:
    return VariantResult(name=f"lr{lr}_r8", learning_rate=lr, lora_rank=8, lora_alpha=16, run_dir=tmp_path / "v",
                         status="ok", objective=objective)


def paris_probe() -> dict:
    return {"id": "paris", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "expect": ["paris"]}


def split(tmp_path: Path) -> tuple[Path, Path]:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_examples(train, facts()[2:])
    write_examples(held_out, facts()[:2])
    return train, held_out


def judged_run(base_hf_dir, tmp_path: Path, train: Path, held_out: Path) -> VariantResult:
    """A real judged variant: one step of lr 1e-3 rank 8 on the training examples, its adapter saved."""
    from trainer.train import train as train_run

    config = small_config(tmp_path, max_steps=1, batch_size=2, select_best_epoch=False)
    metrics = train_run(train, tmp_path / "v", base=base_hf_dir, eval_data=held_out, config=config)
    assert metrics["status"] == "ok"
    return VariantResult.from_metrics("lr0.001_r8", config, tmp_path / "v", metrics)


def lora_weights(adapter_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_the_refit_continues_the_judged_adapter_instead_of_starting_again(base_hf_dir, tmp_path):
    train, held_out = split(tmp_path)
    judged = judged_run(base_hf_dir, tmp_path, train, held_out)
    # A vanishing learning rate leaves the weights where the refit started them: at the judged adapter's
    # (a fresh LoRA adapter starts with every B matrix at zero).
    config = small_config(tmp_path, max_steps=1, batch_size=2, min_general_kept=0.0, refit_epochs=2.0)
    refit = refit_variant(replace(judged, learning_rate=1e-12), train, held_out, base_hf_dir, tmp_path / "refit",
                          config)
    assert refit.status == USED, refit.reason
    assert refit.metrics["config"]["init_adapter"] == str(judged.adapter_dir)
    start, end = lora_weights(judged.adapter_dir), lora_weights(refit.adapter_dir)
    assert start.keys() == end.keys()
    lora_b = [k for k in start if "lora_B" in k]
    assert lora_b and all(start[k].abs().max() > 0 for k in lora_b)
    for k in start:
        assert torch.allclose(start[k], end[k], atol=1e-6), k
    # the starting measures are still the starting weights' (the adapter switched off), not the judged model's
    assert refit.regression_loss_start == pytest.approx(judged.regression_loss_start, rel=1e-5)


@pytest.mark.slow
def test_the_chosen_variant_is_trained_again_with_its_held_out_examples_and_served_and_resumes_as_such(
        base_hf_dir, tmp_path):
    train, held_out = split(tmp_path)
    config = small_config(tmp_path, max_steps=2, batch_size=2, save_steps=1, min_general_kept=0.0, refit_epochs=0.0)
    judged = chosen(tmp_path)
    # The judged run's record of the starting model's right general answers (here: one, "Paris").
    (judged.run_dir).mkdir()
    (judged.run_dir / PROBE_FILE).write_text(json.dumps({"right": [paris_probe()], "asked": 1,
                                                         "answers": {"paris": "The capital of France is Paris."}}))
    refit = refit_variant(judged, train, held_out, base_hf_dir, tmp_path / "refit", config)

    assert refit.status == USED, refit.reason
    metrics = json.loads((tmp_path / "refit" / "metrics.json").read_text())
    assert refit.examples == len(facts()) == metrics["examples"]["train"]
    assert metrics["examples"]["eval"] == 2  # the held-out examples are trained on and scored once, at the end
    # judged on its final weights only: no epoch was scored, and the starting answers were not generated again
    assert metrics["epoch_scores"] is None and not (tmp_path / "refit" / "best_epoch.json").exists()
    assert metrics["general_right_start"] == 1 and refit.general_kept in (0.0, 1.0)
    assert metrics["config"]["learning_rate"] == 1e-3 and metrics["config"]["lora_rank"] == 8
    assert Path(refit.adapter_dir) == tmp_path / "refit" / "adapter"
    assert (Path(refit.adapter_dir) / "adapter_config.json").is_file()
    assert refit.regression_loss == metrics["regression_loss"] and refit.general_kept == metrics["general_kept"]
    again = refit_variant(chosen(tmp_path), train, held_out, base_hf_dir, tmp_path / "refit", config)
    assert again.to_dict() == refit.to_dict()  # the finished run is found by its contract, not trained again


@pytest.mark.slow
def test_a_refit_that_breaks_general_ability_is_not_served(base_hf_dir, tmp_path):
    train, held_out = split(tmp_path)
    config = small_config(tmp_path, max_steps=2, batch_size=2, save_steps=1, regression_tolerance=0.5,
                          refit_epochs=0.0)
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
             (chosen(tmp_path), empty, config, "no held-out examples"),
             (chosen(tmp_path), held_out, small_config(tmp_path, refit_epochs=2.0), "judged adapter of lr0.001_r8 is missing")]
    for best, eval_path, run_config, why in cases:
        refit = refit_variant(best, train, eval_path, None, tmp_path / "refit", run_config)
        assert refit.status == SKIPPED and why in refit.reason and refit.adapter_dir is None
    assert not (tmp_path / "refit").exists()


def test_refit_epochs_must_be_a_finite_number_at_least_zero_and_only_sft_continues_an_adapter():
    from trainer.config import TrainConfig

    assert TrainConfig().validate() == [] and TrainConfig(refit_epochs=0).validate() == []
    for bad in (-1.0, float("nan"), float("inf"), True, "3"):
        assert any("trainer.refit_epochs" in p for p in TrainConfig(refit_epochs=bad).validate()), bad
    problems = TrainConfig(init_adapter="some/adapter", objective="kto").validate()
    assert any("trainer.init_adapter" in p for p in problems)
    assert TrainConfig(init_adapter="some/adapter").resume_fields()["init_adapter"] == "some/adapter"
    assert "init_adapter" not in TrainConfig().resume_fields()  # older run directories still resume


@pytest.mark.slow
def test_the_refit_trains_at_its_factor_of_the_judged_variants_learning_rate(base_hf_dir, tmp_path):
    train, held_out = split(tmp_path)
    config = small_config(tmp_path, max_steps=1, batch_size=2, min_general_kept=0.0, refit_epochs=0.0,
                          refit_learning_rate_factor=0.5)
    refit = refit_variant(chosen(tmp_path, lr=1e-3), train, held_out, base_hf_dir, tmp_path / "refit", config)
    assert refit.status == USED, refit.reason
    assert refit.metrics["config"]["learning_rate"] == pytest.approx(5e-4)


def test_the_refit_learning_rate_factor_is_a_fraction_of_the_variants_rate():
    from trainer.config import TrainConfig

    assert TrainConfig(refit_learning_rate_factor=0.25).validate() == []
    for bad in (0.0, -0.5, 1.5, float("nan"), True, "0.5"):
        problems = TrainConfig(refit_learning_rate_factor=bad).validate()
        assert any("trainer.refit_learning_rate_factor" in p for p in problems), bad
