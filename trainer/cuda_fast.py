"""The CUDA fast path of the trainer: padding-free packing, a varlen attention kernel, fused LoRA, Liger kernels.

Contract (what `trainer/train.py` relies on)
-------------------------------------------
    sft_kwargs, model = apply(sft_kwargs, model, config)

called once, on CUDA only, before the `SFTConfig`/`SFTTrainer` is built from `sft_kwargs`.

* `sft_kwargs` is either the dict of keyword arguments for `SFTConfig(**sft_kwargs)` (what trainer/train.py
  builds), or the dict of keyword arguments for `SFTTrainer(**sft_kwargs)` holding the `SFTConfig` under `args`.
  Either is changed in place and returned, so ignoring the return value is fine. `model` is the base
  `PreTrainedModel` (or an already PEFT-wrapped one); it is patched in place and returned. `config` (the
  trainer's TrainConfig) may be `None`; these attributes are read when present (all optional):
    - `cuda_fast` (bool, default True): False returns both arguments untouched.
    - `tokens_per_microbatch` (int, default: sized from the card's memory, at most 16384, and from the data as
      `fast_min_steps` says): real tokens in one
      forward/backward. Optimizer steps become token-sized: one step covers about this many tokens (times
      `gradient_accumulation_steps` and the number of processes), so `max_steps`/`save_steps` count larger steps
      and an epoch has fewer of them. 0: keep the configured examples per micro-batch (padding removed, batches
      and optimizer steps exactly those of the padded run; examples must arrive truncated to max_length).
    - `fast_min_steps` (int, default DEFAULT_MIN_STEPS_PER_EPOCH = 24): when `tokens_per_microbatch` is unset
      and the training rows are known (`train_rows=`, or `train_dataset` in `sft_kwargs`), the micro-batch is
      made no larger than lets one epoch have this many optimizer steps, so a small curated set is not done in
      a handful of steps; never smaller than the configured batch's tokens. 0: size from memory alone.
    - `fast_lr_scaling` ("linear" (default), "sqrt" or "none"): when the micro-batches are sized here and the
      rows are known, the learning rate is multiplied by k = tokens per micro-batch / tokens of the configured
      batch (batch_size x mean example length), or by k^1/2, at most MAX_LR_SCALE = 4. The configured rate was
      chosen for `batch_size` examples per step; a step over k times the tokens has k times less gradient
      noise, and at these batch sizes (far below a language model's critical batch) the best rate grows about
      linearly with the batch. Measured (docs/gpu-speed.md): with the rate unchanged, 16k-token steps end an
      epoch far short of the padded run's loss; scaled linearly they reach it in a sixth of its time.
    - `fast_liger` (default True), `fast_fused_lora` (default True): switch the two kernel groups off for A/B tests.
* The environment variable `LOOP_CUDA_FAST=0` has the same effect as `cuda_fast=False`; `LOOP_CUDA_FAST=force`
  runs the same path on a CPU (reference attention, no Liger) for dry runs of scripts.
* Nothing here is needed for correctness; any failure to apply a part is logged and that part is skipped.
* A custom `data_collator` in `sft_kwargs` cannot be combined with TRL's padding-free collator: the packing part is
  then skipped (the kernels still apply).

What it switches on, and why each part is safe
----------------------------------------------
1. Padding-free packing (`packing=True, packing_strategy="bfd"`): TRL tokenizes and truncates as before (bins are
   `max_length` long, so an over-long example is cut exactly as without packing), then best-fit-decreasing packs
   examples into bins, and the padding-free collator flattens `tokens_per_microbatch // max_length` bins into one
   row with `position_ids` restarting at 0 for every example and `cu_seq_lens_q/k` marking the boundaries. The first
   label of each example is masked, as a padded batch masks it implicitly. No padding token is computed.
2. Attention that keeps packed examples apart: the implementation `"loop_varlen"` registered here calls PyTorch's
   own FlashAttention-2 varlen kernel (`aten::_flash_attention_forward` with `cu_seqlens`, causal, GQA native), so
   each example attends only to itself and the cost is sum(len_i^2), not (sum len_i)^2. Padded batches (evaluation,
   generation) go to SDPA with the usual mask. Without CUDA the same function attends example by example (slow,
   exact): that is what the CPU test checks. (trainer/cuda_attention.py)
3. Fused LoRA linear: PEFT computes `base(x) + B(A(dropout(x))) * s` as five kernels plus casts, each a full pass
   over the layer's activations. For vanilla LoRA on a bf16/fp16 `nn.Linear` (LoRA dropout allowed) we run one
   autograd function: `y = x W^T; y += s (x A^T) B^T` (the add rides in the GEMM epilogue), and in backward
   `dx = g W + s (g B) A`, `dA = s (g B)^T x`, `dB = s g^T (x A^T)` (x dropped out where p > 0). Same math, about
   a third of the memory traffic. QLoRA's 4-bit base layers keep PEFT's path.
4. Liger Kernel's RMSNorm, RoPE and SwiGLU (fused Triton kernels). Its fused linear cross-entropy is not used:
   TRL >= 1.x already computes the loss through its own chunked fused LM head without materialising the logits.
5. No gradient checkpointing when the activations of one micro-batch fit in memory (estimated in
   trainer/cuda_sizing.py): recomputing the forward costs about a third of the step for nothing when memory is there.
torch.compile is not switched on: with varying packed shapes it recompiled and did not pay (docs/gpu-speed.md).

Modules: this one holds `apply`, the fused LoRA and the Liger switch; the varlen attention is in
trainer/cuda_attention.py and the micro-batch sizing in trainer/cuda_sizing.py, their names importable from here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from trainer.cuda_attention import (  # noqa: F401 - re-exported: callers use cuda_fast.<name>
    ATTN_IMPLEMENTATION,
    _flash_varlen,
    _per_example_sdpa,
    register_varlen_attention,
    use_varlen_attention,
    varlen_attention_forward,
    varlen_attention_mask,
)
from trainer.cuda_sizing import (  # noqa: F401 - re-exported; _batching reads tokens_per_microbatch from here
    DEFAULT_LR_SCALING,
    DEFAULT_MAX_TOKENS_PER_MICROBATCH,
    DEFAULT_MIN_STEPS_PER_EPOCH,
    LR_SCALING_RULES,
    MAX_LR_SCALE,
    DatasetStats,
    activation_bytes_per_token,
    dataset_stats,
    lr_scale,
    microbatch_for_dataset,
    tokens_per_microbatch,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- fused LoRA
class _FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (drop(x) A^T) B^T with the LoRA add fused into the GEMM epilogue; W (and b) frozen.

    drop(x) = x * mask / (1 - p) with a Bernoulli(1 - p) mask when LoRA dropout p > 0 (PEFT's nn.Dropout, drawn
    here instead); the mask is kept as bool for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, p):
        dtype = weight.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        mask = None
        xd = x2
        if p > 0.0:
            mask = _dropout_mask(x2, p)
            xd = x2 * mask * (1.0 / (1.0 - p))
        xa = xd @ a.t()
        y = torch.nn.functional.linear(x2, weight, bias)
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(xd, weight, a, b, xa, mask)
        ctx.scale, ctx.p, ctx.shape, ctx.x_dtype = scale, p, shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        xd, weight, a, b, xa, mask = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]).to(weight.dtype)
        gb = (g @ b).mul_(ctx.scale)  # (T, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            if mask is None:
                dx.addmm_(gb, a)
            else:
                dx.add_((gb @ a).mul_(mask).mul_(1.0 / (1.0 - ctx.p)))
            dx = dx.view(ctx.shape).to(ctx.x_dtype)
        da = (gb.t() @ xd).to(ctx.a_dtype) if ctx.needs_input_grad[3] else None
        db = (g.t() @ xa).mul_(ctx.scale).to(ctx.b_dtype) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None, None


def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.rand(x.shape, device=x.device) >= p


_FUSE_ON_CPU = False  # tests flip this to check the math where no GPU is
_ORIGINAL_LORA_FORWARD = None


def _fused_lora_adapter(layer, x):
    """The single active vanilla adapter of `layer` if the fused path computes exactly what PEFT would."""
    if layer.disable_adapters or layer.merged or not (x.is_cuda or _FUSE_ON_CPU):
        return None
    if not torch.is_grad_enabled() and not layer.training:
        return None  # inference: PEFT's path is fine and handles every case
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or base.weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, (torch.nn.Identity, torch.nn.Dropout)) or layer.lora_B[name].bias is not None:
        return None
    if getattr(layer, "fan_in_fan_out", False) or base.weight.requires_grad:
        return None
    return name


def _lora_forward(self, x, *args, **kwargs):
    name = None if (args or kwargs) else _fused_lora_adapter(self, x)
    if name is None:
        return _ORIGINAL_LORA_FORWARD(self, x, *args, **kwargs)
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return _FusedLoraLinear.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), p
    )


def enable_fused_lora() -> bool:
    """Route eligible PEFT `lora.Linear` forwards through `_FusedLoraLinear` (process-wide, idempotent)."""
    global _ORIGINAL_LORA_FORWARD
    from peft.tuners.lora import layer as lora_layer

    if _ORIGINAL_LORA_FORWARD is None:
        _ORIGINAL_LORA_FORWARD = lora_layer.Linear.forward
        lora_layer.Linear.forward = _lora_forward
    return True


def disable_fused_lora() -> None:
    global _ORIGINAL_LORA_FORWARD
    from peft.tuners.lora import layer as lora_layer

    if _ORIGINAL_LORA_FORWARD is not None:
        lora_layer.Linear.forward = _ORIGINAL_LORA_FORWARD
        _ORIGINAL_LORA_FORWARD = None


# ------------------------------------------------------------------------------------------------------- Liger
def apply_liger(model: torch.nn.Module) -> bool:
    """Liger's RMSNorm, RoPE and SwiGLU on the model instance (not its fused cross-entropy: TRL has its own)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(
        model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True



# ------------------------------------------------------------------------------------------------------- apply
def _flag(config: Any, name: str, default: bool) -> bool:
    return bool(getattr(config, name, default)) if config is not None else default


class _Fields:
    """Attribute access to an SFTConfig object or to a dict of SFTConfig keyword arguments (missing: default)."""

    _DEFAULTS = {"max_length": 1024, "gradient_checkpointing": True, "per_device_train_batch_size": 8}

    def __init__(self, target: Any):
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        target = self._target
        if isinstance(target, dict):
            return target.get(name, self._DEFAULTS.get(name))
        return getattr(target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        target = self._target
        if isinstance(target, dict):
            target[name] = value
            if name == "gradient_checkpointing" and "activation_checkpointing" in target:
                target["activation_checkpointing"] = value
        else:
            setattr(target, name, value)
            # transformers >= 5.2x: `gradient_checkpointing` became an alias resolved in __post_init__; after it,
            # the Trainer reads `activation_checkpointing`, so both must change on a built config.
            if name == "gradient_checkpointing" and hasattr(target, "activation_checkpointing"):
                target.activation_checkpointing = value

    def checkpointing(self) -> bool:
        target = self._target
        if isinstance(target, dict):
            value = target.get("activation_checkpointing", target.get("gradient_checkpointing"))
            return bool(self._DEFAULTS["gradient_checkpointing"] if value is None else value)
        value = getattr(target, "activation_checkpointing", None)
        return bool(target.gradient_checkpointing if value is None else value)


def _batching(args: _Fields, model: Any, config: Any, stats: DatasetStats | None = None) -> str:
    """Padding-free batches: token-sized packed micro-batches, or (tokens_per_microbatch=0) the configured
    examples per micro-batch flattened into one row."""
    requested = getattr(config, "tokens_per_microbatch", None) if config is not None else None
    if requested == 0:
        # The batches, and so the optimizer's trajectory, are those of the padded run, without the padding.
        # TRL then skips truncation: the examples must come truncated (trainer/data.py truncates them).
        max_length = args.max_length or 1024
        worst = (args.per_device_train_batch_size or 8) * max_length  # every example at max_length
        _, checkpointing = tokens_per_microbatch(model, max_length, worst)
        args.packing = False
        args.padding_free = True
        args.max_length = None
        args.gradient_checkpointing = bool(args.checkpointing() and checkpointing)
        return f"padding-free(examples per micro-batch as configured, checkpointing={args.checkpointing()})"
    max_length = args.max_length or 1024
    tokens, checkpointing = tokens_per_microbatch(model, max_length, requested or None)
    configured_batch = args.per_device_train_batch_size or 8
    parallel = max(1, int(args.gradient_accumulation_steps or 1)) * _world_size()
    note = ""
    if stats is not None and not requested:
        min_steps = int(getattr(config, "fast_min_steps", DEFAULT_MIN_STEPS_PER_EPOCH) if config is not None
                        else DEFAULT_MIN_STEPS_PER_EPOCH)
        tokens = microbatch_for_dataset(stats.tokens, max_length, tokens, min_steps, parallel,
                                        floor_tokens=configured_batch * stats.mean_tokens)
        rule = (getattr(config, "fast_lr_scaling", DEFAULT_LR_SCALING) if config is not None
                else DEFAULT_LR_SCALING) or "none"
        factor = lr_scale(min(tokens, stats.tokens), configured_batch * stats.mean_tokens, rule)
        if factor != 1.0 and args.learning_rate:
            args.learning_rate = float(args.learning_rate) * factor
            note = f", lr x{factor:.2f} ({rule}) = {args.learning_rate:.3g}"
    args.packing = True
    args.packing_strategy = "bfd"
    args.padding_free = True
    args.per_device_train_batch_size = max(1, tokens // max_length)
    args.per_device_eval_batch_size = max(1, tokens // max_length)
    args.gradient_checkpointing = bool(args.checkpointing() and checkpointing)
    return f"packing({tokens} tokens/micro-batch, checkpointing={args.checkpointing()}{note})"



def _world_size() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def apply(sft_kwargs: dict, model: Any, config: Any = None, train_rows: Any = None) -> tuple[dict, Any]:
    """Switch on the CUDA fast path (see the module docstring for the contract). Returns (sft_kwargs, model).

    `train_rows`: the tokenised training rows ({"input_ids", ...}: a list or a `datasets.Dataset`), used to
    size micro-batches and scale the learning rate to the data; `sft_kwargs["train_dataset"]` is used when absent."""
    mode = os.environ.get("LOOP_CUDA_FAST", "1")
    if mode == "0" or not _flag(config, "cuda_fast", True):
        return sft_kwargs, model
    if not torch.cuda.is_available():
        if mode != "force":  # "force": dry runs of the same code path on a CPU (reference kernels, no Liger)
            return sft_kwargs, model
        global _FUSE_ON_CPU
        _FUSE_ON_CPU = True
    args = _Fields(sft_kwargs["args"] if "args" in sft_kwargs else sft_kwargs)
    applied = []

    try:
        use_varlen_attention(model)
        applied.append("varlen-attention")
    except Exception as exc:  # noqa: BLE001 - any failure: keep the model as it was
        log.warning("fast path: varlen attention not applied (%s); packing is skipped too", exc)
        return sft_kwargs, model

    if sft_kwargs.get("data_collator") is not None:
        log.warning("fast path: a custom data_collator is set; padding-free packing skipped")
    elif torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        log.warning("fast path: FlashAttention needs compute capability >= 8.0; padding-free packing skipped")
    else:
        rows = train_rows if train_rows is not None else sft_kwargs.get("train_dataset")
        applied.append(_batching(args, model, config, dataset_stats(rows, args.max_length or 1024)))

    if _flag(config, "fast_liger", True):
        try:
            if apply_liger(model):
                args.use_liger_kernel = False  # applied here; TRL's own switch would reject the fused head anyway
                applied.append("liger(rms_norm, rope, swiglu)")
        except Exception as exc:  # noqa: BLE001
            log.warning("fast path: Liger kernels not applied (%s)", exc)

    if _flag(config, "fast_fused_lora", True):
        try:
            enable_fused_lora()
            applied.append("fused-lora")
        except Exception as exc:  # noqa: BLE001
            log.warning("fast path: fused LoRA not applied (%s)", exc)

    log.info("CUDA fast path: %s", ", ".join(applied))
    global LAST_APPLIED
    LAST_APPLIED = list(applied)
    return sft_kwargs, model


LAST_APPLIED: list[str] = []
