"""Export a trained variant: merge the LoRA adapter, save HF safetensors, convert to GGUF, quantise, verify, card.

    python -m trainer.export --base BASE_HF_DIR --out DIR [--adapter ADAPTER_DIR] [--quant Q8_0] [--eval FILE.jsonl]

Layout of an export directory:
    merged/                 merged Hugging Face weights (safetensors) + tokenizer (kept unless keep_merged=False)
    model-<quant>.gguf      the quantised file that is verified and served
    model-<type>.gguf       the unquantised intermediate (only with keep_intermediate=True)
    convert.log             the converter's own output
    README.md, card.json    the model card (trainer/model_card.py)

Verification (trainer/verify.py) runs on the quantised file; its result goes into the card and the ExportResult.
A failed verification does not raise: the caller (the registry's gate) reads `result.verification.passed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loop.core.errors import LoopError, error_exit
from loop.core.io import read_jsonl, sha256_file
from trainer.export_config import FLOAT_TYPES, ExportConfig
from trainer.gguf_convert import convert_hf_to_gguf, quantize_gguf
from trainer.model_card import write_model_card
from trainer.verify import VerificationResult, load_probes, probes_as_examples, verify_gguf

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    gguf_path: Path
    sha256: str
    size_bytes: int
    quantization: str
    # The merged HF weights verification compared against; None once removed (keep_merged=False). For an
    # adapter-less export this is the base directory itself.
    merged_dir: Path | None
    card_path: Path
    verification: VerificationResult | None = None
    intermediate_path: Path | None = None
    n_params: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["verification"] = self.verification.to_dict() if self.verification else None
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def count_parameters(hf_dir: Path) -> int:
    """Number of parameters stored in a HF directory's safetensors files, from their headers alone (no loading)."""
    total = 0
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir} holds no .safetensors weights")
    for file in files:
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for dim in meta["shape"]:
                    n *= dim
                total += n
    return total


def _base_dtype(base_hf_dir: Path) -> str:
    config = json.loads((Path(base_hf_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


def _has_gguf_leftover(hf_dir: Path) -> bool:
    """True when config.json still says quant_method "gguf": transformers writes that when a model loaded from a GGUF
    is saved, and llama.cpp's converter refuses it ("Quant method is not yet supported"), though the safetensors
    hold plain dequantised weights."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "gguf"


def _drop_gguf_leftover(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    tmp = config_path.with_name(config_path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_path)


def _convertible_view(hf_dir: Path, staging: Path) -> Path:
    """A directory the converter accepts for `hf_dir`: the directory itself, or (when its config carries the GGUF
    leftover) a staging directory of symlinks with a cleaned config.json. The given directory is never modified."""
    if not _has_gguf_leftover(hf_dir):
        return hf_dir
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in Path(hf_dir).iterdir():
        if item.name != "config.json":
            (staging / item.name).symlink_to(item.resolve())
    shutil.copyfile(Path(hf_dir) / "config.json", staging / "config.json")
    _drop_gguf_leftover(staging / "config.json")
    return staging


def merge_adapter(adapter_dir: Path, base_hf_dir: Path, merged_dir: Path, dtype: str = "auto") -> Path:
    """Merge a PEFT LoRA adapter into the base weights (`merge_and_unload`) and save HF safetensors + tokenizer.

    The merge runs in float32 whatever the base dtype, so the low-rank delta is added before any rounding; the result
    is then stored in `dtype` ("auto" = the base's own dtype). The base is loaded unquantised even when the adapter
    was trained with QLoRA, since a merge into 4-bit weights would lose the delta.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, base_hf_dir, merged_dir = Path(adapter_dir), Path(base_hf_dir), Path(merged_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(base_hf_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    target = _base_dtype(base_hf_dir) if dtype == "auto" else dtype
    model = model.to(getattr(torch, target))
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # a GGUF-loaded base keeps its quantizer, which refuses save_pretrained
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    model.save_pretrained(str(merged_dir), safe_serialization=True)
    if _has_gguf_leftover(merged_dir):
        _drop_gguf_leftover(merged_dir / "config.json")
    # The adapter directory carries the tokenizer the variant was trained with (chat template included) when the
    # trainer saved one; otherwise the base's is the right one.
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_hf_dir
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(str(merged_dir))
    del model
    log.info("merged %s into %s (%s) in %.1f s", adapter_dir.name, base_hf_dir.name, target,
             time.monotonic() - started)
    return merged_dir


def _versions() -> dict:
    from importlib import metadata

    from trainer import install_converter

    out = {}
    for pkg in ("llama-cpp-python", "transformers", "peft", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out | {"converter": (install_converter.read_marker(install_converter.default_converter_dir()) or {})
                  .get("llama_cpp_python_version")}


def export_variant(
    adapter_dir: Path | None,
    base_hf_dir: Path,
    out_dir: Path,
    config: ExportConfig | None = None,
    card_info: dict | None = None,
    *,
    probes: Sequence[Any] | None = None,
    eval_examples: Sequence[Any] | None = None,
) -> ExportResult:
    """Merge (unless `adapter_dir` is None: then the base itself is exported), convert, quantise, verify, write card.

    probes: verification prompts (None = loop/core/probes.jsonl). eval_examples: held-out chat examples for the loss
    check; None or empty = the probe set's reference answers stand in.
    """
    config = config or ExportConfig()
    problems = config.validate()
    if problems:
        raise ValueError("invalid export config:\n  " + "\n  ".join(problems))
    base_hf_dir, out_dir = Path(base_hf_dir).absolute(), Path(out_dir).absolute()
    adapter_dir = Path(adapter_dir).absolute() if adapter_dir is not None else None
    if not (base_hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"base {base_hf_dir} is not a Hugging Face model directory (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    # 1. merged HF weights
    if adapter_dir is None:
        merged_dir, merged_is_ours = base_hf_dir, False
    else:
        merged_dir = merge_adapter(adapter_dir, base_hf_dir, out_dir / "merged", config.merged_dtype)
        merged_is_ours = True
    n_params = count_parameters(merged_dir)
    quant = config.resolve_quantization(n_params)
    outtype = config.resolve_intermediate_type(n_params, quant)
    embedding_type = config.resolve_embedding_type(quant)

    # 2. HF -> GGUF with the matching converter, then 3. llama.cpp's own quantiser
    final = out_dir / config.gguf_name.format(quant=quant)
    source = _convertible_view(merged_dir, out_dir / "hf-staging")
    if quant in FLOAT_TYPES:
        intermediate = None
        convert_hf_to_gguf(source, final, outtype, config.converter_dir, config.require_matching_converter,
                           config.convert_timeout_s, out_dir / "convert.log")
    else:
        intermediate = out_dir / config.gguf_name.format(quant=outtype if outtype != "auto" else "f16-auto")
        convert_hf_to_gguf(source, intermediate, outtype, config.converter_dir,
                           config.require_matching_converter, config.convert_timeout_s, out_dir / "convert.log")
        quantize_gguf(intermediate, final, quant, config.quantize_threads, embedding_type)
        if not config.keep_intermediate:
            intermediate.unlink(missing_ok=True)
            intermediate = None

    if source != merged_dir:
        shutil.rmtree(source, ignore_errors=True)

    # 4. verification of the quantised file
    verification = None
    if config.verify.enabled:
        probe_set = list(load_probes() if probes is None else probes)
        examples = list(eval_examples or []) or probes_as_examples(probe_set)
        verification = verify_gguf(final, merged_dir, probe_set, examples, config.verify, quantization=quant)
        log.info("verification %s: agreement=%s loss_delta=%s eval_agreement=%s %s",
                 "passed" if verification.passed else "FAILED", verification.agreement, verification.loss_delta,
                 verification.eval_agreement, "; ".join(verification.reasons))

    # 5. the model card beside the file
    sha, size = sha256_file(final), final.stat().st_size
    info = dict(card_info or {})
    info.setdefault("base_model", str(base_hf_dir))
    info["quantization"] = quant
    info["gguf"] = {"file": final.name, "sha256": sha, "size_bytes": size}
    info["verification"] = verification.to_dict() if verification else None
    info["export"] = {
        "adapter": str(adapter_dir) if adapter_dir else None, "intermediate_type": outtype,
        "embedding_type": embedding_type or "default", "n_params": n_params,
        "merged_dtype": _base_dtype(merged_dir), "duration_s": round(time.monotonic() - started, 1),
        "versions": _versions(),
    }
    card_path = write_model_card(out_dir, info)

    if merged_is_ours and not config.keep_merged:
        shutil.rmtree(merged_dir, ignore_errors=True)
        merged_dir = None
    return ExportResult(gguf_path=final, sha256=sha, size_bytes=size, quantization=quant, merged_dir=merged_dir,
                        card_path=card_path, verification=verification, intermediate_path=intermediate,
                        n_params=n_params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter, export to GGUF, quantise and verify.")
    parser.add_argument("--base", type=Path, required=True, help="base model in Hugging Face format (directory)")
    parser.add_argument("--out", type=Path, required=True, help="export directory")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory (omit to export the base)")
    parser.add_argument("--quant", default="auto", help="quantisation: auto, f32, f16, bf16, Q8_0, Q4_K_M, ...")
    parser.add_argument("--eval", type=Path, help="held-out examples (JSON lines with 'messages') for the loss check")
    parser.add_argument("--no-verify", action="store_true", help="skip verification (the file is then not promotable)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = ExportConfig(quantization=args.quant)
    config.verify.enabled = not args.no_verify
    try:
        result = export_variant(args.adapter, args.base, args.out, config,
                                eval_examples=read_jsonl(args.eval) if args.eval else None)
    except LoopError as exc:  # no converter, a failed conversion, a bad base model
        return error_exit(exc)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        size_mib = result.size_bytes / 2**20
        print(f"{result.gguf_path} ({result.quantization}, {size_mib:.1f} MiB, sha256 {result.sha256})")
    return 0 if result.verification is None or result.verification.passed else 2


if __name__ == "__main__":
    sys.exit(main())
