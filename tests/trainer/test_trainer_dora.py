"""DoRA (``trainer.use_dora``): the adapter is PEFT's DoRA when asked, plain LoRA otherwise; a DoRA run trains,
continues (the refit's ``init_adapter``) and merges into weights that answer like the adapter."""

from __future__ import annotations

import json

import pytest

from trainer.config import TrainConfig
from trainer.sft_trainer import lora_config


def test_the_adapter_is_dora_only_when_asked():
    assert lora_config(TrainConfig()).use_dora is False
    assert lora_config(TrainConfig(use_dora=True)).use_dora is True


def test_use_dora_is_part_of_the_resume_contract_only_when_on():
    assert "use_dora" not in TrainConfig().resume_fields()
    assert TrainConfig(use_dora=True).resume_fields()["use_dora"] is True


@pytest.mark.slow
def test_a_dora_run_trains_continues_and_merges_into_the_same_answers(base_hf_dir, tmp_path):
    import torch
    from peft import PeftModel
    from test_trainer_train import facts, small_config
    from transformers import AutoModelForCausalLM

    from trainer.export import merge_adapter
    from trainer.train import train

    first = train(facts()[:4], tmp_path / "dora", base=base_hf_dir, eval_data=facts()[4:6],
                  config=small_config(tmp_path, max_steps=2, use_dora=True))
    assert first["status"] == "ok", first["reason"]
    adapter = tmp_path / "dora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True

    continued = train(facts()[:4], tmp_path / "continued", base=base_hf_dir, eval_data=facts()[4:6],
                      config=small_config(tmp_path, max_steps=1, use_dora=True, init_adapter=str(adapter)))
    assert continued["status"] == "ok", continued["reason"]
    assert json.loads((tmp_path / "continued" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True

    merged = merge_adapter(adapter, base_hf_dir, tmp_path / "merged", dtype="float32")
    ids = torch.tensor([[1, 504, 3458, 282, 4849, 314]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(base_hf_dir), dtype=torch.float32)
        want = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base_hf_dir), dtype=torch.float32).eval()(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
