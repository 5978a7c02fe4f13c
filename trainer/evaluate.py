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

from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, load_examples, tokenize_examples

REGRESSION_SET = Path(__file__).with_name("regression_set.jsonl")


def regression_examples(path: str | Path | None = None) -> list[dict]:
    """The general-ability regression set (the shipped one unless `path` is given)."""
    return load_examples(Path(path) if path else REGRESSION_SET)


def load_regression_set(config: TrainConfig | None = None) -> list[dict]:
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
    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = load_for_eval(model_or_dir, base=base)
    else:
        if tokenizer is None:
            raise ValueError("eval_loss needs the tokenizer when given a model object")
        model = model_or_dir
    rows = tokenize_examples(tokenizer, examples, max_length).rows
    if not rows:
        return math.nan
    scored = masked_nll(model, [row["input_ids"] for row in rows], [answer_mask(row) for row in rows],
                        pad_id(tokenizer), batch_size, disable_adapter)
    total, count = sum(nll for nll, _ in scored), sum(n for _, n in scored)
    return total / count if count else math.nan


def start_loss(model, examples: list[dict], tokenizer, max_length: int, batch_size: int,
               weights_dir: str | Path | None = None) -> float:
    """``eval_loss`` of a PEFT model's starting weights (the adapter off), computed once for the same weights,
    examples and method (trainer/start_cache.py: ``weights_dir`` is where those weights are)."""
    from trainer.start_cache import cached

    spec = {"examples": [e.get("messages") for e in examples], "max_length": max_length, "batch_size": batch_size}
    return cached(weights_dir, model, tokenizer, "start_loss", spec,
                  lambda: eval_loss(model, examples, tokenizer, max_length, batch_size, disable_adapter=True))


def answer_mask(row: dict) -> list[int]:
    """1 where a tokenised row's label is learned (the answer), 0 over the prompt."""
    return [int(label != IGNORE_INDEX) for label in row["labels"]]


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def masked_nll(model, sequences: list[list[int]], loss_masks: list[list[int]], pad: int, batch_size: int = 4,
               disable_adapter: bool = False) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each sequence over the tokens its mask marks.

    The trainer's one padded-batch cross-entropy: the held-out and regression losses (``eval_loss``) and the
    preference measure (``trainer.preference_measure.answer_logprobs``) are both read from it. Sequences are
    right-padded with `pad` in batches of `batch_size`; position t predicts token t + 1, so a mask's first
    entry never counts. `disable_adapter=True` scores a PEFT model's base weights. The model is put in eval
    mode for the call and back in training mode after it if it was.
    """
    import torch

    # Position t predicts token t + 1: the logits wanted are those one before each marked token.
    wanted = [[t - 1 for t, m in enumerate(mask[:len(seq)]) if m and t > 0]
              for seq, mask in zip(sequences, loss_masks)]
    out: list[tuple[float, int]] = []
    for _, ids, at, logits in padded_logits(model, sequences, wanted, pad, batch_size, disable_adapter):
        rows, positions = at.nonzero(as_tuple=True)
        targets = ids[rows, positions + 1].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        sums = torch.zeros(len(ids), dtype=nll.dtype, device=nll.device).index_add_(0, rows.to(nll.device), nll)
        out.extend(zip(sums.tolist(), at.sum(-1).tolist()))
    return out


def padded_logits(model, sequences: list[list[int]], positions: list[list[int]], pad: int, batch_size: int = 4,
                  disable_adapter: bool = False):
    """Yield (index of the batch's first sequence, its right-padded ids, the mask of the wanted positions, the
    model's float32 logits at them, one row per position in mask order) batch by batch.

    The one batched no-grad forward of the judge: ``masked_nll`` and the general-answers check
    (trainer/general_kept.py) both read it. ``positions[i]`` lists the positions of sequence i whose next-token
    logits are wanted; the LM head runs on those only where the model allows it (``logits_at``). The model is in
    eval mode while the batches are consumed and back in training mode afterwards if it was;
    ``disable_adapter=True`` runs a PEFT model's base weights.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if disable_adapter else nullcontext()
    try:
        with torch.no_grad(), adapter_off:
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                width = max(len(row) for row in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                at = torch.zeros((len(batch), width), dtype=torch.bool)
                for i, row in enumerate(batch):
                    ids[i, :len(row)] = torch.tensor(row)
                    attention[i, :len(row)] = 1
                    at[i, positions[start + i]] = True
                forward = {"input_ids": ids.to(device), "attention_mask": attention.to(device)}
                yield start, ids, at, logits_at(model, forward, at.to(device))
    finally:
        if was_training:
            model.train()


# Causal LMs whose logits are exactly ``lm_head(final hidden state)``: no soft-capping, scaling or bias added
# after the head, so the head can run on the positions that count and give the same numbers.
PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})


def logits_at(model, forward: dict, positions):
    """The next-token logits of ``model`` (plain or PEFT, unwrapped) on ``forward`` at ``positions`` (a bool mask
    over the input positions, ``[rows, length]``; position t predicts token t + 1), as float32 rows in mask order.

    The LM head is a fifth of a small model's forward pass and its vocabulary-wide output dominates the memory
    traffic, while a loss or a check reads it only at answer tokens (a third of a padded batch of chat turns, or
    less). So for a plain head (``PLAIN_HEADS``) the decoder runs and the head sees only those positions;
    otherwise the whole forward runs and the positions are picked from its logits. Both give the same numbers
    up to float rounding."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    if getattr(causal.config, "model_type", None) not in PLAIN_HEADS or decoder is None or head is None:
        return model(**forward).logits[positions].float()
    return head(decoder(**forward).last_hidden_state[positions]).float()


def load_general_replay(config: TrainConfig | None = None) -> list[dict]:
    """The general-ability replay examples (``TrainConfig.general_replay``); [] when switched off."""
    choice = getattr(config, "general_replay", "") if config is not None else ""
    if choice == "off":
        return []
    path = Path(choice) if choice else Path(__file__).with_name("general_replay.jsonl")
    return regression_examples(path)
