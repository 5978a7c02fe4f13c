"""Figures of the starting weights that depend only on those weights and a fixed set, computed once per weights.

Every run judges against its starting weights: their greedy answers to the regression prompts
(trainer/general_kept.py, about 17 s on 2 cores) and their regression loss. A grid's variants, a cycle's
refit, a cycle that did not promote and runs again, a benchmark's seeds all start from the same weights
and ask the same, so the answer is kept beside the weights, in ``<weights dir>/judge_cache/``, and read back.

Contract: ``cached(weights_dir, model, tokenizer, name, spec, compute)`` returns ``compute()``'s JSON value,
computed at most once for the same key: ``name``, ``spec`` (the set and the method, as JSON), the weights'
fingerprint (trainer.base_model.base_identity: a re-derived or retrained directory is another key), the
tokenizer's chat template and end-of-sequence token (what the prompts become), and how the model computes
(parameter dtype, device type, quantisation, torch and transformers versions), since the same weights answer
differently in bf16 or 4-bit. A weights "directory" that is a model id, an unwritable directory or a
damaged entry only costs the computation: the cache is never a reason for a run to fail. The value is
exactly what ``compute`` returned the first time; callers keep their own copy in the run directory as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_DIR = "judge_cache"


def cached(weights_dir: str | Path | None, model: Any, tokenizer: Any, name: str, spec: Any,
           compute: Callable[[], Any]) -> Any:
    """``compute()``, or its value from an earlier call with the same key (module docstring)."""
    path = entry_path(weights_dir, model, tokenizer, name, spec)
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())["value"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry is computed again and replaced
    value = compute()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"name": name, "value": value}))
            os.replace(tmp, path)
        except OSError as exc:
            log.info("not caching %s beside %s: %s", name, weights_dir, exc)
    return value


def entry_path(weights_dir: str | Path | None, model: Any, tokenizer: Any, name: str, spec: Any) -> Path | None:
    """Where the entry for this key lives, or None when the weights are not a local directory."""
    from trainer.base_model import base_identity

    if weights_dir is None or not Path(weights_dir).is_dir():
        return None
    fingerprint = base_identity(str(weights_dir))["fingerprint"]
    if fingerprint is None:
        return None
    template = [getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None)]
    key = json.dumps({"name": name, "spec": spec, "weights": fingerprint, "template": template,
                      "compute": _how_it_computes(model)}, sort_keys=True, ensure_ascii=False, default=str)
    return Path(weights_dir) / CACHE_DIR / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _how_it_computes(model: Any) -> dict:
    import torch
    import transformers

    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    quantisation = getattr(getattr(model, "config", None), "quantization_config", None)
    return {"dtype": str(parameter.dtype) if parameter is not None else None,
            "device": parameter.device.type if parameter is not None else None,
            "quantization": quantisation.to_dict() if hasattr(quantisation, "to_dict") else quantisation,
            "torch": torch.__version__, "transformers": transformers.__version__}
