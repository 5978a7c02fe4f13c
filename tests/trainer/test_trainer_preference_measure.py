"""The preference measure (trainer/preference_measure.py): chosen against rejected answers, on the real model."""

from __future__ import annotations

import math

import pytest
from test_trainer_anchor import _randomly_adapted

from trainer.config import TrainConfig
from trainer.preference_data import PreferenceData


def _pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}


def _data() -> PreferenceData:
    pairs = [_pair("What is the capital of France?", "Paris.", "The capital of France is Lyon, a large city."),
             _pair("How many legs has a spider?", "Eight.", "A spider has six legs, like every insect.")]
    # the thumbs-down answers are also undesirable labels, as a reviewed chat gives both
    labels = [{"prompt": p["prompt"], "answer": p["rejected"], "label": "undesirable"} for p in pairs] + [
        {"prompt": p["prompt"], "answer": p["chosen"], "label": "desirable"} for p in pairs]
    return PreferenceData(eval_pairs=pairs, eval_labels=labels)


@pytest.mark.slow
def test_every_distinct_answer_is_scored_once_per_set_of_weights_with_the_values_of_scoring_each_alone(
        base_hf_dir, monkeypatch):
    from transformers import AutoTokenizer

    from trainer import preference_measure
    from trainer.preference_measure import answer_logprobs, preference_measures

    tokenizer = AutoTokenizer.from_pretrained(base_hf_dir)
    _, model = _randomly_adapted(base_hf_dir)
    scored = []
    real = preference_measure.masked_nll

    def counting(model, sequences, *args, **kwargs):
        scored.append(len(sequences))
        return real(model, sequences, *args, **kwargs)

    monkeypatch.setattr(preference_measure, "masked_nll", counting)
    data, config = _data(), TrainConfig(batch_size=4, max_length=256)
    out = preference_measures(model, tokenizer, data, config)
    assert scored == [4, 4]  # 2 chosen + 2 rejected answers, the 4 labels repeat them: adapted, then start
    for suffix, off in (("", False), ("_start", True)):
        chosen = answer_logprobs(model, tokenizer, [(p["prompt"], p["chosen"]) for p in data.eval_pairs], 256,
                                 disable_adapter=off)
        rejected = answer_logprobs(model, tokenizer, [(p["prompt"], p["rejected"]) for p in data.eval_pairs], 256,
                                   disable_adapter=off)
        assert out[f"chosen_logprob{suffix}"] == pytest.approx(sum(chosen) / 2, rel=1e-5)
        assert out[f"undesirable_logprob{suffix}"] == pytest.approx(sum(rejected) / 2, rel=1e-5)
        assert out[f"desirable_logprob{suffix}"] == pytest.approx(out[f"chosen_logprob{suffix}"], rel=1e-6)
        assert out[f"win_rate{suffix}"] == sum(c > r for c, r in zip(chosen, rejected)) / 2
    assert out["chosen_logprob"] != pytest.approx(out["chosen_logprob_start"])  # the adapter was on, then off


@pytest.mark.slow
def test_a_pair_whose_prompt_leaves_no_room_for_its_answer_is_left_out_and_the_others_keep_their_own_answers(
        base_hf_dir):
    from transformers import AutoTokenizer

    from trainer.preference_measure import answer_logprobs, preference_measures

    tokenizer = AutoTokenizer.from_pretrained(base_hf_dir)
    _, model = _randomly_adapted(base_hf_dir)
    long_prompt = "Please read this carefully. " * 60  # far beyond max_length: no answer token is left
    data = _data()
    data = PreferenceData(eval_pairs=[_pair(long_prompt, "Yes.", "No.")] + data.eval_pairs)
    values = answer_logprobs(model, tokenizer, [(p["prompt"], p["chosen"]) for p in data.eval_pairs], 128)
    assert math.isnan(values[0]) and all(math.isfinite(v) for v in values[1:])
    alone = answer_logprobs(model, tokenizer, [(p["prompt"], p["chosen"]) for p in data.eval_pairs[1:]], 128)
    assert values[1:] == pytest.approx(alone, rel=1e-5)
    out = preference_measures(model, tokenizer, data, TrainConfig(batch_size=4, max_length=128))
    assert out["pairs"] == 3 and out["chosen_logprob"] == pytest.approx(sum(alone) / 2, rel=1e-5)
    assert 0 <= out["win_rate"] <= 1
