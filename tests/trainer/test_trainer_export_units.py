"""Fast checks of the export half's plain parts: config validation, the model card, hashing, converter install."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from trainer import install_converter
from trainer.export import count_parameters, sha256_file
from trainer.export_config import ExportConfig, VerifyConfig
from trainer.gguf_convert import ConverterMissingError, convert_hf_to_gguf
from trainer.model_card import read_model_card, write_model_card
from trainer.verify import load_probes, probes_as_examples


def test_config_defaults_valid_and_every_problem_reported():
    assert ExportConfig().validate() == []
    bad = ExportConfig(quantization="Q9_9", intermediate_type="q8", merged_dtype="int8", gguf_name="x.bin",
                       quantize_threads=-1, verify=VerifyConfig(probe_tokens=0, min_agreement=1.5, tie_margin=-1,
                                           min_eval_agreement=2.0, max_agreeing_loss_abs_delta=-1))
    problems = bad.validate()
    for field in ("quantization", "intermediate_type", "merged_dtype", "gguf_name", "quantize_threads",
                  "probe_tokens", "min_agreement", "tie_margin", "min_eval_agreement",
                  "max_agreeing_loss_abs_delta"):
        assert any(field in p for p in problems), (field, problems)


def test_auto_quantisation_follows_model_size():
    config = ExportConfig()
    assert config.resolve_quantization(135_000_000) == "Q8_0"
    assert config.resolve_quantization(1_240_000_000) == "Q4_K_M"
    assert config.resolve_intermediate_type(135_000_000, "Q8_0") == "f32"
    assert config.resolve_intermediate_type(1_240_000_000, "Q4_K_M") == "auto"
    assert ExportConfig(quantization="f16").resolve_intermediate_type(135_000_000, "f16") == "f16"
    # The embedding and LM head get llama.cpp's choice for the type unless a type is asked for (not for float files).
    assert config.resolve_embedding_type("Q8_0") is None
    assert ExportConfig(embedding_type="f16").resolve_embedding_type("Q8_0") == "f16"
    assert ExportConfig(embedding_type="f16").resolve_embedding_type("f16") is None
    assert any("embedding_type" in p for p in ExportConfig(embedding_type="auto").validate())
    # Explicit thresholds win over the per-quantisation defaults.
    assert VerifyConfig().thresholds("Q8_0") == (0.8, 0.05)
    assert VerifyConfig(min_agreement=0.5, max_loss_rel_delta=0.2).thresholds("Q8_0") == (0.5, 0.2)


def test_sha256_file_streams_in_chunks(tmp_path):
    data = bytes(range(256)) * 5000 + b"tail"
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_count_parameters_reads_safetensors_headers(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert count_parameters(tmp_path) == 17


def test_model_card_front_matter_sections_and_json(tmp_path):
    info = {
        "base_model": "SmolLM2-135M-Instruct", "version": "v3", "parent_version": "v2",
        "data": {"snapshot_hash": "abc123", "n_train": 40, "n_eval": 10},
        "variant": {"lr": 2e-4, "rank": 8}, "metrics": {"eval_loss": 1.234},
        "quantization": "Q8_0", "gguf": {"file": "model-Q8_0.gguf", "sha256": "f" * 64, "size_bytes": 123},
        "verification": {"passed": False, "reasons": ["probe agreement 40% is below 80%"], "agreement": 0.4,
                         "eval_agreement": 0.9125, "min_eval_agreement": 0.95,
                         "probe_details": [{"prompt": "a | b", "agree": False, "hf_text": "x", "gguf_text": "y"}]},
        "notes": "kept in Other",
    }
    readme = write_model_card(tmp_path, info)
    text = readme.read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "SmolLM2-135M-Instruct"
    assert front["parent_version"] == "v2" and front["data_snapshot"] == "abc123"
    assert front["quantization"] == "Q8_0" and front["gguf_sha256"] == "f" * 64 and front["verified"] is False
    for heading in ("## Lineage", "## Data", "## Variant hyper-parameters", "## Metrics", "## Quantisation",
                    "## Verification", "## Other"):
        assert heading in text
    assert "**FAILED**" in text and "probe agreement 40% is below 80%" in text
    assert "held-out answer agreement" in text and "0.9125" in text
    assert "a \\| b" in text  # table cells escape pipes
    card = read_model_card(tmp_path)
    assert card["variant"] == {"lr": 2e-4, "rank": 8} and card["created_at"]
    assert json.loads((tmp_path / "card.json").read_text())["notes"] == "kept in Other"


def test_probe_set_is_fixed_and_answerable():
    probes = load_probes()
    assert 15 <= len(probes) <= 30
    assert len({p["prompt"] for p in probes}) == len(probes)
    examples = probes_as_examples(probes)
    assert len(examples) == len(probes)
    assert examples[0]["messages"][-1]["role"] == "assistant"


def _fake_sdist(path: Path, version: str) -> Path:
    """A source archive with the llama-cpp-python layout: what must be taken and what must be left."""
    top = f"llama_cpp_python-{version}"
    files = {
        f"{top}/PKG-INFO": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n",
        f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
        f"{top}/vendor/llama.cpp/conversion/__init__.py": "",
        f"{top}/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        f"{top}/vendor/llama.cpp/LICENSE": "MIT\n",
        f"{top}/vendor/llama.cpp/src/llama.cpp": "// not wanted\n",
        f"{top}/vendor/llama.cpp/convert_lora_to_gguf.py": "# not wanted\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def test_install_converter_extracts_only_the_converter_and_is_idempotent(tmp_path):
    version = metadata.version("llama-cpp-python")
    sdist = _fake_sdist(tmp_path / "sdist.tar.gz", version)
    target = tmp_path / "tools" / "llama.cpp-convert"
    install_converter.install_converter(sdist, target)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == sorted([install_converter.MARKER_NAME, "LICENSE", "convert_hf_to_gguf.py",
                            "conversion/__init__.py", "gguf-py/gguf/__init__.py"])
    assert install_converter.read_marker(target)["llama_cpp_python_version"] == version
    assert install_converter.is_installed(target)

    # A second run is a no-op: a local edit survives; --force replaces it.
    (target / "convert_hf_to_gguf.py").write_text("edited\n")
    install_converter.install_converter(sdist, target)
    assert (target / "convert_hf_to_gguf.py").read_text() == "edited\n"
    install_converter.install_converter(sdist, target, force=True)
    assert (target / "convert_hf_to_gguf.py").read_text() == "print('converter')\n"


def test_install_converter_refuses_an_sdist_of_another_version(tmp_path):
    sdist = _fake_sdist(tmp_path / "old.tar.gz", "0.0.1")
    with pytest.raises(install_converter.ConverterInstallError, match="0.0.1"):
        install_converter.install_converter(sdist, tmp_path / "conv")
    assert not (tmp_path / "conv").exists()


def test_conversion_without_converter_tells_user_to_run_setup(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    with pytest.raises(ConverterMissingError, match="trainer.install_converter"):
        convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf", "f32", converter_dir=tmp_path / "missing")
    # A converter taken from another llama-cpp-python version is refused too.
    other = tmp_path / "other"
    install_converter.install_converter(_fake_sdist(tmp_path / "s.tar.gz", metadata.version("llama-cpp-python")),
                                        other)
    marker = json.loads((other / install_converter.MARKER_NAME).read_text())
    marker["llama_cpp_python_version"] = "0.0.1"
    (other / install_converter.MARKER_NAME).write_text(json.dumps(marker))
    with pytest.raises(ConverterMissingError, match="0.0.1"):
        convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf", "f32", converter_dir=other)
