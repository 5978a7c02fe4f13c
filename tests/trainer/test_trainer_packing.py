"""Padding-free packing keeps examples apart, and the CUDA fast path computes what the plain path computes.

The fast path (`trainer/cuda_fast.py`) flattens several examples into one row. That is only correct if no token
attends across an example boundary. These tests run a tiny randomly initialised Llama (the architecture of the
real base models) on the CPU and check, per example, that the packed forward equals running each example alone;
that the loss of TRL's padding-free batch equals the loss of its padded batch; and that the fused LoRA function
gives PEFT's outputs and gradients. A negative control shows the check would catch attention leaking across
examples. On CUDA the same attention function calls FlashAttention's varlen kernel; the GPU benchmark
(`benchmarks/gpu_checks.py`) repeats these comparisons there.
"""

from __future__ import annotations

import pytest
from skips import import_or_skip  # noqa: E402

torch = import_or_skip("torch")
transformers = import_or_skip("transformers")

from trainer import cuda_fast  # noqa: E402

LENGTHS = (5, 9, 7)


def tiny_llama(attn: str = "sdpa"):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    if attn == cuda_fast.ATTN_IMPLEMENTATION:
        cuda_fast.use_varlen_attention(model)
    else:
        model.set_attn_implementation(attn)
    return model


def examples():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 97, (n,), generator=gen) for n in LENGTHS]


def packed(seqs):
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


def split(logits, seqs):
    return logits[0].split([len(s) for s in seqs])


@torch.no_grad()
def test_packed_logits_equal_each_example_alone():
    model = tiny_llama(cuda_fast.ATTN_IMPLEMENTATION)
    seqs = examples()
    alone = [model(input_ids=s[None]).logits[0] for s in seqs]
    ids, pos, cu = packed(seqs)
    out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                max_length_q=max(LENGTHS), max_length_k=max(LENGTHS)).logits
    for got, want in zip(split(out, seqs), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_boundaries_found_from_position_ids_alone():
    """Without `cu_seq_lens` (another collator), the restarts of `position_ids` still separate the examples."""
    model = tiny_llama(cuda_fast.ATTN_IMPLEMENTATION)
    seqs = examples()
    alone = [model(input_ids=s[None]).logits[0] for s in seqs]
    ids, pos, _ = packed(seqs)
    out = model(input_ids=ids, position_ids=pos).logits
    for got, want in zip(split(out, seqs), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_negative_control_leaking_attention_is_detected():
    """One causal sequence over the packed row (what packing without a boundary-aware kernel does) differs."""
    model = tiny_llama("sdpa")
    seqs = examples()
    alone = [model(input_ids=s[None]).logits[0] for s in seqs]
    ids, _, _ = packed(seqs)
    leaked = split(model(input_ids=ids).logits, seqs)
    assert torch.allclose(leaked[0], alone[0], atol=1e-5)  # the first example has nothing before it
    assert not torch.allclose(leaked[1], alone[1], atol=1e-3)
    assert not torch.allclose(leaked[2], alone[2], atol=1e-3)


@torch.no_grad()
def test_padded_and_padding_free_batches_give_the_same_loss():
    """TRL's own collator, padded (SDPA, the baseline) and padding-free (the fast path): same loss."""
    trl = import_or_skip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    seqs = examples()
    rows = []
    for s in seqs:
        labels = s.clone()
        labels[: len(s) // 2] = -100  # the prompt half is masked, as in completion-only training
        rows.append({"input_ids": s.tolist(), "labels": labels.tolist()})
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(LENGTHS))

    baseline = tiny_llama("sdpa")
    fast = tiny_llama(cuda_fast.ATTN_IMPLEMENTATION)
    loss_padded = baseline(**padded).loss
    loss_flat = fast(**{k: v for k, v in flat.items() if k != "seq_idx"}).loss
    torch.testing.assert_close(loss_flat, loss_padded, atol=1e-5, rtol=1e-5)
    assert trl  # imported for the collator


def test_padded_batches_still_use_their_mask():
    """Evaluation/generation batches with padding go through SDPA with the padding mask, as before."""
    seqs = examples()
    width = max(LENGTHS)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        want = tiny_llama("sdpa")(input_ids=ids, attention_mask=mask).logits
        got = tiny_llama(cuda_fast.ATTN_IMPLEMENTATION)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-4)


def test_fused_lora_matches_peft(monkeypatch):
    """The fused LoRA function: PEFT's outputs and LoRA gradients (bf16, so bf16 tolerances)."""
    peft = import_or_skip("peft")

    def run(fused: bool):
        model = tiny_llama("sdpa").to(torch.bfloat16).train()
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        torch.manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)  # PEFT starts B at zero; make the adapter do something
        if fused:
            monkeypatch.setattr(cuda_fast, "_FUSE_ON_CPU", True)
            cuda_fast.enable_fused_lora()
        try:
            ids = torch.cat(examples())[None]
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
            return out.logits.float(), out.loss.float(), grads
        finally:
            cuda_fast.disable_fused_lora()

    logits_ref, loss_ref, grads_ref = run(False)
    logits, loss, grads = run(True)
    torch.testing.assert_close(loss, loss_ref, atol=2e-2, rtol=2e-2)
    assert (logits - logits_ref).norm() / logits_ref.norm() < 2e-2
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        rel = (grads[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp(min=1e-12)
        assert rel < 5e-2, (name, float(rel))


def test_apply_without_cuda_changes_nothing():
    class Args:  # stands in for SFTConfig
        packing = False
        max_length = 1024

    kwargs = {"args": Args()}
    model = object()
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU behaviour")
    assert cuda_fast.apply(kwargs, model, None) == (kwargs, model)
    assert kwargs["args"].packing is False


def test_microbatch_estimate_fits_the_1b_model_without_checkpointing():
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
    per_token = cuda_fast.activation_bytes_per_token(cfg, checkpointing=False)
    assert 1.5e6 < per_token < 5e6  # ~1.3 MB kept per token, estimated generously
    assert cuda_fast.activation_bytes_per_token(cfg, checkpointing=True) < per_token / 5


def test_fused_lora_with_dropout_matches_the_same_mask(monkeypatch):
    """LoRA dropout (the trainer's default 0.05) in the fused function: exact against autograd on the same mask."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 16, dtype=torch.float64)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, 4, dtype=torch.float64, requires_grad=True)
    p, scale = 0.3, 2.0
    mask = torch.rand(10, 16) >= p
    monkeypatch.setattr(cuda_fast, "_dropout_mask", lambda x2, p: mask)
    y = cuda_fast._FusedLoraLinear.apply(x, w, None, a, b, scale, p)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), g)
    xd = x.reshape(10, 16) * mask / (1 - p)
    want_y = (x.reshape(10, 16) @ w.t() + scale * (xd @ a.t()) @ b.t()).view_as(y)
    want = torch.autograd.grad(want_y, (x, a, b), g)
    torch.testing.assert_close(y, want_y)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad, want_grad)
