"""``FakeHubApi``: a fake of ``huggingface_hub.HfApi`` for tests (the Hub cannot be reached here).

It keeps repos in memory and behaves like the Hub for the calls the project makes, so that code
written against it works against ``HfApi``:

* every call is bound against the real ``HfApi`` method's signature, so a wrong argument fails
  here as it would there;
* errors are the library's own: a fake HTTP response goes through ``hf_raise_for_status``, so a
  missing repo raises ``RepositoryNotFoundError``, a rate limit an ``HfHubHTTPError`` whose
  ``response`` has status 429 and a ``Retry-After`` header;
* ``create_repo`` makes a repo **public unless asked otherwise** (``private=None`` is the Hub's
  default for a user namespace), and ``exist_ok=True`` leaves an existing repo's visibility as it
  is; ``repo_info(...).private`` reports it; ``update_repo_settings`` changes it;
* every ``upload_file`` / ``create_commit`` is one commit, with a new commit id; files are
  readable at any past commit (``hf_hub_download(revision=oid)``); re-adding identical bytes is a
  no-op as on the Hub, while replacing a file's bytes is recorded in ``overwrites`` so a test can
  assert that append-only code never does it;
* commits per repo are limited per rolling hour (the Hub's limit is 128; ``commits_per_hour``),
  answered with 429 and the seconds until a slot frees up;
* ``super_squash_history`` leaves one commit holding the current files (older revisions are gone);
* ``fail(method, status, times=..., retry_after=...)`` scripts failures (a 429 storm, a 503).

The clock is injectable so that rate-limit tests need no real waiting.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo, DatasetInfo, ModelInfo, RepoUrl, SpaceInfo
from huggingface_hub.utils import hf_raise_for_status

ENDPOINT = "https://huggingface.co"
HUB_COMMITS_PER_HOUR = 128
_INFO = {"model": ModelInfo, "dataset": DatasetInfo, "space": SpaceInfo}


@dataclass
class FakeRepo:
    repo_type: str
    repo_id: str
    private: bool
    create_kwargs: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    history: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (oid, files at it)
    commit_times: list[float] = field(default_factory=list)


@dataclass
class FakeCommit:
    repo_type: str
    repo_id: str
    message: str
    paths: list[str]
    oid: str
    at: float


@dataclass
class _Failure:
    method: str
    status: int
    times: int
    retry_after: str | None
    when: Callable[[dict[str, Any]], bool] | None


class FakeHubApi:
    """A fake of ``huggingface_hub.HfApi`` (see the module docstring for what it models)."""

    def __init__(self, download_dir: str | Path | None = None, *, clock: Callable[[], float] = time.time,
                 commits_per_hour: int = HUB_COMMITS_PER_HOUR):
        self.download_dir = Path(download_dir) if download_dir else None
        self.clock = clock
        self.commits_per_hour = commits_per_hour
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.commits: list[FakeCommit] = []
        self.overwrites: list[tuple[str, str, str]] = []  # (repo_type, repo_id, path) whose bytes changed
        self._failures: list[_Failure] = []

    # -- test controls ---------------------------------------------------------------------------

    def fail(self, method: str, status: int = 429, *, times: int = 1, retry_after: float | str | None = None,
             when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """The next ``times`` calls of ``method`` (matching ``when``, given the call's arguments) fail."""
        self._failures.append(_Failure(method, status, times, None if retry_after is None else str(retry_after), when))

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        return self.repos[(repo_type, repo_id)].files

    def commits_to(self, repo_id: str, repo_type: str = "model") -> list[FakeCommit]:
        return [c for c in self.commits if (c.repo_type, c.repo_id) == (repo_type, repo_id)]

    def uploaded_anything(self) -> bool:
        return bool(self.commits)

    # -- plumbing --------------------------------------------------------------------------------

    def _enter(self, method: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs)  # raises on a wrong argument
        call = {k: v for k, v in bound.arguments.items() if k != "self"}
        self.calls.append((method, call))
        for failure in self._failures:
            if failure.method == method and failure.times > 0 and (failure.when is None or failure.when(call)):
                failure.times -= 1
                headers = {"Retry-After": failure.retry_after} if failure.retry_after is not None else {}
                text = "Too Many Requests" if failure.status == 429 else "scripted failure"
                self._raise(failure.status, method, headers=headers, text=text)
        return call

    @staticmethod
    def _raise(status: int, what: str, *, headers: dict[str, str] | None = None, text: str = "") -> None:
        request = httpx2.Request("POST", f"{ENDPOINT}/api/fake/{what}")
        hf_raise_for_status(httpx2.Response(status, headers=headers or {}, text=text, request=request))
        raise AssertionError(f"hf_raise_for_status did not raise for {status}")  # pragma: no cover

    def _repo(self, repo_id: str, repo_type: str | None) -> FakeRepo:
        repo = self.repos.get((repo_type or "model", repo_id))
        if repo is None:
            self._raise(404, f"{repo_type or 'model'}s/{repo_id}", headers={"X-Error-Code": "RepoNotFound"},
                        text="Repository not found")
        return repo

    def _commit(self, repo: FakeRepo, adds: dict[str, bytes], deletes: list[str], message: str) -> CommitInfo:
        now = self.clock()
        recent = [t for t in repo.commit_times if now - t < 3600]
        if len(recent) >= self.commits_per_hour:
            wait = int(3600 - (now - min(recent))) + 1
            self._raise(429, f"{repo.repo_type}s/{repo.repo_id}/commit/main", headers={"Retry-After": str(wait)},
                        text=f"You have exceeded the rate limit for repository commits ({self.commits_per_hour} per hour).")
        for path, data in adds.items():
            if path in repo.files and repo.files[path] != data:
                self.overwrites.append((repo.repo_type, repo.repo_id, path))
            repo.files[path] = data
        for path in deletes:
            if path not in repo.files:
                self._raise(404, path, headers={"X-Error-Code": "EntryNotFound"}, text="A file with this name doesn't exist")
            del repo.files[path]
        oid = hashlib.sha1(f"{len(self.commits)}:{message}:{sorted(adds)}".encode()).hexdigest()
        repo.history.append((oid, dict(repo.files)))
        repo.commit_times.append(now)
        self.commits.append(FakeCommit(repo.repo_type, repo.repo_id, message, sorted(adds) + sorted(deletes), oid, now))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return CommitInfo(commit_url=f"{ENDPOINT}/{prefix}{repo.repo_id}/commit/{oid}", commit_message=message,
                          commit_description="", oid=oid)

    @staticmethod
    def _read(payload: Any) -> bytes:
        if isinstance(payload, (bytes, bytearray)):
            return bytes(payload)
        if isinstance(payload, (str, Path)):
            return Path(payload).read_bytes()
        if isinstance(payload, io.IOBase) or hasattr(payload, "read"):
            return payload.read()
        raise TypeError(f"unsupported payload {type(payload).__name__}")

    # -- the HfApi surface -----------------------------------------------------------------------

    def create_repo(self, *args, **kwargs) -> RepoUrl:
        call = self._enter("create_repo", args, kwargs)
        repo_type = call.get("repo_type") or "model"
        private, visibility = call.get("private"), call.get("visibility")
        if private is not None and visibility is not None:
            raise ValueError("Received both `private` and `visibility` arguments. Please provide only one of them.")
        if repo_type == "space" and not call.get("space_sdk"):
            raise ValueError("No space_sdk provided. `create_repo` expects space_sdk when repo_type is 'space'")
        key = (repo_type, call["repo_id"])
        if key in self.repos:
            if not call.get("exist_ok"):
                self._raise(409, f"repos/create/{call['repo_id']}", text="You already created this repo")
        else:
            is_private = bool(private) if private is not None else visibility == "private"
            self.repos[key] = FakeRepo(repo_type, call["repo_id"], is_private, call)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return RepoUrl(f"{ENDPOINT}/{prefix}{call['repo_id']}")

    def repo_info(self, *args, **kwargs):
        call = self._enter("repo_info", args, kwargs)
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        sha = repo.history[-1][0] if repo.history else None
        return _INFO[repo.repo_type](id=repo.repo_id, private=repo.private, sha=sha)

    def update_repo_settings(self, *args, **kwargs) -> None:
        call = self._enter("update_repo_settings", args, kwargs)
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        if call.get("private") is not None:
            repo.private = bool(call["private"])
        elif call.get("visibility") is not None:
            repo.private = call["visibility"] == "private"

    def list_repo_files(self, *args, **kwargs) -> list[str]:
        call = self._enter("list_repo_files", args, kwargs)
        return sorted(self._repo(call["repo_id"], call.get("repo_type")).files)

    def upload_file(self, *args, **kwargs) -> CommitInfo:
        call = self._enter("upload_file", args, kwargs)
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        data = self._read(call["path_or_fileobj"])
        message = call.get("commit_message") or f"Upload {call['path_in_repo']} with huggingface_hub"
        return self._commit(repo, {call["path_in_repo"]: data}, [], message)

    def create_commit(self, *args, **kwargs) -> CommitInfo:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        call = self._enter("create_commit", args, kwargs)
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        adds: dict[str, bytes] = {}
        deletes: list[str] = []
        for op in call["operations"]:
            if isinstance(op, CommitOperationAdd):
                with op.as_file() as f:
                    adds[op.path_in_repo] = f.read()
            elif isinstance(op, CommitOperationDelete):
                deletes.append(op.path_in_repo)
            else:
                raise NotImplementedError(f"the fake hub does not model {type(op).__name__}")
        if not adds and not deletes:
            raise ValueError("a commit needs at least one operation")
        return self._commit(repo, adds, deletes, call["commit_message"])

    def upload_folder(self, *args, **kwargs) -> CommitInfo:
        call = self._enter("upload_folder", args, kwargs)
        if call.get("allow_patterns") or call.get("ignore_patterns") or call.get("delete_patterns"):
            raise NotImplementedError("the fake hub does not model upload_folder's patterns")
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        root = Path(call["folder_path"])
        base = (call.get("path_in_repo") or "").strip("/")
        adds = {"/".join(filter(None, [base, p.relative_to(root).as_posix()])): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file()}
        return self._commit(repo, adds, [], call.get("commit_message") or "Upload folder using huggingface_hub")

    def super_squash_history(self, *args, **kwargs) -> None:
        """The branch's history becomes one commit holding the current files: older revisions are gone."""
        call = self._enter("super_squash_history", args, kwargs)
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        oid = hashlib.sha1(f"squash:{len(self.commits)}:{sorted(repo.files)}".encode()).hexdigest()
        repo.history = [(oid, dict(repo.files))]

    def hf_hub_download(self, *args, **kwargs) -> str:
        call = self._enter("hf_hub_download", args, kwargs)
        repo = self._repo(call["repo_id"], call.get("repo_type"))
        files = repo.files
        revision = call.get("revision")
        if revision not in (None, "main"):
            found = [snap for oid, snap in repo.history if oid == revision]
            if not found:
                self._raise(404, f"revision/{revision}", headers={"X-Error-Code": "RevisionNotFound"},
                            text="Invalid rev id")
            files = found[0]
        filename = call["filename"]
        if filename not in files:
            self._raise(404, filename, headers={"X-Error-Code": "EntryNotFound"}, text="Entry not found")
        root = Path(call.get("cache_dir") or self.download_dir or Path.cwd() / ".fake-hub-cache")
        out = root / repo.repo_type / repo.repo_id.replace("/", "--") / (revision or "main") / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(files[filename])
        return str(out)
