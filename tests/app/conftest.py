"""Fixtures for the app's tests: the real bundled model, a real store, a real registry."""

from __future__ import annotations

import shutil

import pytest

from loop.config import load_config
from loop.core import paths
from loop.core.registry import Registry


@pytest.fixture(scope="session")
def shared_chat_model(bundled_gguf):
    """One loaded ChatModel for tests that only tokenize or generate (not the engine's own)."""
    from app.generation import ChatModel

    model = ChatModel.load(bundled_gguf, n_ctx=2048, name="bundled")
    yield model
    model.close()


@pytest.fixture
def engine(loop_home):
    """A real Engine in this test's LOOP_HOME: bootstrapped (v1 = the bundled GGUF) and loaded."""
    from app.engine import Engine

    eng = Engine(load_config())
    eng.warm_up(generate=False)
    yield eng
    eng.close()


@pytest.fixture
def registry(loop_home) -> Registry:
    return Registry(paths.registry_dir(loop_home))


@pytest.fixture
def register_copy(registry, bundled_gguf, tmp_path):
    """register_copy(corrupt=False) -> id: a byte-identical (or unreadable) copy of the bundled
    GGUF registered as a new version (not promoted)."""

    def register(corrupt: bool = False) -> str:
        src = tmp_path / f"copy-{len(registry.list())}.gguf"
        if corrupt:
            src.write_bytes(b"GGUF" + b"\0" * 4096)  # the magic, then nothing llama.cpp can read
        else:
            shutil.copy2(bundled_gguf, src)
        return registry.register(src, base_model="test", verification={"passed": True}).id

    return register
