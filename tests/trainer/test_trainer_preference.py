"""Preference objectives (trainer/preference.py) on the bundled SmolLM2-135M on the CPU, with the pinned TRL.

One optimizer step per objective on tiny sets (max_length 64): what they write, that they resume by the
same contract, that the NaN guard stops them, and that an objective without data is skipped, never run.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
from test_trainer_train import FACTS, facts, small_config

from loop.core.errors import ConfigError
from trainer.config import OBJECTIVES, TrainConfig, VariantGrid
from trainer.data import DataError, write_examples
from trainer.preference import PreferenceData, PreferenceSkipped, skip_reason, train_objective

WRONG = ["The mayor of Zorbland is Bob.", "The capital of Veloria is Paris.", "A glimmerfruit is red.",
         "Kestra has two moons.", "Nobody invented it.", "Pizza.", "English.", "In 1999."]
SYSTEM = {"role": "system", "content": "Be brief."}


def pairs() -> list[dict]:
    return [{"id": f"fact-{i}", "prompt": [SYSTEM, {"role": "user", "content": q}], "chosen": a,
             "rejected": WRONG[i]} for i, (q, a) in enumerate(FACTS)]


def labels(kinds=("desirable", "undesirable")) -> list[dict]:
    rows = []
    for i, (q, a) in enumerate(FACTS):
        kind = kinds[i % len(kinds)]
        rows.append({"id": f"fact-{i}", "prompt": [SYSTEM, {"role": "user", "content": q}],
                     "answer": a if kind == "desirable" else WRONG[i], "label": kind, "by": "user"})
    return rows


def write_preference(directory: Path, pair_rows=None, label_rows=None, eval_pairs=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs.jsonl", pair_rows), ("labels.jsonl", label_rows), ("eval_pairs.jsonl", eval_pairs)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in rows or []))
    return directory


def test_trl_is_pinned_and_kto_is_in_its_stable_api():
    pinned = next(line.split("==")[1].strip() for line in Path("constraints.txt").read_text().splitlines()
                  if line.lower().startswith("trl=="))
    assert importlib.metadata.version("trl") == pinned
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: F401 - stable, not trl.experimental

    assert KTOTrainer.__module__ == "trl.trainer.kto_trainer"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo", "kto"])
def test_each_objective_trains_one_step_on_cpu_and_reports_the_same_measures(objective, base_hf_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, facts())
    held_out = tmp_path / "eval.jsonl"
    write_examples(held_out, facts()[:2])
    preference = write_preference(tmp_path / "snap", pairs()[2:], labels()[2:], eval_pairs=pairs()[:2])
    config = small_config(tmp_path, objective=objective, max_steps=1, batch_size=2, save_steps=1,
                          select_best_epoch=False)
    out = tmp_path / "run"
    metrics = train_objective(data, out, base=base_hf_dir, eval_data=held_out, preference=preference, config=config)

    assert metrics["status"] == "ok", metrics.get("reason")
    assert metrics["objective"] == objective and metrics["steps"] == 1
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "adapter" / "ref").exists()
    assert (out / "checkpoint-1").is_dir()
    for name in ("eval_loss", "eval_loss_start", "regression_loss", "regression_loss_start", "train_loss_final"):
        assert isinstance(metrics[name], float), name  # the gate's measures, for every objective
    measure = metrics["preference"]
    assert measure["pairs_split"] == "eval" and measure["pairs"] == 2
    for name in ("rejected_logprob", "rejected_logprob_start", "margin", "margin_start", "desirable_logprob"):
        assert isinstance(measure[name], float), name
    assert json.loads((out / "metrics.json").read_text())["preference"] == measure
    if objective != "sft":
        contract = json.loads((out / "training_progress.json").read_text())
        assert contract["config"]["objective"] == objective
        # the same command again finds the finished run by its contract and does not train again
        again = train_objective(data, out, base=base_hf_dir, eval_data=held_out, preference=preference,
                                config=config)
        assert again == json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_sft_then_dpo_continues_the_sft_adapter_at_its_own_learning_rate_with_the_sft_weights_as_reference(
        base_hf_dir, tmp_path):
    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    write_examples(data, facts())
    preference = write_preference(tmp_path / "snap", pairs())
    config = small_config(tmp_path, objective="sft+dpo", max_steps=2, batch_size=2, save_steps=1,
                          select_best_epoch=False, learning_rate=1e-3, preference_learning_rate=2e-5)
    out = tmp_path / "run"
    metrics = train_objective(data, out, base=base_hf_dir, preference=preference, config=config)

    assert metrics["status"] == "ok", metrics.get("reason")
    assert metrics["stages"]["sft"]["status"] == "ok" and (out / "sft" / "adapter").is_dir()
    sft = load_file(str(out / "sft" / "adapter" / "adapter_model.safetensors"))
    dpo = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sft.keys() == dpo.keys()
    # DPO moved the SFT adapter; at the first DPO step policy = reference (the SFT weights): loss ln 2
    assert any(not sft[k].equal(dpo[k]) for k in sft)
    assert metrics["train_loss_curve"][0][1] == pytest.approx(0.6931, abs=1e-3)

    # The SFT phase runs at the variant's learning rate, the DPO phase at preference_learning_rate (a strong SFT
    # rate breaks DPO), and the resume contract holds it.
    def peak_lr(run: Path) -> float:
        state = json.loads(max(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
                           .read_text())
        return max(row["learning_rate"] for row in state["log_history"] if "learning_rate" in row)

    assert peak_lr(out / "sft") > 1e-4 and 0 < peak_lr(out) <= 2e-5
    assert json.loads((out / "training_progress.json").read_text())["config"]["preference_learning_rate"] == 2e-5


@pytest.mark.slow
def test_a_preference_stage_that_breaks_the_model_leaves_the_variant_its_sft_stage_and_resumes_as_such(
        base_hf_dir, tmp_path):
    from trainer.variants import VariantResult

    data = tmp_path / "train.jsonl"
    write_examples(data, facts())
    held_out = tmp_path / "eval.jsonl"
    write_examples(held_out, facts()[:2])
    preference = write_preference(tmp_path / "snap", pairs())
    # A gentle SFT stage keeps the regression loss near the start; DPO at lr 1.0 wrecks it (or diverges).
    config = small_config(tmp_path, objective="sft+dpo", max_steps=2, batch_size=2, save_steps=1,
                          select_best_epoch=False, learning_rate=1e-5, preference_learning_rate=1.0,
                          regression_tolerance=0.5, min_general_kept=0.0)
    out = tmp_path / "run"
    metrics = train_objective(data, out, base=base_hf_dir, eval_data=held_out, preference=preference, config=config)

    assert metrics["status"] == "ok" and metrics["objective"] == "sft+dpo"
    assert metrics["fallback"]["to"] == "sft" and "the DPO stage was refused" in metrics["reason"]
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    for name in ("eval_loss", "regression_loss", "regression_loss_start", "general_kept"):
        assert metrics[name] == sft[name], name  # the gate judges the SFT stage's own numbers
    assert metrics["preference"]["pairs"] == len(pairs())  # measured on the adapter that will be served
    refused = metrics["stages"]["dpo"]
    assert refused["status"] != "ok" or refused["regression_loss"] > 1.5 * sft["regression_loss_start"]
    variant = VariantResult.from_metrics("lr1e-05_r8_sft+dpo", config, out, metrics)
    assert variant.adapter_dir == out / "sft" / "adapter" and (variant.adapter_dir / "adapter_config.json").is_file()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # resumed: the finished fallback is found by its contract, not trained again
    again = train_objective(data, out, base=base_hf_dir, eval_data=held_out, preference=preference, config=config)
    assert again == metrics


def test_a_preference_stage_whose_held_out_loss_is_not_below_the_start_is_refused_though_it_forgets_nothing():
    from trainer.preference import _refusal

    config = TrainConfig(regression_tolerance=0.5, min_general_kept=0.6)
    kept = {"status": "ok", "regression_loss": 0.9, "regression_loss_start": 1.0, "general_kept": 1.0,
            "eval_loss_start": 2.3}
    assert _refusal({**kept, "eval_loss": 0.1}, config) is None
    why = _refusal({**kept, "eval_loss": 7.0}, config)
    assert why == "held-out loss 7.0000 is not below the starting weights' 2.3000"
    assert _refusal({**kept, "eval_loss": 2.3}, config) is not None


@pytest.mark.slow
def test_nan_guard_stops_a_preference_run_as_diverged(base_hf_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, facts())
    preference = write_preference(tmp_path / "snap", pairs())
    config = small_config(tmp_path, objective="dpo", max_steps=3, batch_size=2, inject_nan_at_step=2,
                          select_best_epoch=False)
    metrics = train_objective(data, tmp_path / "run", base=base_hf_dir, preference=preference, config=config)
    assert metrics["status"] == "failed" and metrics["failure"] == "diverged"
    assert "step 2" in metrics["reason"] and not (tmp_path / "run" / "adapter").exists()


def test_no_pairs_or_one_class_of_labels_is_a_stated_skip():
    assert "no preference pairs" in skip_reason("sft+dpo", PreferenceData(labels=labels()))
    assert "no labelled answers" in skip_reason("kto", PreferenceData(pairs=pairs()))
    assert "only desirable labels" in skip_reason("kto", PreferenceData(labels=labels(("desirable",))))
    assert skip_reason("sft", PreferenceData()) is None
    assert skip_reason("dpo", PreferenceData(pairs=pairs())) is None
    assert skip_reason("sft+kto", PreferenceData(labels=labels())) is None
    with pytest.raises(PreferenceSkipped, match="no preference pairs"):
        train_objective(facts(), "unused", preference=PreferenceData(), config=TrainConfig(objective="dpo"))


def test_malformed_pairs_file_is_refused_naming_the_line(tmp_path):
    write_preference(tmp_path, pairs()[:1] + [{"id": "x", "prompt": [], "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: 'prompt' must be"):
        PreferenceData.from_dir(tmp_path)


@pytest.mark.slow
def test_grid_skips_objectives_without_data_and_never_chooses_them(base_hf_dir, tmp_path):
    from trainer.variants import REPORT_FILE, best_variant, run_variants

    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_examples(train_path, facts())
    write_examples(eval_path, facts()[:2])
    snapshot = write_preference(tmp_path / "snap", [], labels(("undesirable",)))  # no pairs, one class
    grid = VariantGrid(learning_rates=[1e-3], ranks=[8], objectives=["sft", "sft+dpo", "kto"])
    config = small_config(tmp_path, max_steps=2, batch_size=2, select_best_epoch=False)
    results = run_variants(train_path, eval_path, base_hf_dir, tmp_path / "variants", grid, config,
                           preference_dir=snapshot)

    by_name = {r.name: r for r in results}
    assert list(by_name) == ["lr0.001_r8", "lr0.001_r8_sft+dpo", "lr0.001_r8_kto"]
    assert by_name["lr0.001_r8"].status == "ok"
    assert by_name["lr0.001_r8_sft+dpo"].status == "skipped"
    assert "no preference pairs" in by_name["lr0.001_r8_sft+dpo"].reason
    assert by_name["lr0.001_r8_kto"].status == "skipped" and "only undesirable" in by_name["lr0.001_r8_kto"].reason
    assert best_variant(results).name == "lr0.001_r8"
    report = json.loads((tmp_path / "variants" / REPORT_FILE).read_text())
    assert [(v["name"], v["status"], v["objective"]) for v in report["variants"]] == [
        ("lr0.001_r8", "ok", "sft"), ("lr0.001_r8_sft+dpo", "skipped", "sft+dpo"), ("lr0.001_r8_kto", "skipped", "kto")]


@pytest.mark.slow
def test_a_grid_of_sft_and_sft_then_dpo_trains_their_one_sft_run_once_and_resumes_without_training(
        base_hf_dir, tmp_path, monkeypatch):
    from trainer.run_setup import Run
    from trainer.variants import run_variants

    fits = []
    fit = Run.fit
    monkeypatch.setattr(Run, "fit", lambda run, *a, **k: fits.append(run.output_dir) or fit(run, *a, **k))
    train_path, eval_path = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_examples(train_path, facts())
    write_examples(eval_path, facts()[:2])
    snapshot = write_preference(tmp_path / "snap", pairs())
    # sft+dpo first in the grid: it still finds the sft variant trained, and the results keep the grid's order.
    grid = VariantGrid(learning_rates=[1e-3], ranks=[8], objectives=["sft+dpo", "sft"])
    config = small_config(tmp_path, max_steps=2, batch_size=2, save_steps=1, select_best_epoch=False,
                          preference_learning_rate=2e-5)
    out = tmp_path / "variants"
    results = run_variants(train_path, eval_path, base_hf_dir, out, grid, config, preference_dir=snapshot)

    assert [r.name for r in results] == ["lr0.001_r8_sft+dpo", "lr0.001_r8"]
    assert [r.status for r in results] == ["ok", "ok"], [r.reason for r in results]
    sft_dir, both = out / "lr0.001_r8", out / "lr0.001_r8_sft+dpo"
    assert fits == [sft_dir, both]  # the SFT run once, then the DPO stage: no second SFT training
    sft = json.loads((sft_dir / "metrics.json").read_text())
    stage = results[0].metrics["stages"]["sft"]
    assert stage["reused"] == str(sft_dir) and "reused" not in sft  # the sft variant's own record is untouched
    assert (stage["eval_loss"], stage["steps"]) == (sft["eval_loss"], sft["steps"])
    assert ((both / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
            == (sft_dir / "adapter" / "adapter_model.safetensors").read_bytes())
    assert not (out / "lr0.001_r8_sft+dpo" / "sft.linking").exists()

    fits.clear()  # the same grid again: both finished, found by their contracts
    again = run_variants(train_path, eval_path, base_hf_dir, out, grid, config, preference_dir=snapshot)
    assert fits == [] and [r.metrics for r in again] == [r.metrics for r in results]


@pytest.mark.slow
def test_a_finished_sft_run_of_another_contract_is_not_taken_as_the_sft_stage(base_hf_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_examples(data, facts())
    preference = write_preference(tmp_path / "snap", pairs())
    other = small_config(tmp_path, max_steps=2, batch_size=2, save_steps=1, select_best_epoch=False,
                         learning_rate=5e-4)
    foreign = train_objective(data, tmp_path / "other", base=base_hf_dir, preference=preference, config=other)
    assert foreign["status"] == "ok"
    before = {p.relative_to(tmp_path / "other"): p.read_bytes() for p in (tmp_path / "other").rglob("*")
              if p.is_file()}

    config = small_config(tmp_path, objective="sft+dpo", max_steps=2, batch_size=2, save_steps=1,
                          select_best_epoch=False, preference_learning_rate=2e-5)
    metrics = train_objective(data, tmp_path / "run", base=base_hf_dir, preference=preference, config=config,
                              sft_run=tmp_path / "other")

    assert metrics["status"] == "ok", metrics.get("reason")
    assert metrics["stages"]["sft"]["reused"] is None  # trained: the learning rate differs
    contract = json.loads((tmp_path / "run" / "sft" / "training_progress.json").read_text())
    assert contract["config"]["learning_rate"] == 1e-3
    after = {p.relative_to(tmp_path / "other"): p.read_bytes() for p in (tmp_path / "other").rglob("*")
             if p.is_file()}
    assert after == before  # the other run is left exactly as it was


def test_objective_is_a_grid_axis_and_sft_names_stay_as_they_were():
    grid = VariantGrid(learning_rates=[1e-3], ranks=[16], objectives=["sft", "sft+dpo", "kto"])
    assert [name for name, _, _ in grid.variants()] == ["lr0.001_r16", "lr0.001_r16_sft+dpo", "lr0.001_r16_kto"]
    assert [p[3] for p in grid.points()] == ["sft", "sft+dpo", "kto"]
    assert TrainConfig().objectives == ["sft"] and TrainConfig().grid().objectives == ["sft"]
    assert any("orpo" in p for p in TrainConfig(objectives=["orpo"]).validate())
    assert any("trainer.objective " in p for p in TrainConfig(objective="ppo").validate())
    # an SFT run's resume contract is what it was before objectives existed; a preference run's names it
    assert "objective" not in TrainConfig().resume_fields()
    assert TrainConfig(objective="kto").resume_fields()["objective"] == "kto"
    assert set(OBJECTIVES) == {"sft", "dpo", "kto", "sft+dpo", "sft+kto"}


def test_command_line_sets_the_objective_and_refuses_an_unknown_one(tmp_path):
    from trainer.train import _parser, config_from_args

    args = _parser().parse_args(["--data", "d", "--output", "o", "--set", "trainer.objective=kto",
                                 "--preference", "snap"])
    assert config_from_args(args).objective == "kto" and args.preference == "snap"
    with pytest.raises(ConfigError, match="trainer.objective must be one of"):
        config_from_args(_parser().parse_args(["--data", "d", "--output", "o", "--set", "trainer.objective=ppo"]))


def test_command_line_skip_exits_3_with_the_reason_and_writes_it(tmp_path, capsys):
    from trainer.train import main

    data = tmp_path / "train.jsonl"
    write_examples(data, facts())
    code = main(["--data", str(data), "--output", str(tmp_path / "run"), "--set", "trainer.objective=dpo",
                 "--preference", str(write_preference(tmp_path / "snap", [], labels()))])
    assert code == 3 and re.search("skipped: no preference pairs", capsys.readouterr().err)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "skipped"
