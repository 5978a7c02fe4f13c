"""Publish a promoted version: locally implicit, optionally to the Hugging Face Hub.

Locally there is nothing to do: the app re-reads the registry's ``current`` pointer and hot-swaps.
With ``[registry] hf_model_repo`` set, the version goes to the Hub through ``huggingface_hub.HfApi``:

  1. ``create_repo`` for the model repo (and the Space, when set), **private** by default
     (``[registry] hf_private = true``). ``exist_ok`` leaves an existing repo's visibility as it
     is, so while ``hf_private`` is true each repo's ``repo_info(...).private`` is checked, and a
     public one is refused with ``PublishError`` before anything is uploaded. The model is trained
     on users' chats; publishing it openly is a choice made by setting ``hf_private = false``;
  2. the GGUF, its ``version.json`` and its model card under ``<id>/`` in the model repo, and the
     card again as the repo's ``README.md`` (the page people see describes the latest version);
  3. with ``hf_space_repo`` set, a small pointer file (``hf_space_pointer``, JSON: repo, file,
     revision, sha256) committed to the Space, which restarts the Space on the new model.

The pointer is written last so the Space never points at a file that is not uploaded yet, and it
names the exact commit, so a later upload cannot change what the Space serves behind its back.
Each version keeps its own folder, so rolling the Space back is publishing an older id again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from loop.config import load_config
from loop.core import paths
from loop.core.config import CoreConfig
from loop.core.errors import LoopError, error_exit
from loop.core.io import utcnow
from loop.core.registry import Registry, RegistryError, Version, record_published


class PublishError(LoopError, RuntimeError):
    pass


def gguf_name(version: Version) -> str:
    quant = (version.quantization or "gguf").replace("/", "_")
    return f"model-{quant}.gguf"


def model_card(version: Version) -> str:
    """The exporter's card when it wrote one into the version, else one made from version.json."""
    written = Path(version.path) / "README.md" if version.path else None
    if written and written.is_file():
        return written.read_text()
    front = ["---", "library_name: gguf", "tags:", "- gguf", "- llama-cpp", "- feedback-loop"]
    if "/" in (version.base_model or ""):  # the Hub validates base_model as a repo id
        front.append(f"base_model: {version.base_model}")
    front.append("---")
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted((version.metrics or {}).items())) or "| - | - |"
    variant = json.dumps(version.variant or {}, indent=2, sort_keys=True)
    ver = version.verification or {}
    return "\n".join(front) + f"""

# {version.base_model} — {version.id}

A fine-tuned version produced by the feedback loop (chat feedback, human review, LoRA training).

- parent version: {version.parent or "-"}
- created: {version.created_at}
- quantization: {version.quantization or "-"}
- file: `{version.id}/{gguf_name(version)}` ({version.size_bytes} bytes, sha256 `{version.gguf_sha256}`)
- data snapshot: {version.snapshot_hash or "-"} {json.dumps(version.snapshot_counts or {})}
- GGUF verification: {"passed" if ver.get("passed") else ("failed" if ver else "-")}

## Metrics

| metric | value |
|---|---|
{metrics}

## Variant

```json
{variant}
```
"""


def _commit_oid(info: Any) -> str | None:
    return getattr(info, "oid", None) or (info.get("oid") if isinstance(info, dict) else None)


def publish(version: Version | str, config: CoreConfig, api: Any = None, *, registry: Registry | None = None) -> dict[str, Any]:
    """Publish ``version``; returns what was done (also appended to registry/published.jsonl).

    ``api`` is an ``HfApi``-compatible object (tests pass a fake); made here when a Hub target is
    configured and none is given. The token comes from huggingface_hub's usual sources.
    """
    registry = registry or Registry(paths.registry_dir(config.home))
    if isinstance(version, str):
        version = registry.get(version)
    ver = version.verification or {}
    if ver and not ver.get("passed", False):
        raise PublishError(f"{version.id} failed verification; it is never published")
    settings = config.registry
    result: dict[str, Any] = {"version": version.id, "at": utcnow(), "local": True, "target": "local",
                              "model_repo": None, "space_repo": None, "files": [], "pointer": None}
    if not settings.hf_model_repo:
        return result  # the app hot-swaps from the registry: nothing else to do

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo = settings.hf_model_repo
    result.update(target="huggingface", model_repo=repo)
    if not version.gguf_path.is_file():
        raise PublishError(f"{version.id} has no GGUF at {version.gguf_path}")
    card = model_card(version).encode()
    meta = json.dumps(version.to_json(), indent=2, sort_keys=True).encode()
    prefix = version.id
    space = settings.hf_space_repo or None
    try:
        api.create_repo(repo_id=repo, repo_type="model", private=settings.hf_private, exist_ok=True)
        if space:
            api.create_repo(repo_id=space, repo_type="space", space_sdk="gradio", private=settings.hf_private,
                            exist_ok=True)
    except Exception as exc:
        raise PublishError(f"publishing {version.id}: creating {repo}{' / ' + space if space else ''} failed: {exc}") from exc
    if settings.hf_private:
        _refuse_public(api, version.id, [(repo, "model"), *([(space, "space")] if space else [])])
    try:
        uploads = [
            (str(version.gguf_path), f"{prefix}/{gguf_name(version)}"),
            (meta, f"{prefix}/version.json"),
            (card, f"{prefix}/README.md"),
            (card, "README.md"),
        ]
        revision = None
        for payload, path_in_repo in uploads:
            info = api.upload_file(path_or_fileobj=payload, path_in_repo=path_in_repo, repo_id=repo,
                                   repo_type="model", commit_message=f"{version.id}: {path_in_repo}")
            revision = _commit_oid(info) or revision
            result["files"].append(path_in_repo)
        pointer = {"model_repo": repo, "filename": f"{prefix}/{gguf_name(version)}", "revision": revision,
                   "version": version.id, "sha256": version.gguf_sha256, "size_bytes": version.size_bytes,
                   "quantization": version.quantization, "published_at": result["at"]}
        result["pointer"] = pointer
        if space:
            result["space_repo"] = space
            api.upload_file(path_or_fileobj=json.dumps(pointer, indent=2, sort_keys=True).encode(),
                            path_in_repo=settings.hf_space_pointer, repo_id=space, repo_type="space",
                            commit_message=f"serve {version.id} from {repo}@{(revision or 'main')[:12]}")
    except Exception as exc:  # network, auth, quota: say which step and keep the local state as is
        raise PublishError(f"publishing {version.id} to {repo} failed after {result['files'] or 'no files'}: {exc}") from exc
    record_published(registry, result)
    return result


def _refuse_public(api: Any, version_id: str, repos: list[tuple[str, str]]) -> None:
    """PublishError unless every ``(repo_id, repo_type)`` is private (``hf_private`` asks for it)."""
    for repo_id, repo_type in repos:
        try:
            private = getattr(api.repo_info(repo_id, repo_type=repo_type), "private", None)
        except Exception as exc:
            raise PublishError(f"publishing {version_id}: cannot tell whether the {repo_type} repo {repo_id} is "
                               f"private: {exc}; nothing was uploaded") from exc
        if private is not True:
            raise PublishError(
                f"publishing {version_id}: the {repo_type} repo {repo_id} is public but [registry] hf_private is true; "
                f"nothing was uploaded. Make it private (HfApi().update_repo_settings({repo_id!r}, "
                f"repo_type={repo_type!r}, private=True)) or set hf_private = false to publish openly"
            )


def main(argv: list[str] | None = None) -> int:
    """`python -m loop.publish [ID]`: publish a version (default: the current one)."""
    parser = argparse.ArgumentParser(prog="python -m loop.publish", description=main.__doc__)
    parser.add_argument("id", nargs="?", help="version id (default: the current version)")
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        registry = Registry(paths.registry_dir(config.home))
        vid = args.id or registry.current_id()
        if not vid:
            raise RegistryError("nothing is current and no id was given")
        print(json.dumps(publish(vid, config, registry=registry), indent=2))
    except LoopError as exc:
        return error_exit(exc, 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
