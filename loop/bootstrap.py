"""``python -m loop.bootstrap [--hf]``: register the base model as v1 by hand, and derive the trainer's weights.

Registering the base is the core's (``loop.core.bootstrap``: the app and the cycle call it
themselves); deriving Hugging Face weights from the base GGUF needs the trainer, so it is here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loop.config import load_config
from loop.core.bootstrap import base_gguf, ensure_base_version, hf_base_dir
from loop.core.config import CoreConfig
from loop.core.errors import LoopError, error_exit


def ensure_hf_base(config: CoreConfig | None = None) -> Path:
    """Derive Hugging Face-format weights from the base GGUF once (needs the trainer extra)."""
    config = config or load_config()
    if config.model.hf_base:
        return hf_base_dir(config)
    from trainer.base_model import ensure_hf_base as derive

    return derive(base_gguf(config), hf_base_dir(config))


def hf_base_ready(config: CoreConfig | None = None) -> bool:
    """Whether the trainer's weights are already there (configured, or derived from this base GGUF)."""
    config = config or load_config()
    if config.model.hf_base:
        return True
    from trainer.base_model import hf_base_ready as ready

    return ready(base_gguf(config), hf_base_dir(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loop.bootstrap", description=__doc__.splitlines()[0])
    parser.add_argument("--hf", action="store_true", help="also derive the trainer's HF weights")
    args = parser.parse_args(argv)
    try:
        config = load_config()
        version = ensure_base_version(config)
        out = {"current": version.id, "gguf": str(version.gguf_path), "sha256": version.gguf_sha256}
        if args.hf:
            out["hf_base"] = str(ensure_hf_base(config))
    except LoopError as exc:
        return error_exit(exc)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
