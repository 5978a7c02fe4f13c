"""Publishing: local is implicit; a Hugging Face target goes through HfApi (a fake here).

The Hub cannot be reached from tests, so ``FakeHubApi`` (tests/fake_hub.py) stands in for
``huggingface_hub.HfApi``: repos and files in memory, uploads refused to repos never created (as
the Hub does), visibility as the Hub models it (public unless asked otherwise; ``exist_ok`` keeps
an existing repo's), and every call checked against the real ``HfApi`` method's signature.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from fake_hub import FakeHubApi

from loop.config import load_config
from loop.core.bootstrap import ensure_base_version
from loop.core.registry import Registry, published
from loop.publish import PublishError, publish


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

    model = api.files("org/chat-model", "model")
    gguf_path = f"{version.id}/model-Q4_1.gguf"
    assert hashlib.sha256(model[gguf_path]).hexdigest() == version.gguf_sha256  # the very file, whole
    assert model["README.md"].decode().startswith("---\nlibrary_name: gguf") and b"exported card" in model["README.md"]
    assert model[f"{version.id}/README.md"] == model["README.md"]
    assert json.loads(model[f"{version.id}/version.json"])["gguf_sha256"] == version.gguf_sha256

    pointer = json.loads(api.files("org/chat-space", "space")["model_pointer.json"])
    assert pointer["model_repo"] == "org/chat-model" and pointer["filename"] == gguf_path
    assert pointer["version"] == version.id and pointer["sha256"] == version.gguf_sha256
    assert pointer["revision"] and pointer == result["pointer"]
    # Order matters: repos exist before uploads, and the Space moves only after every model file is up.
    names = [(name, kw.get("repo_type"), kw.get("path_in_repo")) for name, kw in api.calls]
    assert names[0] == ("create_repo", "model", None)
    assert names[-1] == ("upload_file", "space", "model_pointer.json")
    assert api.repos[("model", "org/chat-model")].create_kwargs["exist_ok"] is True
    assert api.repos[("space", "org/chat-space")].create_kwargs["space_sdk"] == "gradio"
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
    card = api.files("org/chat-model", "model")["README.md"].decode()
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

    flaky = FakeHubApi()
    flaky.fail("upload_file", 503, when=lambda call: call["path_in_repo"].endswith("README.md"))
    with pytest.raises(PublishError, match="model-Q4_1.gguf"):  # says how far it got
        publish(version, load_config(), api=flaky)
    assert flaky.commits_to("org/chat-space", "space") == []  # the Space never points at a half-published version


def test_publish_creates_the_model_repo_and_the_space_private_by_default(version, monkeypatch):
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    monkeypatch.setenv("LOOP_REGISTRY__HF_SPACE_REPO", "org/chat-space")
    api = FakeHubApi()
    publish(version, load_config(), api=api)
    assert api.repo_info("org/chat-model", repo_type="model").private is True
    assert api.repo_info("org/chat-space", repo_type="space").private is True


@pytest.mark.parametrize("public_one", ["model", "space"])
def test_publish_refuses_an_existing_public_repo_and_uploads_nothing(version, monkeypatch, public_one):
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    monkeypatch.setenv("LOOP_REGISTRY__HF_SPACE_REPO", "org/chat-space")
    api = FakeHubApi()
    # Made earlier by hand, public (the Hub's default); create_repo(exist_ok=True) leaves it so.
    api.create_repo(f"org/chat-{public_one}", repo_type=public_one, **({"space_sdk": "gradio"} if public_one == "space" else {}))
    with pytest.raises(PublishError, match=f"{public_one} repo org/chat-{public_one} is public.*nothing was uploaded"):
        publish(version, load_config(), api=api)
    assert api.commits == [] and published(Registry()) == []
    assert api.repo_info(f"org/chat-{public_one}", repo_type=public_one).private is False  # not changed behind the owner's back


def test_publishing_openly_is_an_explicit_choice(version, monkeypatch):
    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    monkeypatch.setenv("LOOP_REGISTRY__HF_PRIVATE", "false")
    api = FakeHubApi()
    publish(version, load_config(), api=api)
    assert api.repo_info("org/chat-model", repo_type="model").private is False
    assert f"{version.id}/version.json" in api.files("org/chat-model", "model")
