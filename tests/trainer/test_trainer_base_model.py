"""The trainer's weights derived from a GGUF count as ready only when complete and made from that very file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.base_model import BaseModelError, hf_base_ready


def _converted(out: Path, gguf: Path, *, marker: bool = True) -> Path:
    out.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (out / name).write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    if marker:
        (out / "base_model_source.json").write_text(json.dumps({"gguf_file": gguf.name,
                                                                 "gguf_size": gguf.stat().st_size}))
    return out


def test_a_complete_conversion_of_this_gguf_is_ready(tmp_path):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    assert hf_base_ready(gguf, _converted(tmp_path / "hf", gguf))


def test_a_conversion_of_another_gguf_a_half_written_one_or_none_is_not_ready(tmp_path):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    out = _converted(tmp_path / "hf", gguf)
    gguf.write_bytes(b"GGUF" * 11)  # another file under the same name
    assert not hf_base_ready(gguf, out)
    assert not hf_base_ready(gguf, _converted(tmp_path / "unmarked", gguf, marker=False))
    assert not hf_base_ready(gguf, tmp_path / "missing")


def test_a_missing_gguf_is_a_clear_error_not_a_ready_base(tmp_path):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    out = _converted(tmp_path / "hf", gguf)
    gguf.unlink()
    with pytest.raises(BaseModelError, match="GGUF file not found"):
        hf_base_ready(gguf, out)


def test_the_bundled_base_derived_for_the_tests_is_ready(bundled_gguf, base_hf_dir):
    assert hf_base_ready(bundled_gguf, base_hf_dir)
