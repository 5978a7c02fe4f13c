"""Shared test setup: every test gets its own LOOP_HOME; nothing is fetched from a model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Setup-time tools (the Argilla venv, the GGUF converter) are shared by every test's home.
os.environ.setdefault("LOOP_TOOLS", str(REPO / ".loop" / "tools"))
# A cache shared by tests that need the same derived artefacts (e.g. the base model's HF weights).
TEST_CACHE = REPO / ".loop" / "test-cache"


@pytest.fixture(autouse=True)
def loop_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "loop-home"
    home.mkdir()
    monkeypatch.setenv("LOOP_HOME", str(home))
    for key in list(os.environ):
        if key.startswith("LOOP_") and "__" in key:  # config overrides from the caller's shell
            monkeypatch.delenv(key)
    monkeypatch.delenv("LOOP_CONFIG", raising=False)
    # Measuring versions after a promotion adds ~40 s to every promoting cycle; the tests of it switch it on.
    monkeypatch.setenv("LOOP_CYCLE__MEASURE_VERSIONS", "false")
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    monkeypatch.delenv("ARGILLA_API_KEY", raising=False)
    return home


@pytest.fixture
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    from loop.core.bootstrap import find_bundled_gguf

    return find_bundled_gguf()


@pytest.fixture(scope="session")
def base_hf_dir(bundled_gguf) -> Path:
    """The bundled model's Hugging Face weights, derived once for the whole test session."""
    from trainer.base_model import ensure_hf_base

    return ensure_hf_base(bundled_gguf, TEST_CACHE / "base-hf")


# The real local Argilla stack for any test that asks for it (tests/argilla_fixtures.py says how).
from argilla_fixtures import argilla_stack, new_stack_config, stack_home  # noqa: E402,F401


@pytest.fixture(scope="session")
def requantized_gguf(bundled_gguf, tmp_path_factory) -> Path:
    """A second real model: the bundled Q4_1 file requantised to Q4_0 by llama.cpp (another file, other numbers)."""
    import ctypes

    import llama_cpp

    out = tmp_path_factory.mktemp("q40") / "smollm2-Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(bundled_gguf).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.fixture
def candidate_gguf(bundled_gguf, tmp_path) -> Path:
    """A cycle's exported GGUF, stood in for by the base's very bytes (hard-linked where the disk allows)."""
    import shutil

    out = tmp_path / "export" / "model-Q4_1.gguf"
    out.parent.mkdir()
    try:
        os.link(bundled_gguf, out)
    except OSError:
        shutil.copyfile(bundled_gguf, out)
    return out
