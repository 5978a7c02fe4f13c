"""Typed configuration for exporting a trained variant to GGUF and verifying the quantised file.

`ExportConfig` says how a variant becomes a GGUF (merge, convert, quantise); `VerifyConfig` (nested in it as
`verify`) says what the quantised file must show before anything may promote it. Both are plain dataclasses whose
`validate()` returns every problem at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Quantisations offered. "f32"/"f16"/"bf16" mean no quantisation (the converter writes that type directly); the rest
# go through llama.cpp's own quantiser (`llama_cpp.llama_model_quantize`). IQ* types are left out: they need an
# importance matrix, which this pipeline does not compute.
FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0",
    "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
)
SUPPORTED_QUANTIZATIONS = FLOAT_TYPES + QUANT_TYPES
# Types the token embedding and output tensors may be given when the rest is quantised (`embedding_type`).
EMBEDDING_TYPES = ("f32", "f16", "Q8_0")

# Models below this many parameters count as "small": quantisation "auto" gives Q8_0 (a 135M model loses too much at
# 4 bits and is cheap to serve at 8), and intermediate type "auto" gives f32 (exact for the quantiser's input).
# Larger (1B-class) models get Q4_K_M and a 16-bit intermediate.
SMALL_MODEL_PARAMS = 500_000_000

# Default gate per quantisation when VerifyConfig leaves a threshold as None:
# (min probe agreement, max relative held-out loss delta). Measured on SmolLM2-135M-Instruct (docs/export.md):
# f32 100% / 0.006%, Q8_0 100% / 0.51%, Q4_K_M 80% / 0.71%, Q2_K 15% / 11.5%. The Q8_0 row is the issue's own
# figure (80%, 5%); the others leave lower-bit types more drift, since that drift is the price asked for, while
# still refusing a broken conversion (wrong weights, template or tokenizer move both numbers far more).
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "f32": (0.95, 0.01),
    "f16": (0.95, 0.01),
    "bf16": (0.90, 0.02),
    "Q8_0": (0.80, 0.05),
    "Q6_K": (0.75, 0.06),
    "Q5_K_M": (0.70, 0.07),
    "Q5_K_S": (0.70, 0.07),
    "Q5_1": (0.70, 0.07),
    "Q5_0": (0.70, 0.07),
    "Q4_K_M": (0.60, 0.10),
    "Q4_K_S": (0.60, 0.10),
    "Q4_1": (0.60, 0.10),
    "Q4_0": (0.60, 0.10),
    "Q3_K_L": (0.40, 0.20),
    "Q3_K_M": (0.40, 0.20),
    "Q3_K_S": (0.40, 0.20),
    "Q2_K": (0.30, 0.30),
}


@dataclass
class VerifyConfig:
    """What a quantised GGUF must show before it may be promoted. Measures are described in docs/export.md."""

    # Run verification as part of `export_variant` (the result goes into the model card and ExportResult).
    enabled: bool = True
    # Probe agreement (the gated measure): each probe prompt is rendered with the chat template and the merged model
    # answers greedily; following that answer token by token (teacher forcing), llama.cpp's top token at each of the
    # first `probe_tokens` positions must be the merged model's own top token, or one the merged model scores within
    # `tie_margin` logits of it. The margin exists because a 135M model meets many near-ties, which any rounding
    # (Q8_0 included) flips without the model being any worse; a broken export picks tokens far below the top.
    # Exact free-running agreement (identical first `probe_tokens` tokens) is measured and reported beside it.
    probe_tokens: int = 16
    tie_margin: float = 1.0
    # Fraction of probes that must agree; None = DEFAULT_THRESHOLDS for the quantisation.
    min_agreement: float | None = None
    # Held-out loss gate: |gguf_loss - hf_loss| / hf_loss must not exceed this; None = DEFAULT_THRESHOLDS.
    max_loss_rel_delta: float | None = None
    # ... unless the absolute gap is at most this many nats per token. A relative bound alone refuses a model that
    # learned well: at a held-out loss of 0.11, Q8_0 rounding's 0.006 nats is already 5.7%. A broken conversion
    # (wrong weights, template or tokenizer) moves the loss by whole nats, far beyond this floor.
    max_loss_abs_delta: float = 0.02
    # ... or unless, along the held-out answers, llama.cpp's top token is the merged model's (within `tie_margin`
    # logits) at this fraction of positions or more. A sharply fine-tuned model loses more to Q8_0 rounding than the
    # base (docs/export.md), and on two or three held-out examples that shift can clear both bounds above while the
    # file still chooses what the merged model chooses; a broken conversion chooses differently (Q2_K of the base:
    # 82%; Q8_0: 100%).
    min_eval_agreement: float = 0.95
    # The agreement vouches for a gap of at most this many nats per token: the same top tokens under a much larger
    # gap would mean other probabilities, which the app's sampling (temperature > 0) would feel.
    max_agreeing_loss_abs_delta: float = 0.1
    # At most this many held-out examples are scored (first N, in order), to bound the time the gate takes.
    max_eval_examples: int = 64
    # Examples longer than this many tokens are cut at the end (the loss is then over the assistant tokens kept).
    max_eval_tokens: int = 1024
    # Require the held-out loss check. With no held-out examples given, export falls back to the probe set's own
    # reference answers (loop/core/probes.jsonl); when there is still nothing to score, this decides pass or fail.
    require_loss_check: bool = True
    # Require llama.cpp's tokenizer (the one the app serves with) to tokenise every rendered probe prompt exactly as
    # the merged model's HF tokenizer does; otherwise the served model sees inputs other than the verified ones.
    require_tokenizer_match: bool = True
    # Load the GGUF once in a child process first, so a file that crashes llama.cpp natively (an abort, not a Python
    # exception) is refused with a reason instead of taking the caller down.
    load_check_subprocess: bool = True
    # Seconds the child-process load check may take.
    load_check_timeout_s: float = 300.0
    # CPU threads for both llama.cpp and torch while verifying; None = half the logical CPUs (at least 1), llama.cpp's
    # own default. More threads than physical cores, or cores other jobs are using, slow both down many times over
    # (their workers spin-wait on each other).
    n_threads: int | None = None

    def resolved_threads(self) -> int:
        return self.n_threads or max(1, (os.cpu_count() or 2) // 2)

    def thresholds(self, quantization: str) -> tuple[float, float]:
        """(min_agreement, max_loss_rel_delta) in force for `quantization`, defaults filled in."""
        default_agreement, default_loss = DEFAULT_THRESHOLDS.get(quantization, DEFAULT_THRESHOLDS["Q2_K"])
        agreement = default_agreement if self.min_agreement is None else self.min_agreement
        loss = default_loss if self.max_loss_rel_delta is None else self.max_loss_rel_delta
        return agreement, loss

    def validate(self) -> list[str]:
        """Every problem with this config, all at once (empty list when valid)."""
        problems: list[str] = []
        if not isinstance(self.probe_tokens, int) or self.probe_tokens < 1:
            problems.append(f"verify.probe_tokens must be an integer >= 1, got {self.probe_tokens!r}")
        if not isinstance(self.tie_margin, (int, float)) or not self.tie_margin >= 0.0:
            problems.append(f"verify.tie_margin must be a number >= 0, got {self.tie_margin!r}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            problems.append(f"verify.min_agreement must be in [0, 1] or None, got {self.min_agreement!r}")
        if self.max_loss_rel_delta is not None and not self.max_loss_rel_delta >= 0.0:
            problems.append(f"verify.max_loss_rel_delta must be >= 0 or None, got {self.max_loss_rel_delta!r}")
        if not isinstance(self.max_loss_abs_delta, (int, float)) or not self.max_loss_abs_delta >= 0.0:
            problems.append(f"verify.max_loss_abs_delta must be a number >= 0, got {self.max_loss_abs_delta!r}")
        if not isinstance(self.min_eval_agreement, (int, float)) or not 0.0 <= self.min_eval_agreement <= 1.0:
            problems.append(f"verify.min_eval_agreement must be a number in [0, 1], got {self.min_eval_agreement!r}")
        if not isinstance(self.max_agreeing_loss_abs_delta, (int, float)) or not self.max_agreeing_loss_abs_delta >= 0:
            problems.append("verify.max_agreeing_loss_abs_delta must be a number >= 0, got "
                            f"{self.max_agreeing_loss_abs_delta!r}")
        if not isinstance(self.max_eval_examples, int) or self.max_eval_examples < 1:
            problems.append(f"verify.max_eval_examples must be an integer >= 1, got {self.max_eval_examples!r}")
        if not isinstance(self.max_eval_tokens, int) or self.max_eval_tokens < 8:
            problems.append(f"verify.max_eval_tokens must be an integer >= 8, got {self.max_eval_tokens!r}")
        if not self.load_check_timeout_s > 0:
            problems.append(f"verify.load_check_timeout_s must be > 0, got {self.load_check_timeout_s!r}")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or self.n_threads < 1):
            problems.append(f"verify.n_threads must be an integer >= 1 or None, got {self.n_threads!r}")
        return problems


@dataclass
class ExportConfig:
    """How a trained variant (LoRA adapter + base) becomes a quantised GGUF beside its model card."""

    # Target type: one of SUPPORTED_QUANTIZATIONS, or "auto" (Q8_0 below SMALL_MODEL_PARAMS parameters, else Q4_K_M).
    quantization: str = "auto"
    # Type of the token embedding and output (LM head) tensors when quantising: "default" (llama.cpp's own choice for
    # the quantisation) or one of EMBEDDING_TYPES. Ignored for float targets. f16 for a small model's head was
    # measured and did not serve better answers (docs/export.md, "The LM head's type").
    embedding_type: str = "default"
    # Type the HF->GGUF converter writes before quantising: "auto" (f32 for small models, else the converter's own
    # 16-bit choice from the weights' dtype), "f32", "f16" or "bf16". Ignored when `quantization` is a float type.
    intermediate_type: str = "auto"
    # Keep the unquantised intermediate GGUF beside the result (useful to re-quantise; large for 1B-class models).
    keep_intermediate: bool = False
    # Keep the merged Hugging Face weights (`<out_dir>/merged`) after verification. Verification needs them, so they
    # are only removed at the end; an adapter-less export never removes the base directory it was given.
    keep_merged: bool = True
    # Dtype the merged weights are saved in: "auto" (the base's own dtype), "float32", "float16" or "bfloat16".
    # The merge itself always runs in float32 so the LoRA delta is not rounded twice.
    merged_dtype: str = "auto"
    # Name of the GGUF written in the export directory; "{quant}" is replaced by the quantisation.
    gguf_name: str = "model-{quant}.gguf"
    # Converter location; None = $LOOP_TOOLS/llama.cpp-convert (written by `python -m trainer.install_converter`).
    converter_dir: Path | None = None
    # Refuse to convert when the installed converter came from a llama-cpp-python version other than the one that
    # will serve the file (a newer converter can write tensors/metadata an older llama.cpp cannot load).
    require_matching_converter: bool = True
    # Seconds the conversion subprocess may take.
    convert_timeout_s: float = 3600.0
    # Threads for llama.cpp's quantiser; 0 lets llama.cpp use all cores.
    quantize_threads: int = 0
    # Verification of the quantised file (a [export.verify] table in a config file).
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def __post_init__(self):
        # Config files and environment overrides deliver plain values: a table for `verify`, a string for a path.
        if isinstance(self.verify, dict):
            self.verify = VerifyConfig(**self.verify)
        if self.converter_dir is not None and not isinstance(self.converter_dir, Path):
            self.converter_dir = Path(self.converter_dir)

    def validate(self) -> list[str]:
        """Every problem with this config, all at once (empty list when valid)."""
        problems: list[str] = []
        if self.quantization != "auto" and self.quantization not in SUPPORTED_QUANTIZATIONS:
            problems.append(
                f"export.quantization must be 'auto' or one of {', '.join(SUPPORTED_QUANTIZATIONS)}, "
                f"got {self.quantization!r}"
            )
        if self.embedding_type not in ("default",) + EMBEDDING_TYPES:
            problems.append(f"export.embedding_type must be default or one of {', '.join(EMBEDDING_TYPES)}, "
                            f"got {self.embedding_type!r}")
        if self.intermediate_type not in ("auto",) + FLOAT_TYPES:
            problems.append(f"export.intermediate_type must be auto, f32, f16 or bf16, got {self.intermediate_type!r}")
        if self.merged_dtype not in ("auto", "float32", "float16", "bfloat16"):
            problems.append(
                f"export.merged_dtype must be auto, float32, float16 or bfloat16, got {self.merged_dtype!r}"
            )
        if not isinstance(self.gguf_name, str) or not self.gguf_name.endswith(".gguf") or "/" in self.gguf_name:
            problems.append(f"export.gguf_name must be a file name ending in .gguf, got {self.gguf_name!r}")
        if not self.convert_timeout_s > 0:
            problems.append(f"export.convert_timeout_s must be > 0, got {self.convert_timeout_s!r}")
        if not isinstance(self.quantize_threads, int) or self.quantize_threads < 0:
            problems.append(f"export.quantize_threads must be an integer >= 0, got {self.quantize_threads!r}")
        problems.extend(self.verify.validate())
        return problems

    def resolve_quantization(self, n_params: int) -> str:
        """The concrete quantisation for a model of `n_params` parameters."""
        if self.quantization != "auto":
            return self.quantization
        return "Q8_0" if n_params < SMALL_MODEL_PARAMS else "Q4_K_M"

    def resolve_embedding_type(self, quantization: str) -> str | None:
        """The token embedding and output tensors' type, None for llama.cpp's choice (and for float targets)."""
        if quantization in FLOAT_TYPES or self.embedding_type == "default":
            return None
        return self.embedding_type

    def resolve_intermediate_type(self, n_params: int, quantization: str) -> str:
        """The converter's --outtype: the target itself for float targets, else the configured intermediate."""
        if quantization in FLOAT_TYPES:
            return quantization
        if self.intermediate_type != "auto":
            return self.intermediate_type
        # The converter's own "auto" keeps bf16 weights bf16 and writes f16 otherwise.
        return "f32" if n_params < SMALL_MODEL_PARAMS else "auto"
