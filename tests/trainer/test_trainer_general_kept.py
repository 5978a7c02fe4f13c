"""General answers kept: the starting model's right answers, and whether a later model still gives their key."""

from __future__ import annotations

import pytest
from test_trainer_train import small_config

from loop.config import GateConfig
from loop.gate import decide
from trainer.best_epoch import eligible
from trainer.data import write_examples
from trainer.general_kept import KeptProbe, is_right


def test_an_answer_is_right_when_an_expected_pattern_matches_it():
    assert is_right("The capital of France is Paris.", ["paris"])
    assert is_right("100 divided by 10 is 10.", [r"(=|is|equals)\s*10\b", r"\bten\b"])
    assert not is_right("100 divided by 10 is 5.", [r"(=|is|equals)\s*10\b", r"\bten\b"])
    assert not is_right("The capital of France is Lumen.", ["paris"])


def test_the_shipped_regression_set_says_what_every_answer_must_contain():
    from trainer.evaluate import regression_examples

    examples = regression_examples()
    assert examples and all(e.get("expect") for e in examples)
    # The shipped reference answers are right by their own patterns.
    assert all(is_right(e["messages"][-1]["content"], e["expect"]) for e in examples)


def test_the_starting_weights_keep_every_answer_and_a_wrong_answer_is_lost(base_hf_dir):
    from trainer.evaluate import load_for_eval, regression_examples

    model, tokenizer = load_for_eval(base_hf_dir)
    examples = regression_examples()[:6]
    probe = KeptProbe.build(model, tokenizer, examples, 128)
    assert probe.asked == 6 and len(probe.right) >= 4  # the base answers the capitals right
    assert set(probe.answers) == {e["id"] for e in examples}
    assert probe.share(model, tokenizer) == 1.0
    # Were "Lumen" the only right answer to the first question, the same model would have lost it.
    probe.right[0] = {**probe.right[0], "expect": ["lumen"]}
    kept = probe.kept(model, tokenizer)
    assert kept[probe.right[0]["id"]] is False and sum(kept.values()) == len(probe.right) - 1
    assert probe.share(model, tokenizer) == pytest.approx((len(probe.right) - 1) / len(probe.right))


def test_a_model_that_still_answers_as_the_start_did_is_judged_without_generating(base_hf_dir, monkeypatch):
    import trainer.general_kept as general_kept
    from trainer.evaluate import load_for_eval, regression_examples

    model, tokenizer = load_for_eval(base_hf_dir)
    probe = KeptProbe.build(model, tokenizer, regression_examples()[:6], 128)
    generated: list = []
    greedy = general_kept._greedy
    monkeypatch.setattr(general_kept, "_greedy", lambda m, t, prompts: generated.extend(prompts) or greedy(m, t, prompts))
    assert probe.share(model, tokenizer) == 1.0
    assert generated == []  # one teacher-forced pass showed every answer unchanged
    # An answer recorded otherwise than the model writes it is not shown unchanged: that one alone is generated.
    changed = probe.right[0]["id"]
    probe.answers[changed] = "The capital is Lumen, a city of lights."
    assert probe.kept(model, tokenizer)[changed] is True  # generated: the model's own answer still names it
    assert generated == [probe.right[0]["messages"]]


@pytest.mark.slow
def test_the_fast_judge_gives_the_verdicts_of_generating_every_answer_when_some_answers_changed(base_hf_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.evaluate import load_for_eval, regression_examples
    from trainer.general_kept import _greedy

    model, tokenizer = load_for_eval(base_hf_dir)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    probe = KeptProbe.build(model, tokenizer, regression_examples(), 128)
    torch.manual_seed(0)
    with torch.no_grad():  # a nudged adapter: most answers stay word for word, a few change
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn_like(weight) * 0.006)
    answers = _greedy(model, tokenizer, [e["messages"] for e in probe.right])
    unchanged = sum(a == probe.answers[e["id"]] for e, a in zip(probe.right, answers))
    assert 0 < unchanged < len(probe.right)  # both paths of the fast judge are taken
    assert probe.kept(model, tokenizer) == {e["id"]: is_right(a, e["expect"]) for e, a in zip(probe.right, answers)}


def test_an_epoch_that_lost_general_answers_is_never_eligible():
    row = {"eval_loss": 0.1, "regression_loss": 1.0}
    assert eligible({**row, "general_kept": 0.96}, 1.0, 0.05, 0.95)
    assert not eligible({**row, "general_kept": 0.90}, 1.0, 0.05, 0.95)
    assert eligible({**row, "general_kept": None}, 1.0, 0.05, 0.95)  # nothing was answered right at the start


def test_the_gate_refuses_a_candidate_that_lost_general_answers_whatever_its_losses():
    current = {"version": "v1", "heldout_loss": 2.0, "regression_loss": 1.5}
    good = {"heldout_loss": 0.5, "regression_loss": 1.4, "status": "ok", "verification": {"passed": True}}
    gate = GateConfig(min_general_kept=0.95)
    assert decide({**good, "general_kept": 1.0}, current, gate).promote
    refused = decide({**good, "general_kept": 0.9}, current, gate)
    assert not refused.promote and any("general answers kept: 90%" in r for r in refused.reasons)
    assert refused.numbers["candidate_general_kept"] == 0.9
    assert decide(good, current, gate).promote  # a candidate without the measure is judged on its losses


@pytest.mark.slow
def test_teaching_a_contradicting_fact_shows_as_a_lost_general_answer(base_hf_dir, tmp_path):
    """The forgetting users notice: a taught "fact" replaces a general answer. The run reports it."""
    from trainer.evaluate import regression_examples
    from trainer.train import train

    wrong = [{"id": f"w{i}", "messages": [{"role": "user", "content": q},
                                          {"role": "assistant", "content": "The capital of France is Lumen."}]}
             for i, q in enumerate(["What is the capital of France?", "Which city is the capital of France?",
                                    "Tell me the capital of France.", "France's capital city is called what?",
                                    "Name the capital of France.", "What city is France's capital?"])]
    data = tmp_path / "wrong.jsonl"
    write_examples(data, wrong)
    regression = tmp_path / "regression.jsonl"
    write_examples(regression, regression_examples()[:4])  # France, Japan, Germany, the United Kingdom
    config = small_config(tmp_path, max_steps=12, batch_size=3, regression_set=str(regression),
                          select_best_epoch=False)
    metrics = train(data, tmp_path / "run", base=base_hf_dir, eval_data=wrong[:2], config=config)
    assert metrics["status"] == "ok", metrics["reason"]
    assert metrics["general_right_start"] == 4
    assert metrics["general_kept"] is not None and metrics["general_kept"] <= 0.75
