"""Publishing: local is implicit; a Hugging Face target goes through HfApi (a fake here).

The Hub cannot be reached from tests, so ``FakeHubApi`` stands in for ``huggingface_hub.HfApi``:
it keeps repos and files in memory, refuses uploads to repos never created (as the Hub does), and
every call is checked against the real ``HfApi`` method's signature so the fake cannot drift.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from loop.bootstrap import ensure_base_version
from loop.config import load_config
from loop.publish import PublishError, publish, published
from loop.registry import Registry


class FakeHubApi:
    """A fake of huggingface_hub.HfApi (create_repo, upload_file) recording calls and files."""

    def __init__(self, fail_on: str | None = None):
        from huggingface_hub import HfApi

        self._real = HfApi
        self.calls: list[tuple[str, dict]] = []
        self.repos: dict[tuple[str, str], dict] = {}
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.fail_on = fail_on

    def _record(self, name: str, kwargs: dict) -> None:
        inspect.signature(getattr(self._real, name)).bind(None, **kwargs)  # raises on a wrong argument
        self.calls.append((name, kwargs))

    def create_repo(self, **kwargs):
        self._record("create_repo", kwargs)
        key = (kwargs.get("repo_type") or "model", kwargs["repo_id"])
        if key in self.repos and not kwargs.get("exist_ok"):
            raise RuntimeError(f"409 Conflict: {key} exists")
        self.repos.setdefault(key, kwargs)
        self.files.setdefault(key, {})
        return SimpleNamespace(repo_id=kwargs["repo_id"], url=f"https://hub.invalid/{kwargs['repo_id']}")

    def upload_file(self, **kwargs):
        self._record("upload_file", kwargs)
        key = (kwargs.get("repo_type") or "model", kwargs["repo_id"])
        if key not in self.repos:
            raise RuntimeError(f"404 Repository Not Found: {key}")
        if self.fail_on and kwargs["path_in_repo"].endswith(self.fail_on):
            raise RuntimeError("503 Service Unavailable")
        payload = kwargs["path_or_fileobj"]
        if isinstance(payload, (str, Path)):
            data = Path(payload).read_bytes()
        elif isinstance(payload, bytes):
            data = payload
        else:
            data = io.BufferedReader(payload).read()
        self.files[key][kwargs["path_in_repo"]] = data
        # A commit id that changes with every commit, like the Hub's.
        oid = hashlib.sha1(f"{len(self.calls)}:{kwargs['path_in_repo']}:{hashlib.sha256(data).hexdigest()}".encode()).hexdigest()
        return SimpleNamespace(oid=oid, commit_url=f"https://hub.invalid/{key[1]}/commit/{oid}")


@pytest.fixture
def version(bundled_gguf, tmp_path):
    reg = Registry()
    ensure_base_version(load_config(), reg)
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: gguf\n---\n# exported card\nparent: v1\n")
    v = reg.register(bundled_gguf, base_model="SmolLM2-135M-Instruct", parent="v1", quantization="Q4_1",
                     metrics={"heldout_loss": 1.9}, verification={"passed": True}, extra_files=[card], link=True)
    reg.promote(v.id, reason="test")
    return reg.get(v.id)


def test_without_a_hub_target_publishing_is_local_only(version):
    api = FakeHubApi()
    result = publish(version, load_config(), api=api)
    assert result["target"] == "local" and result["local"] is True
    assert api.calls == []


def test_publish_uploads_gguf_and_card_then_points_the_space(version, monkeypatch):
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    monkeypatch.setenv("LOOP_REGISTRY__HF_SPACE_REPO", "org/chat-space")
    api = FakeHubApi()
    result = publish(version.id, load_config(), api=api)

    model = api.files[("model", "org/chat-model")]
    gguf_path = f"{version.id}/model-Q4_1.gguf"
    assert hashlib.sha256(model[gguf_path]).hexdigest() == version.gguf_sha256  # the very file, whole
    assert model["README.md"].decode().startswith("---\nlibrary_name: gguf") and b"exported card" in model["README.md"]
    assert model[f"{version.id}/README.md"] == model["README.md"]
    assert json.loads(model[f"{version.id}/version.json"])["gguf_sha256"] == version.gguf_sha256

    pointer = json.loads(api.files[("space", "org/chat-space")]["model_pointer.json"])
    assert pointer["model_repo"] == "org/chat-model" and pointer["filename"] == gguf_path
    assert pointer["version"] == version.id and pointer["sha256"] == version.gguf_sha256
    assert pointer["revision"] and pointer == result["pointer"]
    # Order matters: repos exist before uploads, and the Space moves only after every model file is up.
    names = [(name, kw.get("repo_type"), kw.get("path_in_repo")) for name, kw in api.calls]
    assert names[0] == ("create_repo", "model", None)
    assert names[-1] == ("upload_file", "space", "model_pointer.json")
    assert api.repos[("model", "org/chat-model")]["exist_ok"] is True
    assert api.repos[("space", "org/chat-space")]["space_sdk"] == "gradio"
    assert published(Registry())[-1]["version"] == version.id

    again = publish(version.id, load_config(), api=api)  # idempotent: existing repos are fine
    assert again["pointer"]["filename"] == gguf_path


def test_generated_card_when_the_exporter_wrote_none(bundled_gguf, monkeypatch):
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    reg = Registry()
    v = reg.register(bundled_gguf, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", quantization="Q4_1", link=True,
                     metrics={"heldout_loss": 1.9, "regression_loss": 1.5}, variant={"lr": 0.001, "rank": 16},
                     verification={"passed": True})
    api = FakeHubApi()
    result = publish(v, load_config(), api=api)
    assert result["space_repo"] is None and all(kw.get("repo_type") == "model" for _, kw in api.calls)
    card = api.files[("model", "org/chat-model")]["README.md"].decode()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| heldout_loss | 1.9 |" in card and v.gguf_sha256 in card and '"rank": 16' in card


def test_failed_versions_are_never_published_and_hub_errors_name_the_step(version, bundled_gguf, monkeypatch):
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    monkeypatch.setenv("LOOP_REGISTRY__HF_SPACE_REPO", "org/chat-space")
    reg = Registry()
    bad = reg.register(bundled_gguf, base_model="x", link=True, verification={"passed": False, "reasons": ["no"]})
    api = FakeHubApi()
    with pytest.raises(PublishError, match="failed verification"):
        publish(bad, load_config(), api=api)
    assert api.calls == []

    flaky = FakeHubApi(fail_on="README.md")
    with pytest.raises(PublishError, match="model-Q4_1.gguf"):  # says how far it got
        publish(version, load_config(), api=flaky)
    assert ("space", "org/chat-space") not in flaky.files  # the Space never points at a half-published version
