"""How large the CUDA fast path makes a micro-batch, and how it scales the learning rate with it.

Contract (pure functions, re-exported by trainer/cuda_fast.py, whose docstring gives the reasons):
``tokens_per_microbatch(model, max_length, requested)`` -> (tokens per micro-batch, a multiple of max_length
that fits this card's free memory with the kernels of the fast path; whether gradient checkpointing is
needed). ``activation_bytes_per_token`` is the estimate it uses. ``dataset_stats(rows, max_length)`` ->
``DatasetStats`` (examples, tokens cut at max_length, mean) of tokenised rows, None when unknown.
``microbatch_for_dataset`` bounds a micro-batch so that one epoch has at least ``min_steps`` optimizer
steps; ``lr_scale`` is the learning-rate factor for a micro-batch of more tokens than the configured batch.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_MAX_TOKENS_PER_MICROBATCH = 16384
DEFAULT_MIN_STEPS_PER_EPOCH = 24
DEFAULT_LR_SCALING = "linear"
MAX_LR_SCALE = 4.0  # a bound on the rule, not part of it: never more than 4x the configured rate
LR_SCALING_RULES = ("none", "sqrt", "linear")


class DatasetStats:
    """Examples and tokens (each cut at max_length) of the training rows."""

    def __init__(self, examples: int, tokens: int):
        self.examples, self.tokens = examples, tokens
        self.mean_tokens = tokens / examples if examples else 0.0


def dataset_stats(rows: Any, max_length: int) -> DatasetStats | None:
    """Stats of tokenised rows (list of dicts or a `datasets.Dataset` with `input_ids`); None when unknown."""
    if rows is None:
        return None
    try:
        if hasattr(rows, "column_names"):  # datasets.Dataset: read the one column, not every row
            if "input_ids" not in rows.column_names:
                return None
            lengths = [len(ids) for ids in rows["input_ids"]]
        else:
            lengths = [len(row["input_ids"]) for row in rows]
    except (KeyError, TypeError):
        return None
    if not lengths:
        return None
    return DatasetStats(len(lengths), sum(min(n, max_length) for n in lengths))


def microbatch_for_dataset(total_tokens: int, max_length: int, cap_tokens: int, min_steps: int,
                           parallel: int = 1, floor_tokens: float = 0) -> int:
    """Tokens per micro-batch (a multiple of max_length, at most `cap_tokens`) that give one epoch of
    `total_tokens` at least `min_steps` optimizer steps when `parallel` micro-batches (accumulation x
    processes) make one step; min_steps <= 0 keeps `cap_tokens`. Never below `floor_tokens` (the configured
    batch's tokens, to the nearest bin: smaller micro-batches would only be slower per token) nor one bin."""
    cap = max(max_length, cap_tokens // max_length * max_length)
    if min_steps <= 0:
        return cap
    wanted = int(total_tokens / (min_steps * max(1, parallel))) // max_length * max_length
    floor = max(max_length, round(floor_tokens / max_length) * max_length)
    return min(cap, max(floor, wanted))


def lr_scale(tokens_per_microbatch: float, configured_tokens: float, rule: str) -> float:
    """Learning-rate factor for micro-batches of `tokens_per_microbatch` tokens in place of the configured
    batch's `configured_tokens` (batch_size x mean example length): ratio ("linear") or ratio^1/2 ("sqrt"),
    at most MAX_LR_SCALE; 1 for "none"."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"fast_lr_scaling must be one of {LR_SCALING_RULES}, got {rule!r}")
    if rule == "none" or configured_tokens <= 0 or tokens_per_microbatch <= 0:
        return 1.0
    ratio = tokens_per_microbatch / configured_tokens
    return min(MAX_LR_SCALE, ratio**0.5 if rule == "sqrt" else ratio)


def activation_bytes_per_token(text_config: Any, checkpointing: bool) -> float:
    """Rough bytes kept for backward per token (bf16), from what each block saves with the kernels above:
    about 7.5 x hidden + 3 x intermediate values per layer, or one hidden state per layer with checkpointing
    (plus one layer being recomputed). Generous by ~1.5x; only used to size micro-batches."""
    h = text_config.hidden_size
    i = getattr(text_config, "intermediate_size", 4 * h)
    layers = text_config.num_hidden_layers
    per_layer = 7.5 * h + 3 * i
    values = layers * h * 2 + per_layer if checkpointing else layers * per_layer
    return 1.5 * 2 * values


def tokens_per_microbatch(model: torch.nn.Module, max_length: int, requested: int | None = None,
                          device: int | None = None) -> tuple[int, bool]:
    """(tokens per micro-batch, gradient checkpointing needed) for this card; a multiple of `max_length`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if not torch.cuda.is_available():
        return max(max_length, (requested or 4 * max_length) // max_length * max_length), False
    free, total = torch.cuda.mem_get_info(device)
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    if next(base.parameters()).device.type == "cuda":
        weights = 0  # already counted as used
    budget_bytes = 0.6 * free - weights - 2 * 2**30  # room for the LM-head chunks, optimizer, allocator slack
    cap = requested or DEFAULT_MAX_TOKENS_PER_MICROBATCH
    for checkpointing in (False, True):
        fit = int(budget_bytes // activation_bytes_per_token(text_config, checkpointing))
        tokens = min(cap, fit) // max_length * max_length
        if tokens >= max_length:
            return tokens, checkpointing
    return max_length, True
