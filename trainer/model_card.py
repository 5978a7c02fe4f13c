"""Model card beside each export: README.md (YAML front matter + readable sections) and card.json (everything).

card.json is the machine-readable record (the registry and `loop.versions` read it); README.md is what a person, or
a Hugging Face model repo, shows. Both are written from one `info` dict. Known keys (all optional):

  base_model        str   base model id or path
  version           str   registry version id of this export, when known
  parent_version    str   the version it was trained from (None for the first)
  created_at        str   ISO time; filled in when missing
  data              dict  snapshot_hash, n_train, n_eval, ... (the curated data snapshot); top-level
                          snapshot_hash / snapshot_counts are accepted too
  variant           dict  hyper-parameters (lr, rank, alpha, steps, ...)
  metrics           dict  name -> number (held-out loss, ...)
  quantization      str   e.g. "Q8_0"
  export            dict  how it was exported (adapter, intermediate type, tool versions): filled in by export
  gguf              dict  file, sha256, size_bytes
  verification      dict  VerificationResult.to_dict()
  license, tags, language   passed into the front matter

Other keys are kept in card.json and listed under "Other" in README.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

CARD_JSON = "card.json"
CARD_MD = "README.md"
_KNOWN = ("base_model", "version", "parent_version", "created_at", "data", "variant", "metrics", "quantization",
          "gguf", "verification", "export", "license", "tags", "language", "snapshot_hash", "snapshot_counts")


def _plain(value: Any) -> Any:
    """JSON/YAML-safe copy: dataclasses -> dicts, paths -> strings, floats kept, NaN -> None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return "" if value is None else str(value)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _table(mapping: dict) -> list[str]:
    if not mapping:
        return ["(none)"]
    lines = ["| name | value |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(_fmt(v))} |" for k, v in mapping.items()]
    return lines


def _verification_section(ver: dict) -> list[str]:
    if not ver:
        return ["Not verified."]
    status = "PASSED" if ver.get("passed") else "FAILED"
    lines = [f"**{status}** (quantised file checked against the merged model; measures in docs/export.md)", ""]
    rows = {
        "loads in llama.cpp": ver.get("load_ok"),
        f"probe agreement (top token equal or within {ver.get('tie_margin')} logits, first {ver.get('probe_tokens')} "
        "tokens)": ver.get("agreement"),
        "required probe agreement": ver.get("min_agreement"),
        "exact greedy agreement (first tokens identical)": ver.get("exact_agreement"),
        "top-token agreement per position": ver.get("token_agreement"),
        "held-out loss, llama.cpp logits": ver.get("gguf_eval_loss"),
        "held-out loss, merged model (transformers)": ver.get("hf_eval_loss"),
        "relative loss delta": ver.get("loss_delta"),
        "allowed relative loss delta": ver.get("max_loss_rel_delta"),
        "held-out answer agreement (top token equal or within the margin, per position)": ver.get("eval_agreement"),
        "held-out answer agreement that clears a loss gap": ver.get("min_eval_agreement"),
        "held-out examples / assistant tokens": f"{ver.get('n_eval_examples')} / {ver.get('n_eval_tokens')}",
        "tokenizer agreement (probe prompts)": ver.get("tokenizer_agreement"),
        "chat template matches": ver.get("chat_template_match"),
    }
    lines += _table(rows)
    if ver.get("reasons"):
        lines += ["", "Reasons:"] + [f"- {r}" for r in ver["reasons"]]
    details = ver.get("probe_details") or []
    if details:
        lines += ["", "| probe | agree | merged model | GGUF |", "| --- | --- | --- | --- |"]
        for d in details:
            cells = [_cell(str(d.get(k, ""))) for k in ("prompt", "hf_text", "gguf_text")]
            lines.append(f"| {cells[0][:60]} | {'yes' if d.get('agree') else 'no'} | {cells[1]} | {cells[2]} |")
        lines += ["", "(answers are each model's own greedy continuation, first tokens only)"]
    return lines


def render_model_card(info: dict) -> str:
    """README.md text for `info` (see the module docstring for the keys)."""
    info = _plain(info)
    # The data snapshot may come as a "data" dict or as top-level snapshot_hash / snapshot_counts.
    data = dict(info.get("data") or {})
    for key in ("snapshot_hash", "snapshot_counts"):
        if info.get(key) is not None:
            data.setdefault(key, info[key])
    gguf = info.get("gguf") or {}
    ver = info.get("verification") or {}
    front = {
        "base_model": info.get("base_model"),
        "library_name": "gguf",
        "tags": list(info.get("tags") or []) + ["gguf", "lora", "feedback-loop"],
        "quantization": info.get("quantization"),
        "version": info.get("version"),
        "parent_version": info.get("parent_version"),
        "data_snapshot": data.get("snapshot_hash"),
        "gguf_sha256": gguf.get("sha256"),
        "verified": ver.get("passed") if ver else None,
        "created_at": info.get("created_at"),
    }
    for key in ("license", "language"):
        if info.get(key):
            front[key] = info[key]
    front = {k: v for k, v in front.items() if v is not None}
    title = info.get("version") or Path(gguf.get("file") or "model").stem
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    base = info.get("base_model") or "unknown base"
    quant = info.get("quantization") or "unknown quantisation"
    if (info.get("export") or {}).get("adapter") is None and not info.get("variant"):
        lines += [f"**{base}** itself, exported to GGUF ({quant}).", ""]
    else:
        lines += [f"Fine-tuned from **{base}** with LoRA, merged and exported to GGUF ({quant}).", ""]
    lines += ["## Lineage", ""] + _table({"version": info.get("version"), "parent version": info.get("parent_version"),
                                         "base model": info.get("base_model"), "created": info.get("created_at")})
    lines += ["", "## Data", ""] + _table(data)
    lines += ["", "## Variant hyper-parameters", ""] + _table(info.get("variant") or {})
    if info.get("refit"):  # trainer/refit.py: the served adapter is the variant trained again on every wording
        lines += ["", "## Refit with the held-out wordings", ""] + _table(info["refit"])
    lines += ["", "## Metrics", ""] + _table(info.get("metrics") or {})
    lines += ["", "## Quantisation and file", ""] + _table({"quantization": info.get("quantization"), **gguf})
    if info.get("export"):
        lines += ["", "## Export", ""] + _table(info["export"])
    lines += ["", "## Verification", ""] + _verification_section(ver)
    other = {k: v for k, v in info.items() if k not in _KNOWN}
    if other:
        lines += ["", "## Other", ""] + _table(other)
    return "\n".join(lines) + "\n"


def write_model_card(directory: Path, info: dict) -> Path:
    """Write README.md and card.json for `info` into `directory`; returns the README.md path. Rewriting is fine."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = _plain(dict(info))
    info.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_atomic(directory / CARD_JSON, json.dumps(info, indent=2, sort_keys=False) + "\n")
    readme = directory / CARD_MD
    _write_atomic(readme, render_model_card(info))
    return readme


def read_model_card(directory: Path) -> dict:
    """The info dict written by `write_model_card` (from card.json)."""
    return json.loads((Path(directory) / CARD_JSON).read_text(encoding="utf-8"))
