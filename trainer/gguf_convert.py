"""HF safetensors -> GGUF (llama.cpp's own converter, run in a subprocess) -> quantised GGUF (llama.cpp's quantiser).

The converter is the one `python -m trainer.install_converter` put under $LOOP_TOOLS/llama.cpp-convert, taken from
the sdist of the llama-cpp-python that serves the file. It runs with PYTHONPATH pointing at its own gguf-py, so the
pip `gguf` package (whatever version) never takes part. Quantisation calls `llama_cpp.llama_model_quantize`, the
quantiser compiled into the very library that will load the result.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from loop.core.errors import LoopError
from trainer import install_converter as _install
from trainer.export_config import EMBEDDING_TYPES, FLOAT_TYPES, QUANT_TYPES

log = logging.getLogger(__name__)
SETUP_HINT = "run setup (`python -m trainer.install_converter`) to install it"


class ConverterMissingError(LoopError, RuntimeError):
    """The llama.cpp converter is not installed (or is for another llama-cpp-python version)."""


class ConversionError(LoopError, RuntimeError):
    """The HF->GGUF conversion or the quantisation failed; the message carries the tool's own output tail."""


def find_converter(converter_dir: Path | None = None, require_matching: bool = True) -> Path:
    """Path of convert_hf_to_gguf.py, after checking it is installed and matches the serving llama-cpp-python."""
    converter_dir = Path(converter_dir) if converter_dir else _install.default_converter_dir()
    script = converter_dir / _install.SCRIPT_NAME
    gguf_pkg = converter_dir / "gguf-py" / "gguf"
    if not script.is_file() or not gguf_pkg.is_dir():
        raise ConverterMissingError(f"llama.cpp's HF->GGUF converter is not installed in {converter_dir}; {SETUP_HINT}")
    if require_matching:
        marker = _install.read_marker(converter_dir) or {}
        have = marker.get("llama_cpp_python_version")
        want = _install.installed_llama_cpp_version()
        if have != want:
            raise ConverterMissingError(
                f"the converter in {converter_dir} comes from llama-cpp-python {have or 'unknown'} but {want} is "
                f"installed; a GGUF must be written by the converter of the llama.cpp that loads it. Re-{SETUP_HINT} "
                "with --force."
            )
    return script


def _converter_env(converter_dir: Path) -> dict:
    env = dict(os.environ)
    # The vendored gguf-py first, so the pip `gguf` package version does not matter; the converter's directory for
    # its `conversion` package. Nothing may come from a hub: the model is local.
    extra = [str(converter_dir / "gguf-py"), str(converter_dir)]
    env["PYTHONPATH"] = os.pathsep.join(extra + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def convert_hf_to_gguf(
    hf_dir: Path,
    out_path: Path,
    outtype: str = "f32",
    converter_dir: Path | None = None,
    require_matching: bool = True,
    timeout_s: float = 3600.0,
    log_path: Path | None = None,
) -> Path:
    """Convert a Hugging Face model directory to one GGUF of `outtype` (f32, f16, bf16 or the converter's "auto")."""
    if outtype not in FLOAT_TYPES + ("auto",):
        raise ValueError(f"outtype must be one of f32, f16, bf16, auto; got {outtype!r}")
    # Absolute: the converter runs with its own directory as the working directory.
    hf_dir, out_path = Path(hf_dir).absolute(), Path(out_path).absolute()
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    script = find_converter(converter_dir, require_matching)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(partial), "--outtype", outtype]
    log_path = Path(log_path).absolute() if log_path else out_path.with_name(out_path.name + ".convert.log")
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        try:
            proc = subprocess.run(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_converter_env(script.parent),
                cwd=str(script.parent), timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            partial.unlink(missing_ok=True)
            raise ConversionError(f"conversion of {hf_dir} took longer than {timeout_s:.0f} s; log: {log_path}") from None
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = log_path.read_text(errors="replace")[-3000:]
        raise ConversionError(f"convert_hf_to_gguf.py failed on {hf_dir} (exit {proc.returncode}):\n{tail}")
    os.replace(partial, out_path)
    log.info("converted %s -> %s (%s) in %.1f s", hf_dir, out_path.name, outtype, time.monotonic() - started)
    return out_path


def llama_ftype(quantization: str) -> int:
    """llama.cpp's LLAMA_FTYPE_* constant for a quantisation name such as "Q8_0" or "f16"."""
    import llama_cpp

    names = {"f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16"}
    name = names.get(quantization) or f"LLAMA_FTYPE_MOSTLY_{quantization.upper()}"
    if quantization not in FLOAT_TYPES + QUANT_TYPES or not hasattr(llama_cpp, name):
        raise ValueError(f"quantisation {quantization!r} is not supported by this llama-cpp-python")
    return int(getattr(llama_cpp, name))


def ggml_type(name: str) -> int:
    """llama.cpp's GGML_TYPE_* constant for a tensor type name such as "f16" or "Q8_0"."""
    import llama_cpp

    attr = f"GGML_TYPE_{name.upper()}"
    if name not in EMBEDDING_TYPES or not hasattr(llama_cpp, attr):
        raise ValueError(f"tensor type {name!r} is not supported by this llama-cpp-python")
    return int(getattr(llama_cpp, attr))


def quantize_gguf(src: Path, dst: Path, quantization: str, nthread: int = 0, embedding_type: str | None = None) -> Path:
    """Quantise src (an f32/f16/bf16 GGUF) to dst with llama.cpp's quantiser in this process. `embedding_type`
    (e.g. "f16") sets the token embedding and output tensors' type; None leaves llama.cpp's choice for the type."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(quantization)
    params.nthread = int(nthread)
    if embedding_type is not None:
        # A model with tied embeddings (SmolLM2) has no output tensor: its token embedding is the LM head too.
        params.token_embedding_type = params.output_tensor_type = ggml_type(embedding_type)
    partial = dst.with_name(dst.name + ".partial")
    started = time.monotonic()
    # llama.cpp logs a line per tensor (and a warning per k-quant fallback, e.g. 576-wide rows of a 135M model that
    # are not a multiple of 256 take Q5_0/Q8_0 instead); only errors are worth showing.
    from llama_cpp import _logger

    level = _logger.logger.level
    _logger.logger.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    finally:
        _logger.logger.setLevel(level)
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ConversionError(f"llama_model_quantize({src.name} -> {quantization}) failed with code {rc}")
    os.replace(partial, dst)
    log.info("quantised %s -> %s (%s, embeddings %s) in %.1f s", src.name, dst.name, quantization,
             embedding_type or "as the type has them", time.monotonic() - started)
    return dst
