"""FLOP accounting for the GPU training benchmark (the MFU convention, in one place).

Convention: the FLOPs the training step actually has to execute for the real (non-padding) tokens, against the
bf16 matrix rate measured on the same card in the same run (an 8192^3 bf16 matmul on random data).

Per real token, for a decoder with frozen base weights and LoRA adapters:
* linear layers (q, k, v, o, gate, up, down): forward 2 x params, backward 2 x params for the activation
  gradients only (frozen weights get no weight gradient), plus another forward when gradient checkpointing
  recomputes the layers;
* LM head (tied, frozen): 2 x vocab x hidden forward and the same backward, only for tokens that carry a label
  (TRL's fused head projects only those);
* LoRA: 2r(in+out) forward, 4r(in+out) backward, per adapted linear;
* attention, per example of length s and per layer: 2 s^2 d forward (causal half of QK^T and PV), 2.5 x that
  backward (FlashAttention's five matmuls against two), plus one more forward when checkpointing.
Padding and the masked half of causal attention are never counted, so a padded baseline's MFU shows its waste.
"""

from __future__ import annotations


def linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)


def step_flops(cfg: dict, real_tokens: float, label_tokens: float, sum_sq_lengths: float, rank: int,
               checkpointing: bool) -> float:
    layers = cfg["num_hidden_layers"]
    shapes = linear_shapes(cfg)
    lin_params = layers * sum(i * o for i, o in shapes)
    lora_per_token = layers * sum(6 * rank * (i + o) for i, o in shapes)
    forward_passes = 2 if checkpointing else 1
    linear = real_tokens * 2 * lin_params * (forward_passes + 1)
    head = label_tokens * 4 * cfg["vocab_size"] * cfg["hidden_size"]
    lora = real_tokens * (lora_per_token + (layers * sum(2 * rank * (i + o) for i, o in shapes) if checkpointing else 0))
    attn_fwd = 2 * sum_sq_lengths * cfg["hidden_size"] * layers
    attention = attn_fwd * (forward_passes + 2.5)
    return linear + head + lora + attention
