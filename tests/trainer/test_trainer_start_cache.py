"""The starting weights' figures (general answers, start losses) are computed once per weights, set and method."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from trainer.start_cache import CACHE_DIR, cached

# What the key reads of a tokenizer: its chat template and end-of-sequence token.
TOKENIZER = SimpleNamespace(chat_template="{{ messages }}", eos_token="<|im_end|>")


def _weights(path: Path, content: bytes = b"\x00" * 4096) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(content)
    return path


def _counting():
    calls = []

    def compute():
        calls.append(1)
        return {"answers": ["Paris"], "n": len(calls)}

    return calls, compute


def _model(dtype=None):
    import torch

    return torch.nn.Linear(2, 2).to(dtype or torch.float32)


def test_the_same_weights_set_and_method_compute_once(tmp_path):
    weights, model = _weights(tmp_path / "w"), _model()
    calls, compute = _counting()
    first = cached(weights, model, TOKENIZER, "general_answers", {"prompts": ["a"]}, compute)
    second = cached(weights, model, TOKENIZER, "general_answers", {"prompts": ["a"]}, compute)
    assert len(calls) == 1 and first == second == {"answers": ["Paris"], "n": 1}
    assert len(list((weights / CACHE_DIR).glob("general_answers-*.json"))) == 1


def test_other_weights_another_set_template_or_precision_compute_again(tmp_path):
    import torch

    weights = _weights(tmp_path / "w")
    calls, compute = _counting()
    cached(weights, _model(), TOKENIZER, "general_answers", {"prompts": ["a"]}, compute)
    cached(weights, _model(), TOKENIZER, "general_answers", {"prompts": ["b"]}, compute)  # another set
    cached(weights, _model(), TOKENIZER, "start_loss", {"prompts": ["a"]}, compute)  # another figure
    cached(weights, _model(torch.bfloat16), TOKENIZER, "general_answers", {"prompts": ["a"]}, compute)  # answers differ in bf16
    other_template = SimpleNamespace(chat_template="{{ other }}", eos_token="<|im_end|>")  # the prompts become others
    cached(weights, _model(), other_template, "general_answers", {"prompts": ["a"]}, compute)
    _weights(weights, b"\x01" * 4096)  # retrained in place: same names and sizes, other bytes
    cached(weights, _model(), TOKENIZER, "general_answers", {"prompts": ["a"]}, compute)
    assert len(calls) == 6


def test_a_model_id_an_unusable_cache_or_a_damaged_entry_only_cost_the_computation(tmp_path):
    calls, compute = _counting()
    assert cached("HuggingFaceTB/SmolLM2-135M-Instruct", _model(), TOKENIZER, "x", {}, compute)["n"] == 1
    assert cached(None, _model(), TOKENIZER, "x", {}, compute)["n"] == 2

    blocked = _weights(tmp_path / "blocked")
    (blocked / CACHE_DIR).write_text("a file where the cache directory would be")
    assert cached(blocked, _model(), TOKENIZER, "x", {}, compute)["n"] == 3
    assert cached(blocked, _model(), TOKENIZER, "x", {}, compute)["n"] == 4  # nothing kept, nothing raised

    weights = _weights(tmp_path / "w")
    cached(weights, _model(), TOKENIZER, "x", {}, compute)
    entry = next((weights / CACHE_DIR).glob("x-*.json"))
    entry.write_text("{not json")
    assert cached(weights, _model(), TOKENIZER, "x", {}, compute)["n"] == 6  # computed again and replaced
    assert json.loads(entry.read_text())["value"]["n"] == 6
    assert cached(weights, _model(), TOKENIZER, "x", {}, compute)["n"] == 6


@pytest.mark.slow
def test_a_second_run_from_the_same_weights_reuses_their_general_answers_and_start_losses(base_hf_dir, tmp_path,
                                                                                          monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer import evaluate, general_kept
    from trainer.evaluate import regression_examples, start_loss
    from trainer.general_kept import PROBE_FILE, KeptProbe
    from trainer.run_setup import load_tokenizer

    # A directory of its own with the session's weight files only: the session's weights directory may already
    # hold entries from earlier tests (its judge_cache/ is not linked), and this test writes none there.
    weights = tmp_path / "weights"
    weights.mkdir()
    for source in Path(base_hf_dir).iterdir():
        if source.is_file():
            (weights / source.name).symlink_to(source.resolve())
    assert not (weights / CACHE_DIR).exists()
    tokenizer = load_tokenizer(str(weights))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # as a run holds it
    examples = regression_examples()[:4]

    first = KeptProbe.for_run(tmp_path / "run1", model, tokenizer, examples, 128, weights)
    loss = start_loss(model, examples, tokenizer, 128, 2, weights)
    assert first.asked == 4 and len(first.answers) == 4

    def never(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(general_kept, "_greedy", never)
    monkeypatch.setattr(evaluate, "eval_loss", never)
    second = KeptProbe.for_run(tmp_path / "run2", model, tokenizer, examples, 128, weights)
    assert (second.right, second.answers) == (first.right, first.answers)
    assert json.loads((tmp_path / "run2" / PROBE_FILE).read_text())["answers"] == first.answers  # the run keeps its copy
    assert start_loss(model, examples, tokenizer, 128, 2, weights) == loss
    with pytest.raises(AssertionError, match="computed again"):  # another set is another key
        KeptProbe.for_run(tmp_path / "run3", model, tokenizer, examples[:3], 128, weights)
