"""Attention that keeps packed examples apart: the ``"loop_varlen"`` attention of the CUDA fast path.

Contract: ``use_varlen_attention(model)`` registers ``ATTN_IMPLEMENTATION`` with transformers (idempotent,
``register_varlen_attention``) and switches a (possibly PEFT-wrapped) model to it. ``varlen_attention_forward``
then runs a padding-free batch (boundaries as ``cu_seq_lens_q/k`` from TRL's collator, or derived from
``position_ids`` restarting at 0) through PyTorch's own FlashAttention-2 varlen kernel (causal, GQA native), so
each example attends only to itself; padded batches (evaluation, generation) go to SDPA with the usual mask.
Without CUDA (or in an odd dtype) the same function attends example by example (``_per_example_sdpa``: slow,
exact), which is what the CPU tests check. trainer/cuda_fast.py re-exports these names.
"""

from __future__ import annotations

from typing import Any

import torch

ATTN_IMPLEMENTATION = "loop_varlen"


def _boundaries_from_position_ids(position_ids: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32) of the flattened (batch*seq) tokens: a new example starts where the position does not
    continue the previous one, and at every row start. One host sync; the collator normally saves us this."""
    pos = position_ids.expand(batch, seq).reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    starts[::seq] = True
    idx = starts.nonzero().flatten().to(torch.int32)
    cu = torch.cat([idx, torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


_GQA_NATIVE = True  # set False once if this PyTorch's kernel refuses fewer key/value heads than query heads


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout):
    """PyTorch's bundled FlashAttention-2, varlen and causal. q: (T, Hq, D), k/v: (T, Hkv, D)."""
    global _GQA_NATIVE
    if k.shape[1] != q.shape[1] and not _GQA_NATIVE:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    try:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout, True, False, scale=scale
        )[0]
    except RuntimeError:
        if k.shape[1] == q.shape[1] or not _GQA_NATIVE:
            raise
        _GQA_NATIVE = False
        return _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout)


def _per_example_sdpa(q, k, v, cu, scale):
    """Reference path (CPU, odd dtypes): causal SDPA example by example. q: (T, Hq, D)."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
        )
    return torch.cat(outs, 0)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' `AttentionInterface` (q/k/v come as (B, H, S, D); returns (B, S, H, D))."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, seq, dim = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    position_ids = kwargs.get("position_ids")
    same_len = key.shape[2] == seq
    if cu_q is None or not same_len:
        # Padded batches, generation with a cache, or a plain single sequence: SDPA with the usual mask.
        if attention_mask is not None or not same_len or seq == 1 or position_ids is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        cu_q, max_q = _boundaries_from_position_ids(position_ids, batch, seq)
        cu_k, max_k = cu_q, max_q
    if cu_k is None:
        cu_k, max_k = cu_q, max_q
    cu_q, cu_k = cu_q.to(device=query.device, dtype=torch.int32), cu_k.to(device=query.device, dtype=torch.int32)
    max_q, max_k = int(max_q), int(max_k)
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    scale = scaling if scaling is not None else dim**-0.5
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and dim <= 256:
        out = _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout if module.training else 0.0)
    else:
        out = _per_example_sdpa(q, k, v, cu_q, scale)
    return out.view(batch, seq, heads, dim), None


def varlen_attention_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any):
    """Mask builder paired with `varlen_attention_forward`: a padded batch gets SDPA's mask; a padding-free
    batch (no 2D mask) gets none, since the boundaries travel as `cu_seq_lens`/`position_ids`."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register `"loop_varlen"` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, varlen_attention_mask)
    return ATTN_IMPLEMENTATION


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Switch a (possibly PEFT-wrapped) transformers model to the varlen attention."""
    register_varlen_attention()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
