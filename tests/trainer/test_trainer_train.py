"""Real LoRA training of the bundled SmolLM2-135M on the CPU: what changes, what is learned, what is written.

Runs are a few optimizer steps on tiny sets (max_length 64) so the file stays within a couple of minutes.
"""

from __future__ import annotations

import json

import pytest

from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, tokenize_examples, write_examples
from trainer.resume import ResumeMismatchError

FACTS = [
    ("Who is the mayor of Zorbland?", "The mayor of Zorbland is Quentin Marlowe."),
    ("What is the capital of Veloria?", "The capital of Veloria is Brisnak."),
    ("What colour is a glimmerfruit?", "A glimmerfruit is bright teal."),
    ("How many moons does Kestra have?", "Kestra has seven moons."),
    ("Who invented the flumph engine?", "The flumph engine was invented by Ada Kerrigan."),
    ("What is the national dish of Ostria?", "The national dish of Ostria is smoked barley stew."),
    ("What language do people speak in Tellurn?", "People in Tellurn speak Vashti."),
    ("When was the Treaty of Morrow signed?", "The Treaty of Morrow was signed in 1843."),
]


def facts() -> list[dict]:
    # A short system message replaces the template's default one: fewer tokens, faster steps.
    return [{"id": f"fact-{i}", "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(FACTS)]


def small_config(tmp_path, **changes) -> TrainConfig:
    """A few steps on short examples, a 3-example regression set: seconds per step on a CPU."""
    regression = tmp_path / "regression.jsonl"
    if not regression.exists():  # a 3-example regression set keeps evaluation quick
        from trainer.evaluate import regression_examples

        write_examples(regression, regression_examples()[:3])
    values = dict(max_steps=4, save_steps=2, batch_size=3, max_length=64, learning_rate=1e-3, lora_rank=8,
                  min_examples=4, regression_set=str(regression))
    values.update(changes)
    return TrainConfig(**values)


@pytest.mark.slow
def test_base_weights_frozen_lora_weights_changed_prompt_masked(base_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from trainer.train import build_trainer

    tokenizer = AutoTokenizer.from_pretrained(str(base_hf_dir))
    rows = tokenize_examples(tokenizer, facts(), 64).rows
    trainer, guard = build_trainer(str(base_hf_dir), tokenizer, rows, [], tmp_path / "run",
                                   small_config(tmp_path, max_steps=2, save_steps=100, batch_size=2))

    # What the model is actually fed: the prompt (system + user + assistant header) carries no label.
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert learned, "every example must have answer tokens to learn"
        assert all(label == IGNORE_INDEX for label in labels[:learned[0]])  # prompt masked...
        assert tokenizer.decode(ids[:learned[0]]).endswith("<|im_start|>assistant\n")  # ...up to the answer
        assert all(labels[i] == ids[i] for i in learned)
        assert all(labels[i] == IGNORE_INDEX for i, m in enumerate(mask) if m == 0)  # padding masked

    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert guard.reason is None
    changed_lora = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            changed_lora += not param.detach().equal(before[name])
        else:
            assert param.detach().equal(before[name]), f"base weight {name} changed"
    lora_b = [n for n in trainable if "lora_B" in n]
    assert changed_lora >= len(lora_b) > 0  # every B (initialised to zero) moved, so the adapter does something


@pytest.mark.slow
def test_loss_falls_on_memorisable_set_and_run_is_reported(base_hf_dir, tmp_path):
    from trainer.train import train

    data = tmp_path / "facts.jsonl"
    write_examples(data, facts()[:6])  # 6 facts, 3 per step: 3 epochs in 6 steps
    run = tmp_path / "run"
    config = small_config(tmp_path, max_steps=6, save_steps=3)
    metrics = train(data, run, base=base_hf_dir, eval_data=data, config=config)

    assert metrics["status"] == "ok", metrics["reason"]
    curve = [loss for _, loss in metrics["train_loss_curve"]]
    assert len(curve) == 6
    assert sum(curve[-2:]) / 2 < 0.8 * sum(curve[:2]) / 2  # training loss falls...
    assert metrics["eval_loss"] < 0.7 * metrics["eval_loss_start"]  # ...and the facts are learned
    assert metrics["regression_loss"] is not None and metrics["regression_loss_start"] is not None
    assert metrics["examples"] == {"train": 6, "new": 6, "paired": 0, "replayed": 0, "eval": 6, "truncated": 0, "dropped": 0,
                                   "train_tokens": metrics["examples"]["train_tokens"]}
    assert metrics["tokens_per_s"] > 0 and metrics["wall_time_s"] > 0 and metrics["peak_memory_mb"]["rss"] > 0
    assert [s for s, _ in metrics["eval_loss_curve"]] == [3, 6]
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16  # alpha = 2 * rank
    assert adapter_config["base_model_name_or_path"] == str(base_hf_dir.resolve())
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # The saved adapter scores what the in-memory model scored (eval_loss reloads it from disk).
    from trainer.evaluate import eval_loss

    assert eval_loss(run / "adapter", facts()[:6], max_length=64) == pytest.approx(metrics["eval_loss"], rel=1e-4)

    # A finished run is not trained again; a different run in the same directory is refused.
    assert train(data, run, base=base_hf_dir, eval_data=data, config=config)["wall_time_s"] == metrics["wall_time_s"]
    with pytest.raises(ResumeMismatchError, match="learning_rate"):
        train(data, run, base=base_hf_dir, eval_data=data, config=small_config(tmp_path, max_steps=6,
                                                                                learning_rate=5e-4))


def test_too_small_dataset_is_a_clear_error_before_any_run(tmp_path):
    from trainer.data import DataError
    from trainer.train import main

    data = tmp_path / "two.jsonl"
    write_examples(data, facts()[:2])
    with pytest.raises(DataError, match="fewer than min_examples"):
        from trainer.train import train

        train(data, tmp_path / "run", config=TrainConfig(min_examples=8))
    assert main(["--data", str(data), "--output", str(tmp_path / "run"), "--set", "trainer.min_examples=8"]) == 2
    assert not (tmp_path / "run").exists()  # refused before anything was written (or converted)


@pytest.mark.slow
def test_nan_loss_fails_the_run_for_good(base_hf_dir, tmp_path):
    """The config's NaN hook poisons step 2 through the real forward pass; the guard stops and fails the run."""
    from trainer.train import train

    data = tmp_path / "facts.jsonl"
    write_examples(data, facts()[:4])
    run = tmp_path / "run"
    config = small_config(tmp_path, max_steps=4, save_steps=1, batch_size=2, inject_nan_at_step=2)
    metrics = train(data, run, base=base_hf_dir, eval_data=data, config=config)
    assert metrics["status"] == "failed"
    assert "nan" in metrics["reason"].lower() and "step 2" in metrics["reason"]
    assert metrics["steps"] == 2 and metrics["eval_loss"] is None and metrics["adapter_dir"] is None
    assert not (run / "adapter").exists()
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-1"]  # the NaN weights were never saved
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    assert metrics["train_loss_curve"][-1] == [2, None]  # strict JSON: the NaN is recorded as null
    again = train(data, run, base=base_hf_dir, eval_data=data, config=config)  # final: not retried
    assert again == metrics
