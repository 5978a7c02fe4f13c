"""The GPU fast path sizes its micro-batches to the data and scales the learning rate with them.

Why it matters (docs/gpu-speed.md, benchmarks/gpu_time_to_quality.py): token-sized micro-batches take far fewer
optimizer steps than the configured batch; with the learning rate unchanged the run ends an epoch well short of
the padded run's loss, and a small curated set would be done in a handful of steps. These checks run on a CPU:
the sizing is arithmetic on the rows, and `LOOP_CUDA_FAST=force` runs apply() without a GPU.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainer import cuda_fast  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402


def test_small_sets_get_at_least_min_steps_per_epoch():
    # 120k tokens, 24 steps wanted: 5,000 tokens a step, cut to whole 512-token bins
    assert cuda_fast.microbatch_for_dataset(120_000, 512, 16384, 24) == 4608


def test_large_sets_keep_the_memory_sized_microbatch():
    assert cuda_fast.microbatch_for_dataset(10_000_000, 1024, 16384, 24) == 16384


def test_microbatch_never_smaller_than_the_configured_batch():
    # 8 examples of ~516 tokens: a micro-batch below ~4k tokens would only run slower per token
    assert cuda_fast.microbatch_for_dataset(30_000, 1024, 16384, 24, floor_tokens=8 * 516) == 4096
    assert cuda_fast.microbatch_for_dataset(100, 1024, 16384, 24) == 1024  # never below one bin


def test_min_steps_zero_sizes_from_memory_alone():
    assert cuda_fast.microbatch_for_dataset(30_000, 1024, 16384, 0) == 16384


def test_accumulation_and_processes_share_the_steps():
    # two micro-batches make a step: each gets half the tokens
    assert cuda_fast.microbatch_for_dataset(480_000, 1024, 16384, 24, parallel=2) == 9216


def test_learning_rate_scales_linearly_by_default_and_is_bounded():
    assert cuda_fast.lr_scale(8192, 4096, "linear") == pytest.approx(2.0)
    assert cuda_fast.lr_scale(8192, 4096, "sqrt") == pytest.approx(2**0.5)
    assert cuda_fast.lr_scale(8192, 4096, "none") == 1.0
    assert cuda_fast.lr_scale(16384, 1024, "linear") == cuda_fast.MAX_LR_SCALE


def test_unknown_scaling_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="fast_lr_scaling"):
        cuda_fast.lr_scale(8192, 4096, "cubic")
    problems = TrainConfig(fast_lr_scaling="cubic", fast_min_steps=-1).validate()
    assert any("fast_lr_scaling" in p for p in problems) and any("fast_min_steps" in p for p in problems)


def test_dataset_stats_read_lists_and_datasets_cut_at_max_length():
    from datasets import Dataset

    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (100, 300, 2000)]
    for source in (rows, Dataset.from_list(rows)):
        stats = cuda_fast.dataset_stats(source, 1024)
        assert (stats.examples, stats.tokens) == (3, 100 + 300 + 1024)
    assert cuda_fast.dataset_stats(Dataset.from_list([{"messages": "x"}]), 1024) is None
    assert cuda_fast.dataset_stats(None, 1024) is None


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg)


def test_apply_sizes_batches_and_learning_rate_from_the_training_rows(monkeypatch):
    monkeypatch.setenv("LOOP_CUDA_FAST", "force")
    monkeypatch.setattr(cuda_fast, "_FUSE_ON_CPU", False)
    # a card whose memory would allow 16k-token micro-batches
    monkeypatch.setattr(cuda_fast, "tokens_per_microbatch", lambda model, max_length, requested=None: (16384, False))
    rows = [{"input_ids": [5] * 200, "labels": [5] * 200} for _ in range(480)]  # 96,000 tokens
    kwargs = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-3, max_length=256)
    try:
        cuda_fast.apply(kwargs, _tiny_model(), TrainConfig(), train_rows=rows)
    finally:
        cuda_fast.disable_fused_lora()
    # 96,000 tokens / 24 steps = 4,000 -> 3,840 (15 bins of 256); lr x 3,840 / (4 x 200) = 4.8, bounded at 4
    assert kwargs["per_device_train_batch_size"] == 15
    assert kwargs["learning_rate"] == pytest.approx(4e-3)
    assert kwargs["packing"] is True


def test_apply_keeps_the_learning_rate_when_the_token_budget_is_set(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("LOOP_CUDA_FAST", "force")
    monkeypatch.setattr(cuda_fast, "_FUSE_ON_CPU", False)
    rows = [{"input_ids": [5] * 200, "labels": [5] * 200} for _ in range(480)]
    kwargs = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_length=256)
    try:
        cuda_fast.apply(kwargs, _tiny_model(), SimpleNamespace(tokens_per_microbatch=1024), train_rows=rows)
    finally:
        cuda_fast.disable_fused_lora()
    assert kwargs["learning_rate"] == 1e-3
    assert kwargs["per_device_train_batch_size"] == 4
