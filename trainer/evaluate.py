"""Held-out loss on the assistant's tokens: the number variants are judged on.

The same function scores the snapshot's eval split and the general-ability regression set shipped in
trainer/regression_set.jsonl (forgetting shows as a rising regression loss). The loss is the mean
cross-entropy over every answer token of every example (token-weighted, like training), prompt excluded.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

from trainer.data import IGNORE_INDEX, load_examples, tokenize_examples

REGRESSION_SET = Path(__file__).with_name("regression_set.jsonl")


def regression_examples(path: str | Path | None = None) -> list[dict]:
    """The general-ability regression set (the shipped one unless `path` is given)."""
    return load_examples(Path(path) if path else REGRESSION_SET)


def load_regression_set(config=None) -> list[dict]:
    """The regression set a TrainConfig names (config.regression_set; "" or None = the shipped one)."""
    return regression_examples(getattr(config, "regression_set", None) or None)


def load_for_eval(model_dir: str | Path, base: str | None = None):
    """(model, tokenizer) from a full HF model directory or a LoRA adapter directory.

    An adapter directory (adapter_config.json) is applied on top of `base`, or on top of the base model
    the adapter records when `base` is None.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base = base or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{model_dir} is a LoRA adapter that does not name its base model; pass base=")
        tokenizer_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else base
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(model_dir))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.eval()
    return model, tokenizer


def eval_loss(model_or_dir, examples: list[dict], tokenizer=None, max_length: int = 512,
              batch_size: int = 4, base: str | None = None, disable_adapter: bool = False) -> float:
    """Mean cross-entropy per answer token of `examples` (nan when no example has an answer token).

    `model_or_dir` is a loaded causal LM (plain or PEFT; `tokenizer` required) or a directory for
    load_for_eval. `disable_adapter=True` scores a PEFT model's base weights (the starting point).
    """
    import torch

    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = load_for_eval(model_or_dir, base=base)
    else:
        if tokenizer is None:
            raise ValueError("eval_loss needs the tokenizer when given a model object")
        model = model_or_dir
    rows = tokenize_examples(tokenizer, examples, max_length).rows
    if not rows:
        return math.nan
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if disable_adapter else nullcontext()
    try:
        with torch.no_grad(), adapter_off:
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                width = max(len(row["input_ids"]) for row in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                for i, row in enumerate(batch):
                    n = len(row["input_ids"])
                    ids[i, :n] = torch.tensor(row["input_ids"])
                    attention[i, :n] = 1
                    labels[i, :n] = torch.tensor(row["labels"])
                logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
                # Position t predicts token t + 1.
                shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
                shift_labels = labels[:, 1:].reshape(-1).to(device)
                loss = torch.nn.functional.cross_entropy(
                    shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
                )
                total += loss.item()
                count += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        if was_training:
            model.train()
    return total / count if count else math.nan


def load_general_replay(config=None) -> list[dict]:
    """The general-ability replay examples (``TrainConfig.general_replay``); [] when switched off."""
    choice = getattr(config, "general_replay", "") if config is not None else ""
    if choice == "off":
        return []
    path = Path(choice) if choice else Path(__file__).with_name("general_replay.jsonl")
    return regression_examples(path)
